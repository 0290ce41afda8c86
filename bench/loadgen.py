"""The load generator: keeps a fixed number of requests in flight and times each one.

``python -m bench.loadgen --proto ws --url ws://127.0.0.1:8766 --inflight 64 --connections 8``

Opens ``--connections`` requester connections and runs ``--inflight`` request loops
spread over them (closed loop: each loop sends its next request as soon as its
previous answer arrives). Each request's latency is taken with
``time.perf_counter()`` from just before the send to the arrival of its answer.

Timeline, printed on stdout so the harness can sample CPU at the same instants:
``WARMUP`` -> ``--warmup`` s -> ``MEASURE`` -> ``--duration`` s -> ``END`` ->
``RESULT {json}``. Only answers that arrive inside the measured window count.

Protocols: ``ws`` (the requester JSON API: ``{"request_id","command","data"}``),
``nats`` (request-reply on a subject), ``sio`` (a raw Socket.IO event with an ack),
``celery`` (``apply_async()`` then ``AsyncResult.get()`` from ``--inflight`` threads:
:func:`celery_main`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import threading
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (dumps, install_fast_loop, loads, payload_text,  # noqa: E402
                          percentiles, raise_fd_limit)
from bench.worker import COMMAND, sio_url  # noqa: E402


class Closed(Exception):
    """The connection closed with requests outstanding."""


class WsRequester:
    """One requester socket; answers are matched to requests by ``request_id``."""

    def __init__(self, url: str, batch: bool = False) -> None:
        self.url = url
        self.pending: dict[str, asyncio.Future[Any]] = {}
        #: Requests made in one turn of the loop while others wait go in one frame (a
        #: JSON array), as ``workers.requester.Requester`` sends them.
        self.batch = batch
        self.gathered: list[str] = []

    async def open(self) -> None:
        from websockets.asyncio.client import connect

        self.ws = await connect(self.url, compression=None, max_size=None, ping_interval=None,
                                proxy=None, open_timeout=30, close_timeout=1)
        self.reader = asyncio.create_task(self._read())

    def body(self, rid: str, payload: str) -> str:
        return (f'{{"request_id":"{rid}","command":"{COMMAND}",'
                f'"data":{{"payload":"{payload}"}}}}')

    async def _read(self) -> None:
        """Answer calls until the socket closes; then fail those still waiting."""
        try:
            await self._receive_answers()
        finally:
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(Closed("connection closed"))
            self.pending.clear()

    async def _receive_answers(self) -> None:
        pending = self.pending
        async for text in self.ws:
            parsed = loads(text)
            for answer in parsed if isinstance(parsed, list) else [parsed]:
                future = pending.pop(answer.get("request_id"), None)
                if future is not None and not future.done():
                    future.set_result(answer)

    async def call(self, rid: str, text: str) -> dict[str, Any]:
        future = asyncio.get_running_loop().create_future()
        self.pending[rid] = future
        if not self.batch or len(self.pending) == 1:
            await self.ws.send(text)
        else:
            self.gathered.append(text)
            if len(self.gathered) == 1:
                asyncio.get_running_loop().create_task(self._send_gathered())
        return await future

    async def _send_gathered(self) -> None:
        await asyncio.sleep(0)  # the others of this turn join
        texts, self.gathered = self.gathered, []
        await self.ws.send(texts[0] if len(texts) == 1 else "[" + ",".join(texts) + "]")

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()


class SioRequester(WsRequester):
    """Socket.IO: ``42<ack>["request",{...}]`` answered by ``43<ack>[{...}]``."""

    def __init__(self, url: str) -> None:
        super().__init__(sio_url(url))
        self.acks = itertools.count(1)

    async def open(self) -> None:
        from websockets.asyncio.client import connect

        self.ws = await connect(self.url, compression=None, max_size=None, ping_interval=None,
                                proxy=None, open_timeout=30, close_timeout=1)
        opened = await asyncio.wait_for(self.ws.recv(), 30)
        assert opened.startswith("0"), opened[:80]
        await self.ws.send("40")
        while True:
            text = await asyncio.wait_for(self.ws.recv(), 30)
            if text.startswith("40"):
                break
            if text == "2":
                await self.ws.send("3")
        self.reader = asyncio.create_task(self._read())

    def body(self, rid: str, payload: str) -> str:
        # The ack id is the correlation key: rid -> ack id in call().
        return (f'["request",{{"request_id":"{rid}","command":"{COMMAND}",'
                f'"data":{{"payload":"{payload}"}}}}]')

    async def _receive_answers(self) -> None:
        pending, ws = self.pending, self.ws
        async for text in ws:
            if text == "2":
                await ws.send("3")
                continue
            if text.startswith("43"):
                i = 2
                while text[i].isdigit():
                    i += 1
                future = pending.pop(text[2:i], None)
                if future is not None and not future.done():
                    future.set_result(loads(text[i:])[0])

    async def call(self, rid: str, text: str) -> dict[str, Any]:
        ack = str(next(self.acks))
        future = asyncio.get_running_loop().create_future()
        self.pending[ack] = future
        await self.ws.send(f"42{ack}{text}")
        return await future


class NatsRequester:
    def __init__(self, url: str, subject: str) -> None:
        self.url = url
        self.subject = subject

    async def open(self) -> None:
        import nats

        self.nc = await nats.connect(self.url, allow_reconnect=False, connect_timeout=10)

    def body(self, rid: str, payload: str) -> bytes:  # type: ignore[override]
        return (f'{{"request_id":"{rid}","command":"{COMMAND}",'
                f'"data":{{"payload":"{payload}"}}}}').encode()

    async def call(self, rid: str, body: bytes) -> dict[str, Any]:
        msg = await self.nc.request(self.subject, body, timeout=60)
        return loads(msg.data)

    async def close(self) -> None:
        await self.nc.close()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    payload = payload_text(args.payload)
    if args.proto == "ws":
        urls = args.url.split(",")  # several brokers: the connections take them in turn
        conns: list[Any] = [WsRequester(urls[i % len(urls)], args.batch)
                            for i in range(args.connections)]
    elif args.proto == "sio":
        conns = [SioRequester(args.url) for _ in range(args.connections)]
    else:
        conns = [NatsRequester(args.url, args.subject) for _ in range(args.connections)]
    await asyncio.gather(*(c.open() for c in conns))

    state = {"measuring": False, "stopping": False}
    window = [0.0, 0.0]
    latencies: list[float] = []
    counts = {"ok": 0, "errors": 0, "warm_ok": 0, "warm_errors": 0, "sent": 0}
    first_error: list[str] = []
    perf = time.perf_counter
    size = args.payload

    async def loop(conn: Any, tag: str) -> None:
        ids = itertools.count()
        body, call = conn.body, conn.call
        while not state["stopping"]:
            rid = f"{tag}.{next(ids)}"
            text = body(rid, payload)
            counts["sent"] += 1
            t0 = perf()
            try:
                answer = await call(rid, text)
                good = answer.get("success") is True and len(answer.get("data") or "") == size
                error = "" if good else str(answer.get("error") or "wrong payload in answer")
            except Closed as exc:
                good, error = False, str(exc)
            except Exception as exc:  # noqa: BLE001 - e.g. a NATS request timeout
                good, error = False, f"{type(exc).__name__}: {exc}"
            t1 = perf()
            tally(counts, latencies, state["measuring"] and window[0] <= t1, good, t1 - t0)
            if not good:
                if not first_error:
                    first_error.append(error[:300])
                await asyncio.sleep(0.002)  # an error answer comes back fast: do not spin
                if error == "connection closed":
                    return

    tasks = [asyncio.create_task(loop(conns[i % len(conns)], f"l{i}"))
             for i in range(args.inflight)]
    print("WARMUP", flush=True)
    await asyncio.sleep(args.warmup)
    window[0] = perf()
    state["measuring"] = True
    print("MEASURE", flush=True)
    await asyncio.sleep(args.duration)
    window[1] = perf()
    state["measuring"] = False
    state["stopping"] = True
    print("END", flush=True)
    _, unfinished = await asyncio.wait(tasks, timeout=args.drain_timeout)
    for task in unfinished:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)

    return summary(latencies, counts, window[1] - window[0], len(unfinished), first_error)


def tally(counts: dict[str, Any], latencies: list[float], measured: bool, good: bool,
          seconds: float) -> None:
    """Count one answer: in the measured window (with its latency), or in the warm-up."""
    if measured:
        counts["ok" if good else "errors"] += 1
        if good:
            latencies.append(seconds)
    else:
        counts["warm_ok" if good else "warm_errors"] += 1


def summary(latencies: list[float], counts: dict[str, int], elapsed: float, unanswered: int,
            first_error: list[str]) -> dict[str, Any]:
    """The ``RESULT`` of a run (the same fields whatever the protocol)."""
    p50, p90, p99, p999 = percentiles(latencies, (50, 90, 99, 99.9))
    return {
        "ok": counts["ok"], "errors": counts["errors"], "seconds": elapsed,
        "rps": counts["ok"] / elapsed if elapsed > 0 else 0.0,
        "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "p999_ms": p999,
        "max_ms": max(latencies) * 1000 if latencies else float("nan"),
        "mean_ms": sum(latencies) / len(latencies) * 1000 if latencies else float("nan"),
        "warmup_ok": counts["warm_ok"], "warmup_errors": counts["warm_errors"],
        "unanswered": unanswered, "sent": counts["sent"],
        "first_error": first_error[0] if first_error else "",
    }


def celery_main(args: argparse.Namespace) -> dict[str, Any]:
    """Celery as a Django view calls it: ``apply_async()``, then ``AsyncResult.get()``.

    That call blocks, so each of the ``--inflight`` loops is a thread of its own, as
    each would be a request thread of a sync Django server. (An asyncio way would need
    ``get()`` in an executor, the same threads with a hop added, or a poll of the result
    key, which is not how Celery waits: its Redis backend waits on pub/sub.) The threads
    share one result backend (``result_backend_thread_safe``, see bench/celery_app.py),
    so one pub/sub connection; producers come from a pool of ``--inflight``
    connections. Latency is timed from before ``apply_async`` to the return of
    ``get()``; same timeline and ``RESULT`` as :func:`main`. The warm-up starts once
    every thread has had its first answer, as the other protocols open their
    connections first: a producer's first publish opens its connection and declares
    the queue (more than a second for 64 threads at once here).
    """
    from bench.celery_app import TASK, make_app

    app = make_app(args.url, args.celery_prefix, args.subject, pool_limit=args.inflight)
    echo = app.tasks[TASK]
    payload = payload_text(args.payload)
    perf = time.perf_counter
    measuring = threading.Event()
    stopping = threading.Event()
    window = [0.0, 0.0]
    first_error: list[str] = []
    # One record per thread, merged at the end: no lock on the hot path.
    records: list[dict[str, Any]] = []
    opened = threading.Semaphore(0)

    def loop() -> None:
        mine: dict[str, Any] = {"lat": [], "ok": 0, "errors": 0, "warm_ok": 0,
                                "warm_errors": 0, "sent": 0}
        records.append(mine)
        lat = mine["lat"]
        while not stopping.is_set():
            if mine["sent"] == 1:
                opened.release()
            mine["sent"] += 1
            t0 = perf()
            try:
                answer = echo.apply_async((payload,)).get(timeout=60)
                good = answer == payload
                error = "" if good else "wrong payload in answer"
            except Exception as exc:  # noqa: BLE001 - a timeout, Redis gone, a failed task
                good, error = False, f"{type(exc).__name__}: {exc}"
            t1 = perf()
            tally(mine, lat, measuring.is_set() and window[0] <= t1, good, t1 - t0)
            if not good:
                if not first_error:
                    first_error.append(error[:300])
                time.sleep(0.002)  # an error comes back fast: do not spin

    threads = [threading.Thread(target=loop, name=f"l{i}", daemon=True)
               for i in range(args.inflight)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    for _ in threads:
        if not opened.acquire(timeout=max(0.0, deadline - time.monotonic())):
            break  # a stuck thread: its errors will tell
    print("WARMUP", flush=True)
    time.sleep(args.warmup)
    window[0] = perf()
    measuring.set()
    print("MEASURE", flush=True)
    time.sleep(args.duration)
    window[1] = perf()
    measuring.clear()
    stopping.set()
    print("END", flush=True)
    deadline = time.monotonic() + args.drain_timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    unanswered = sum(thread.is_alive() for thread in threads)
    counts = {k: sum(r[k] for r in records)
              for k in ("ok", "errors", "warm_ok", "warm_errors", "sent")}
    latencies = [x for r in records for x in r["lat"]]
    return summary(latencies, counts, window[1] - window[0], unanswered, first_error)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proto", choices=("ws", "nats", "sio", "celery"), default="ws")
    p.add_argument("--url", required=True, help="requester endpoint on 127.0.0.1 (ws: several, "
                   "comma-separated, taken in turn by the connections)")
    p.add_argument("--inflight", type=int, default=1, help="requests kept in flight")
    p.add_argument("--connections", type=int, default=1, help="requester connections")
    p.add_argument("--payload", type=int, default=100, help="payload bytes each way")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured")
    p.add_argument("--drain-timeout", type=float, default=5.0,
                   help="seconds to wait for answers still outstanding at the end")
    p.add_argument("--subject", default="bench.req",
                   help="NATS subject (nats), Celery queue (celery)")
    p.add_argument("--celery-prefix", default="", help="Redis key prefix (celery only)")
    p.add_argument("--batch", action="store_true",
                   help="ws: requests made together go in one frame (a JSON array), as the "
                   "Python client sends them; answers may come in batch frames too")
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    return p.parse_args(argv)


if __name__ == "__main__":
    ns = parse_args()
    if not all(url.startswith(("ws://127.0.0.1", "nats://127.0.0.1", "redis://127.0.0.1"))
               for url in ns.url.split(",")):
        sys.exit("bench.loadgen: only 127.0.0.1 may be targeted")
    if ns.proto == "celery":  # two sockets a thread (producer, pub/sub), plus spares
        raise_fd_limit(3 * ns.inflight + 256)
        print("RESULT " + dumps(celery_main(ns)), flush=True)
        sys.exit(0)
    ns.connections = max(1, min(ns.connections, ns.inflight))
    raise_fd_limit(ns.connections + 256)
    if not ns.no_uvloop:
        install_fast_loop()
    result = asyncio.run(main(ns))
    print("RESULT " + dumps(result), flush=True)
