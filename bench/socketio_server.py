"""Baseline 3: the same job forwarding on python-socketio.

Workers connect and emit ``register``; a requester emits ``request`` with an ack;
the server picks the least-loaded registered worker and forwards with its own
``await sio.call("request", data, to=worker)``, then returns the worker's answer
as the requester's ack. Served by uvicorn (``--loop``, default uvloop), websocket
transport only (no long-polling), so the same raw-websocket bench clients drive it.

``python bench/socketio_server.py --port 9000``
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import socketio
import uvicorn

NO_WORKERS = "No available workers"


def make_app() -> Any:
    sio = socketio.AsyncServer(async_mode="asgi", transports=["websocket"],
                               max_http_buffer_size=4 * 1048576, logger=False,
                               engineio_logger=False)
    workers: dict[str, dict[str, Any]] = {}

    @sio.event
    async def register(sid: str, data: dict[str, Any]) -> dict[str, Any]:
        workers[sid] = {"in_flight": 0, "max": int(data.get("max_concurrency") or 16),
                        "commands": set(data.get("commands") or ()),
                        "worker_id": data.get("worker_id") or sid}
        return {"ok": True, "worker_id": workers[sid]["worker_id"]}

    @sio.event
    async def disconnect(sid: str, *args: Any) -> None:
        workers.pop(sid, None)

    @sio.event
    async def request(sid: str, data: dict[str, Any]) -> dict[str, Any]:
        command = data.get("command")
        best, best_load = None, 0
        for wsid, w in workers.items():
            if command in w["commands"] and w["in_flight"] < w["max"]:
                if best is None or w["in_flight"] < best_load:
                    best, best_load = wsid, w["in_flight"]
        if best is None:
            return {"request_id": data.get("request_id"), "success": False, "data": None,
                    "error": NO_WORKERS, "processed_by": None}
        worker = workers[best]
        worker["in_flight"] += 1
        try:
            result = await sio.call("request", data, to=best, timeout=30)
        except Exception as exc:  # noqa: BLE001 - timeout or the worker left
            return {"request_id": data.get("request_id"), "success": False, "data": None,
                    "error": f"{type(exc).__name__}: {exc}", "processed_by": None}
        finally:
            worker["in_flight"] -= 1
        return {"request_id": data.get("request_id"), "success": result.get("success"),
                "data": result.get("data"), "error": result.get("error"),
                "processed_by": worker["worker_id"]}

    return socketio.ASGIApp(sio)


def main() -> None:
    p = argparse.ArgumentParser(prog="python bench/socketio_server.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--loop", default="uvloop", choices=("asyncio", "uvloop"))
    args = p.parse_args()
    print(f"socket.io server on http://{args.host}:{args.port} (pid {os.getpid()})",
          file=sys.stderr)
    uvicorn.run(make_app(), host=args.host, port=args.port, loop=args.loop,
                log_level="warning", access_log=False, ws="websockets")


if __name__ == "__main__":
    main()
