"""The bench worker: N lean worker connections in one process, echoing payloads.

``python -m bench.worker --proto ws --url ws://127.0.0.1:8765 --count 4``

Protocols:

* ``ws``   the broker's worker envelope (``workers/protocol/``): ``connect``, then
           ``request`` frames answered by ``response`` frames; heartbeats both ways
           (our own every ``heartbeat_interval`` the broker announces, and an ack to
           every broker ping). Serves our broker and ``bench/baseline_broker.py`` alike.
* ``nats`` a NATS queue-group subscriber per connection; replies to each request.
* ``sio``  a raw Socket.IO v5 / Engine.IO v4 client over websockets that registers
           with ``bench/socketio_server.py`` and answers its ``call()`` with an ack.
* ``celery`` not a client of ours: ``celery worker`` itself runs in this process
           (``bench/celery_app.py``), on the queue ``--subject``, with the pool
           ``--celery-pool``; ``--count`` does not apply.

The command ``bench`` returns ``params["payload"]`` unchanged. The worker does no
other work, so a run measures what the broker adds. Each connection redials with
the same backoff as ``workers/client.py`` (first delay random in ``[0, initial]``,
then doubling), so the reconnect scenario sees a real worker's schedule.

Prints ``READY <n>`` once every connection has registered for the first time.
Stops on SIGTERM/SIGINT, or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import signal
import sys
import time
from typing import Iterator

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import dumps, install_fast_loop, loads, raise_fd_limit  # noqa: E402

COMMAND = "bench"


def backoff(initial: float, maximum: float, factor: float = 2.0) -> Iterator[float]:
    """The schedule of ``workers.client.backoff`` (kept in step by hand)."""
    yield random.uniform(0, initial)
    delay = initial
    while True:
        yield random.uniform(delay / 2, delay)
        delay = min(delay * factor, maximum)


class Fleet:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = asyncio.Event()
        self.registered: set[int] = set()
        self.ready_printed = False
        self.served = 0
        self.errors = 0
        self.first_error = ""
        self.sessions = 0
        #: worker id -> when the broker said to come back (its ``disconnect`` frame)
        self.retry_after: dict[str, float] = {}
        # Bounds concurrent first dials (10,000 workers would otherwise storm the listen backlog).
        self.dial_gate = asyncio.Semaphore(args.dial_concurrency)

    def mark_registered(self, idx: int) -> None:
        self.sessions += 1
        self.registered.add(idx)
        if not self.ready_printed and len(self.registered) == self.args.count:
            self.ready_printed = True
            print(f"READY {self.args.count}", flush=True)

    def note_error(self, text: str) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = text[:300]
            print(f"WORKER-ERROR {self.first_error}", flush=True)

    async def run_one(self, idx: int, session) -> None:  # type: ignore[no-untyped-def]
        """Keep one connection alive: dial, serve, redial with backoff."""
        delays = None
        first = True
        while not self.stop.is_set():
            registered = False
            try:
                if first:
                    async with self.dial_gate:
                        first = False
                        conn = await session.open(idx)
                else:
                    conn = await session.open(idx)
                registered = True
                self.mark_registered(idx)
                await conn.serve(self)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: redial
                if not self.stop.is_set() and self.args.verbose:
                    print(f"worker {idx}: {type(exc).__name__}: {exc}", file=sys.stderr)
            if self.stop.is_set():
                break
            if registered or delays is None:
                delays = backoff(self.args.backoff_initial, self.args.backoff_max)
            delay = next(delays)
            told = self.retry_after.pop(f"{self.args.prefix}-{idx}", None)
            if told is not None:  # the broker said when: come back then, not at once
                delay = min(told, self.args.backoff_max)
            try:
                await asyncio.wait_for(self.stop.wait(), delay)
            except asyncio.TimeoutError:
                pass


# ------------------------------------------------------------------------ ws (envelope)


class WsWorkerSession:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    async def open(self, idx: int) -> "WsWorkerConn":
        from websockets.asyncio.client import connect

        sources, urls = self.args.source, self.args.url.split(",")  # spread over brokers
        ws = await connect(urls[idx % len(urls)], compression=None, max_size=None,
                           ping_interval=None, proxy=None, open_timeout=30, close_timeout=1,
                           local_addr=(sources[idx % len(sources)], 0) if sources else None)
        worker_id = f"{self.args.prefix}-{idx}"
        data = {"worker_id": worker_id, "name": worker_id, "commands": [COMMAND],
                "weight": 1.0, "max_concurrency": self.args.max_concurrency}
        if self.args.features:
            data["features"] = self.args.features
        try:
            await ws.send(dumps({"type": "connect", "msg_id": f"{worker_id}.c",
                                 "timestamp": time.time(), "data": data}))
            while True:
                answer = loads(await asyncio.wait_for(ws.recv(), 30))
                if answer.get("type") == "connect":
                    break
                if answer.get("type") == "error":
                    raise RuntimeError(f"registration refused: {answer.get('data')}")
        except BaseException:
            await ws.close()
            raise
        granted = (answer.get("data") or {}).get("features") or []
        interval = float((answer.get("data") or {}).get("heartbeat_interval") or 5.0)
        return WsWorkerConn(ws, worker_id, interval, granted)


class WsWorkerConn:
    """One connection. With the features the broker granted (as the official worker
    does): heartbeats asking for an ack only after three silent intervals, and a
    batch frame (a JSON array) answered with one batch frame."""

    def __init__(self, ws, worker_id: str, interval: float,  # type: ignore[no-untyped-def]
                 granted: list[str]) -> None:
        self.ws = ws
        self.worker_id = worker_id
        self.interval = interval
        self.quiet = "quiet_heartbeat" in granted
        self.ids = itertools.count()
        self.heard = time.monotonic()

    async def _beat(self) -> None:
        ws, wid = self.ws, self.worker_id
        # Spread the fleet's heartbeats over the interval instead of beating in step.
        await asyncio.sleep(random.uniform(0, self.interval))
        while True:
            data: dict = {"in_flight": 0}
            if self.quiet and time.monotonic() - self.heard >= 3 * self.interval:
                data["want_ack"] = True
            await ws.send(dumps({"type": "heartbeat", "msg_id": f"{wid}.{next(self.ids)}",
                                 "timestamp": time.time(), "data": data}))
            await asyncio.sleep(self.interval)

    def _react(self, msg: dict, fleet: Fleet, out: list) -> None:
        kind = msg.get("type")
        wid, ids = self.worker_id, self.ids
        if kind == "request":
            params = msg["data"].get("params") or {}
            fleet.served += 1
            out.append({"type": "response", "msg_id": f"{wid}.{next(ids)}",
                        "timestamp": time.time(),
                        "data": {"request_id": msg["msg_id"], "success": True,
                                 "data": params.get("payload"), "error": None}})
        elif kind == "heartbeat":
            if "ack" not in msg.get("data", {}):
                out.append({"type": "heartbeat", "msg_id": f"{wid}.{next(ids)}",
                            "timestamp": time.time(), "data": {"ack": msg.get("msg_id")}})
        elif kind == "error":
            fleet.note_error(f"{wid}: broker error frame: {msg.get('data')}")
        elif kind == "disconnect":
            delay = (msg.get("data") or {}).get("retry_after")
            if isinstance(delay, (int, float)):
                fleet.retry_after[wid] = float(delay)

    async def serve(self, fleet: Fleet) -> None:
        ws = self.ws
        beater = asyncio.create_task(self._beat())
        out: list = []
        try:
            async for text in ws:
                self.heard = time.monotonic()
                msg = loads(text)
                if isinstance(msg, list):  # a batch: answered with one
                    for one in msg:
                        self._react(one, fleet, out)
                    if out:
                        await ws.send(dumps(out) if len(out) > 1 else dumps(out[0]))
                else:
                    self._react(msg, fleet, out)
                    for one in out:
                        await ws.send(dumps(one))
                out.clear()
        finally:
            beater.cancel()
            await ws.close()


# ------------------------------------------------------------------------ nats


class NatsWorkerSession:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    async def open(self, idx: int) -> "NatsWorkerConn":
        import nats

        nc = await nats.connect(self.args.url, name=f"{self.args.prefix}-{idx}",
                                allow_reconnect=False, connect_timeout=10,
                                max_outstanding_pings=10)
        conn = NatsWorkerConn(nc, f"{self.args.prefix}-{idx}")
        await nc.subscribe(self.args.subject, queue="bench-workers", cb=conn.on_msg)
        await nc.flush()
        return conn


class NatsWorkerConn:
    def __init__(self, nc, worker_id: str) -> None:  # type: ignore[no-untyped-def]
        self.nc = nc
        self.worker_id = worker_id
        self.closed = asyncio.Event()
        self.served = 0

    async def on_msg(self, msg) -> None:  # type: ignore[no-untyped-def]
        req = loads(msg.data)
        self.served += 1
        await msg.respond(dumps({"request_id": req.get("request_id"), "success": True,
                                 "data": (req.get("data") or {}).get("payload"),
                                 "error": None, "processed_by": self.worker_id}).encode())

    async def serve(self, fleet: Fleet) -> None:
        try:
            while not fleet.stop.is_set() and self.nc.is_connected:
                try:
                    await asyncio.wait_for(fleet.stop.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
        finally:
            fleet.served += self.served
            await self.nc.close()


# ------------------------------------------------------------------------ socket.io (raw)


def sio_url(base: str) -> str:
    return base.rstrip("/") + "/socket.io/?EIO=4&transport=websocket"


def sio_split(text: str) -> tuple[str, object]:
    """``42<id>[...]`` / ``43<id>[...]`` -> (id, decoded array)."""
    i = 2
    while i < len(text) and text[i].isdigit():
        i += 1
    return text[2:i], loads(text[i:])


class SioWorkerSession:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    async def open(self, idx: int) -> "SioWorkerConn":
        from websockets.asyncio.client import connect

        ws = await connect(sio_url(self.args.url), compression=None, max_size=None,
                           ping_interval=None, proxy=None, open_timeout=30, close_timeout=1)
        worker_id = f"{self.args.prefix}-{idx}"
        try:
            opened = await asyncio.wait_for(ws.recv(), 30)
            if not opened.startswith("0"):
                raise RuntimeError(f"unexpected engine.io open packet {opened[:80]!r}")
            await ws.send("40")
            registered = False
            while not registered:
                text = await asyncio.wait_for(ws.recv(), 30)
                if text == "2":
                    await ws.send("3")
                elif text.startswith("40"):
                    await ws.send("420" + dumps(["register", {
                        "worker_id": worker_id, "commands": [COMMAND],
                        "max_concurrency": self.args.max_concurrency}]))
                elif text.startswith("430"):
                    registered = True
                elif text.startswith("44"):
                    raise RuntimeError(f"socket.io connect refused: {text[:200]}")
        except BaseException:
            await ws.close()
            raise
        return SioWorkerConn(ws, worker_id)


class SioWorkerConn:
    def __init__(self, ws, worker_id: str) -> None:  # type: ignore[no-untyped-def]
        self.ws = ws
        self.worker_id = worker_id

    async def serve(self, fleet: Fleet) -> None:
        ws = self.ws
        try:
            async for text in ws:
                if text == "2":
                    await ws.send("3")
                elif text.startswith("42"):
                    ack, (event, data) = sio_split(text)  # type: ignore[misc]
                    if event == "request":
                        fleet.served += 1
                        await ws.send(f"43{ack}" + dumps([{
                            "success": True, "data": (data.get("data") or {}).get("payload"),
                            "error": None}]))
        finally:
            await ws.close()


SESSIONS = {"ws": WsWorkerSession, "nats": NatsWorkerSession, "sio": SioWorkerSession}


async def main(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    fleet = Fleet(args)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, fleet.stop.set)
    session = SESSIONS[args.proto](args)
    tasks = [asyncio.create_task(fleet.run_one(i, session)) for i in range(args.count)]
    try:
        await asyncio.wait_for(fleet.stop.wait(), args.max_seconds)
    except asyncio.TimeoutError:
        print("worker: --max-seconds reached, stopping", file=sys.stderr)
    fleet.stop.set()
    done, pending = await asyncio.wait(tasks, timeout=3)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    print(f"STATS served={fleet.served} sessions={fleet.sessions} errors={fleet.errors}",
          flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proto", choices=sorted([*SESSIONS, "celery"]), default="ws",
                   help="wire protocol")
    p.add_argument("--url", required=True,
                   help="worker endpoint: ws://127.0.0.1:PORT[/ws/worker/] (several, comma-"
                        "separated: connections take them in turn), nats://127.0.0.1:4222, "
                        "http-less base ws://127.0.0.1:PORT for socket.io, or "
                        "redis://127.0.0.1:6379/DB for celery")
    p.add_argument("--count", type=int, default=1, help="worker connections in this process")
    p.add_argument("--max-concurrency", type=int, default=1024,
                   help="slots each worker announces (high: the broker, not the worker, limits)")
    p.add_argument("--prefix", default=f"bw{os.getpid()}", help="worker id prefix")
    p.add_argument("--subject", default="bench.req",
                   help="NATS subject (nats), Celery queue (celery)")
    p.add_argument("--celery-pool", default="threads:64", metavar="POOL:CONCURRENCY",
                   help="celery worker pool and its size (celery only)")
    p.add_argument("--celery-prefix", default="", help="Redis key prefix (celery only)")
    p.add_argument("--dial-concurrency", type=int, default=200,
                   help="connections dialled at once on start-up")
    p.add_argument("--backoff-initial", type=float, default=1.0,
                   help="first reconnect delay is random in [0, this] (workers.client default)")
    p.add_argument("--backoff-max", type=float, default=30.0, help="longest reconnect delay")
    p.add_argument("--max-seconds", type=float, default=1800.0, help="exit after this long")
    p.add_argument("--features", type=lambda v: [f for f in v.split(",") if f],
                   default=["quiet_heartbeat", "batch"],
                   help="features asked for at registration, comma-separated ('' for none: "
                        "a worker written from the seed)")
    p.add_argument("--source", type=lambda v: v.split(","), default=[],
                   help="local addresses to dial from, round robin (e.g. 127.0.0.2,127.0.0.3:"
                        " one address has about 28,000 ports per broker port)")
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    p.add_argument("-v", "--verbose", action="store_true", help="log connection failures")
    return p.parse_args(argv)


if __name__ == "__main__":
    ns = parse_args()
    if not all(url.startswith(("ws://127.0.0.1", "nats://127.0.0.1", "redis://127.0.0.1"))
               for url in ns.url.split(",")):
        sys.exit("bench.worker: only 127.0.0.1 may be targeted")
    if ns.proto == "celery":
        from bench.celery_app import run_worker

        sys.exit(run_worker(ns))
    raise_fd_limit(ns.count + 256)
    if not ns.no_uvloop:
        install_fast_loop()
    sys.exit(asyncio.run(main(ns)))
