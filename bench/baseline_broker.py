"""A minimal job broker on plain ``websockets``: the yardstick, not a product.

It follows the seed's design (one asyncio process, workers on one port, requesters
on another) and speaks exactly the broker's wire protocol (``workers/protocol/``),
so the same bench worker and load generator drive it and our broker alike:

* worker port: the envelope ``{"type","msg_id","timestamp","data"}``; a ``connect``
  frame registers (answered by ``connect`` with ``worker_id`` and
  ``heartbeat_interval``); ``request`` frames go out keyed by ``msg_id`` and come
  back as ``response`` frames with ``data.request_id``; heartbeats are acked and the
  broker pings each worker every interval, dropping the silent;
* requester port: ``{"request_id","command","data"}`` answered by
  ``{"request_id","success","data","error","processed_by"}``;
* the least-loaded capable worker (in flight / weight) with a free slot gets each
  request; when all are full the request waits in a FIFO queue;
* a request times out after ``--timeout`` s; a lost worker's requests are answered
  with an error (no failover: the yardstick does the least a broker must).

Both ports also answer ``GET /healthz`` with ``{"status":"ok","workers":N}``.
It has no persistence, no history, no admin, no cross-process anything.

``python bench/baseline_broker.py --worker-port 8765 --requester-port 8766``
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys
import time
from collections import deque
from http import HTTPStatus
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from websockets.asyncio.server import ServerConnection, serve  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from bench.common import dumps, loads  # noqa: E402

NO_WORKERS = "No available workers"
TIMEOUT = "Worker response timeout"
WORKER_LOST = "Worker lost"


class Worker:
    __slots__ = ("ws", "worker_id", "commands", "weight", "max_concurrency", "in_flight",
                 "last_seen", "keys")

    def __init__(self, ws: ServerConnection, data: dict[str, Any]) -> None:
        self.ws = ws
        self.worker_id = str(data.get("worker_id") or os.urandom(6).hex())
        self.commands = set(data.get("commands") or ())
        self.weight = float(data.get("weight") or 1.0)
        self.max_concurrency = int(data.get("max_concurrency") or 16)
        self.in_flight = 0
        self.last_seen = time.monotonic()
        self.keys: set[str] = set()


class Pending:
    __slots__ = ("requester", "request_id", "command", "params", "worker", "timer")

    def __init__(self, requester: ServerConnection, request_id: Any, command: str,
                 params: dict[str, Any]) -> None:
        self.requester = requester
        self.request_id = request_id
        self.command = command
        self.params = params
        self.worker: Worker | None = None
        self.timer: asyncio.TimerHandle | None = None


class Broker:
    def __init__(self, heartbeat_interval: float, timeout: float) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.timeout = timeout
        self.workers: dict[str, Worker] = {}
        self.pending: dict[str, Pending] = {}
        self.waiting: deque[tuple[str, Pending]] = deque()
        self.keys = itertools.count()
        self.msg_ids = itertools.count()

    # ------------------------------------------------------------------ choosing

    def choose(self, command: str) -> tuple[Worker | None, bool]:
        """Least loaded capable worker with a free slot; and whether any is capable."""
        best, best_load, capable = None, 0.0, False
        for worker in self.workers.values():
            if command not in worker.commands:
                continue
            capable = True
            if worker.in_flight >= worker.max_concurrency:
                continue
            load = worker.in_flight / worker.weight
            if best is None or load < best_load:
                best, best_load = worker, load
        return best, capable

    async def forward(self, key: str, pending: Pending, worker: Worker) -> None:
        pending.worker = worker
        worker.in_flight += 1
        worker.keys.add(key)
        try:
            await worker.ws.send(dumps({"type": "request", "msg_id": key,
                                        "timestamp": time.time(),
                                        "data": {"action": pending.command,
                                                 "params": pending.params}}))
        except ConnectionClosed:
            pass  # its handler's cleanup answers the request

    async def answer(self, key: str, success: bool, data: Any, error: Any,
                     processed_by: str | None) -> None:
        pending = self.pending.pop(key, None)
        if pending is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        try:
            await pending.requester.send(dumps({
                "request_id": pending.request_id, "success": success, "data": data,
                "error": error, "processed_by": processed_by}))
        except ConnectionClosed:
            pass

    def expire(self, key: str) -> None:
        pending = self.pending.get(key)
        if pending is None:
            return
        worker = pending.worker
        if worker is not None and key in worker.keys:
            worker.keys.discard(key)
            worker.in_flight -= 1
        asyncio.ensure_future(self.answer(key, False, None, TIMEOUT, None))

    async def drain_queue(self) -> None:
        while self.waiting:
            key, pending = self.waiting[0]
            if key not in self.pending:
                self.waiting.popleft()
                continue
            worker, capable = self.choose(pending.command)
            if worker is None:
                if not capable:
                    self.waiting.popleft()
                    await self.answer(key, False, None, NO_WORKERS, None)
                    continue
                return
            self.waiting.popleft()
            await self.forward(key, pending, worker)

    # ------------------------------------------------------------------ requesters

    async def requester(self, ws: ServerConnection) -> None:
        mine: set[str] = set()
        try:
            async for text in ws:
                try:
                    req = loads(text)
                    request_id = req.get("request_id")
                    command = req["command"]
                    params = req.get("data") or {}
                    if not isinstance(command, str) or not isinstance(params, dict):
                        raise ValueError("bad request")
                except Exception as exc:  # noqa: BLE001
                    await ws.send(dumps({"request_id": None, "success": False, "data": None,
                                         "error": f"Bad request: {exc}",
                                         "processed_by": None}))
                    continue
                key = str(next(self.keys))
                pending = Pending(ws, request_id, command, params)
                self.pending[key] = pending
                mine.add(key)
                pending.timer = asyncio.get_running_loop().call_later(
                    self.timeout, self.expire, key)
                worker, capable = self.choose(command)
                if worker is not None:
                    await self.forward(key, pending, worker)
                elif capable:
                    self.waiting.append((key, pending))
                else:
                    await self.answer(key, False, None, NO_WORKERS, None)
        except ConnectionClosed:
            pass
        finally:
            for key in mine:  # answers to a gone requester are dropped
                pending = self.pending.get(key)
                if pending is not None and pending.requester is ws:
                    self.pending.pop(key, None)
                    if pending.timer is not None:
                        pending.timer.cancel()
                    worker = pending.worker
                    if worker is not None and key in worker.keys:
                        worker.keys.discard(key)
                        worker.in_flight -= 1

    # ------------------------------------------------------------------ workers

    def frame(self, kind: str, data: dict[str, Any]) -> str:
        return dumps({"type": kind, "msg_id": f"b{next(self.msg_ids)}",
                      "timestamp": time.time(), "data": data})

    async def worker(self, ws: ServerConnection) -> None:
        try:
            first = loads(await asyncio.wait_for(ws.recv(), 10))
            if first.get("type") != "connect" or not isinstance(first.get("data"), dict):
                await ws.send(self.frame("error", {"error": "Register first: send a 'connect' "
                                                            "frame", "reply_to": None}))
                return
            worker = Worker(ws, first["data"])
        except (asyncio.TimeoutError, ConnectionClosed, ValueError, TypeError):
            return
        old = self.workers.get(worker.worker_id)
        if old is not None:
            await old.ws.close(4001, "replaced")
        self.workers[worker.worker_id] = worker
        await ws.send(self.frame("connect", {"worker_id": worker.worker_id,
                                             "heartbeat_interval": self.heartbeat_interval}))
        pinger = asyncio.create_task(self.ping(worker))
        await self.drain_queue()
        try:
            async for text in ws:
                worker.last_seen = time.monotonic()
                msg = loads(text)
                kind = msg.get("type")
                data = msg.get("data") or {}
                if kind == "response":
                    key = data.get("request_id")
                    if key in worker.keys:
                        worker.keys.discard(key)
                        worker.in_flight -= 1
                        await self.answer(key, data.get("success") is True, data.get("data"),
                                          data.get("error"), worker.worker_id)
                        if self.waiting:
                            await self.drain_queue()
                elif kind == "heartbeat":
                    if "ack" not in data:
                        await ws.send(self.frame("heartbeat", {"ack": msg.get("msg_id")}))
                elif kind == "disconnect":
                    worker.max_concurrency = 0  # draining: no new work
        except ConnectionClosed:
            pass
        finally:
            pinger.cancel()
            if self.workers.get(worker.worker_id) is worker:
                del self.workers[worker.worker_id]
            for key in list(worker.keys):
                await self.answer(key, False, None, WORKER_LOST, worker.worker_id)
            worker.keys.clear()
            if self.waiting:
                await self.drain_queue()

    async def ping(self, worker: Worker) -> None:
        interval = self.heartbeat_interval
        try:
            while True:
                await asyncio.sleep(interval)
                if time.monotonic() - worker.last_seen > 3 * interval:
                    await worker.ws.close(4003, "heartbeat timeout")
                    return
                await worker.ws.send(self.frame("heartbeat", {}))
        except ConnectionClosed:
            pass

    # ------------------------------------------------------------------ health

    def health(self, connection: ServerConnection, request: Any) -> Any:
        if request.path.rstrip("/") == "/healthz":
            return connection.respond(HTTPStatus.OK, dumps({"status": "ok",
                                                            "workers": len(self.workers)}))
        return None


async def main(args: argparse.Namespace) -> None:
    broker = Broker(args.heartbeat_interval, args.timeout)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or
                                                      stop.set_result(None))
    common = dict(max_size=args.max_size, process_request=broker.health)
    async with serve(broker.worker, args.host, args.worker_port, **common), \
            serve(broker.requester, args.host, args.requester_port, **common):
        print(f"Baseline broker ready: workers ws://{args.host}:{args.worker_port} "
              f"requesters ws://{args.host}:{args.requester_port}", flush=True)
        await stop


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/baseline_broker.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--worker-port", type=int, default=8765, help="port for workers")
    p.add_argument("--requester-port", type=int, default=8766, help="port for requesters")
    p.add_argument("--heartbeat-interval", type=float,
                   default=float(os.environ.get("BROKER_HEARTBEAT_INTERVAL", 5.0)),
                   help="seconds between pings (default: $BROKER_HEARTBEAT_INTERVAL or 5)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--max-size", type=int, default=4 * 1048576 + 65536,
                   help="largest frame accepted, bytes")
    p.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio")
    return p.parse_args(argv)


if __name__ == "__main__":
    ns = parse_args()
    if ns.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(main(ns))
