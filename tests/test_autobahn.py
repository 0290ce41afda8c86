"""The Autobahn WebSocket protocol suite through our daphne + Channels stack.

kosoku runs the Autobahn TestSuite's fuzzing-client cases (framing, pings, reserved
bits, opcodes, fragmentation, UTF-8, close handling, limits, compression) against a
broker started with ``BROKER_ECHO_ROUTE=1``, whose ``/ws/echo/`` sends every frame back.
The per-section verdicts are attached to the report (``record_property``) and logged:
``./test.sh tests/test_autobahn.py -o log_cli=true`` prints the table. The test fails
if a section has fewer passing cases than it had when the table was measured, or if a
case fails that is not one of the known failures below.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
import websockets
from django.test import override_settings

from dispatch.transport.routing import SocketRouter
from tests.procs import Broker

pytest.importorskip("kosoku")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
log = logging.getLogger("tests.autobahn")

ECHO_ENV = {"BROKER_ECHO_ROUTE": "1",
            # section 9 sends messages of up to 16 MiB
            "BROKER_MAX_MESSAGE_BYTES": str(16 * 2**20),
            "BROKER_LOG_LEVEL": "WARNING"}
PARALLEL_CASES = 4  # the whole suite in about 35 s on 2 cores; one at a time, about 70 s
VERDICTS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
PASSING = ("OK", "NON-STRICT", "INFORMATIONAL")
SECTION_NAMES = {"1": "Framing", "2": "Pings/Pongs", "3": "Reserved Bits", "4": "Opcodes",
                 "5": "Fragmentation", "6": "UTF-8 Handling", "7": "Close Handling",
                 "9": "Limits/Performance", "10": "Misc",
                 "12": "Compression (payloads)", "13": "Compression (parameters)"}

#: Measured with kosoku 0.1.0, daphne 4.2.3, autobahn 26.10.2 (section -> verdict -> cases).
#: Counts may grow; a drop is a regression.
EXPECTED: dict[str, dict[str, int]] = {
    "1": {"OK": 14, "FAILED": 2},
    "2": {"OK": 11},
    "3": {"OK": 4, "NON-STRICT": 3},
    "4": {"OK": 4, "NON-STRICT": 6},
    "5": {"OK": 19, "NON-STRICT": 1},
    "6": {"OK": 143, "FAILED": 2},
    "7": {"OK": 34, "INFORMATIONAL": 3},
    "9": {"OK": 52, "FAILED": 2},
    "10": {"OK": 1},
    "12": {"UNIMPLEMENTED": 90},  # daphne does not negotiate permessage-deflate
    "13": {"UNIMPLEMENTED": 126},
}
#: Each sends an empty message and expects it back: daphne drops an empty
#: ``websocket.send`` (see test_daphne_sends_empty_messages below). The broker itself
#: never sends an empty frame.
KNOWN_FAILURES = {"1.1.1", "1.2.1", "6.1.1", "6.1.2", "9.7.1", "9.8.1"}


def verdict(behavior: str, behavior_close: str) -> str:
    """One Autobahn label per case: its behaviour when it passed, else why not. A case
    passes when both verdicts are acceptable (kosoku's ``CaseResult.passed``)."""
    if behavior in PASSING and behavior_close in PASSING:
        return behavior
    return behavior if behavior in ("UNIMPLEMENTED", "ERROR") else "FAILED"


def table(counts: dict[str, Counter]) -> str:
    """The per-section table, in Markdown, for the log and the README."""
    lines = ["| section | cases | " + " | ".join(VERDICTS) + " |",
             "|---|---:|" + "---:|" * len(VERDICTS)]
    for section in sorted(counts, key=int):
        lines.append(f"| {section} {SECTION_NAMES.get(section, '')} | "
                     f"{sum(counts[section].values())} | "
                     + " | ".join(str(counts[section].get(v, 0)) for v in VERDICTS) + " |")
    return "\n".join(lines)


def run_kosoku(url: str, outdir: Path) -> dict[str, dict]:
    """Every case against ``url``; Autobahn's index (case id -> verdicts) comes back.

    kosoku runs in a fresh interpreter: its Autobahn cases import ``autobahn`` from its
    own shim, which must not meet the real package daphne has already loaded here.
    """
    cmd = [sys.executable, "-c", "from kosoku._cli import main; main()", url,
           "--parallelism", str(PARALLEL_CASES), "--outdir", str(outdir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    index = outdir / "index.json"
    assert index.exists(), f"kosoku wrote no report (exit {done.returncode}):\n{done.stderr}"
    [cases] = json.loads(index.read_text()).values()  # one agent: daphne
    return cases


@pytest.mark.heavy
def test_autobahn_cases_do_not_regress(broker_factory: Callable[..., Broker], tmp_path: Path,
                                       record_property) -> None:
    broker = broker_factory(env=ECHO_ENV)
    started = time.monotonic()
    cases = run_kosoku(f"ws://{broker.host}:{broker.http_port}/ws/echo/",
                       tmp_path / "autobahn")
    seconds = time.monotonic() - started
    assert broker.proc is not None and broker.proc.poll() is None, "the broker died"
    assert broker.get("/healthz")["status"] == "ok"

    counts: dict[str, Counter] = {}
    for case_id, case in cases.items():
        counts.setdefault(case_id.split(".")[0], Counter())[
            verdict(case["behavior"], case["behaviorClose"])] += 1
    for section, seen in counts.items():
        record_property(f"autobahn_{section}", json.dumps(dict(seen)))
    record_property("autobahn_seconds", round(seconds, 1))
    log.warning("Autobahn: %d cases in %.1f s (reports: %s)\n%s", len(cases), seconds,
                tmp_path / "autobahn" / "index.html", table(counts))

    assert sorted(counts, key=int) == sorted(EXPECTED, key=int), "the suite's sections changed"
    for section, expected in EXPECTED.items():
        seen = counts[section]
        assert sum(seen.values()) == sum(expected.values()), \
            f"section {section} has {sum(seen.values())} cases, expected {sum(expected.values())}"
        assert seen["OK"] >= expected.get("OK", 0), f"section {section}: {dict(seen)}"
        assert sum(seen[v] for v in PASSING) >= sum(expected.get(v, 0) for v in PASSING), \
            f"section {section}: {dict(seen)}, expected at least {expected}"
    new_failures = []
    for case_id, case in cases.items():
        if (verdict(case["behavior"], case["behaviorClose"]) in ("FAILED", "ERROR")
                and case_id not in KNOWN_FAILURES):
            detail = json.loads((tmp_path / "autobahn" / case["reportfile"]).read_text())
            new_failures.append(f"{case_id}: {case['behavior']}/{case['behaviorClose']}: "
                                f"{detail['description']} {detail['result']} "
                                f"{detail['resultClose']}")
    assert not new_failures, "\n".join(new_failures)


async def test_echo_route_echoes_text_and_bytes_unchanged(
        broker_factory: Callable[..., Broker]) -> None:
    broker = broker_factory(env=ECHO_ENV)
    async with websockets.connect(f"{broker.requester_url}/ws/echo/",
                                  max_size=None) as ws:
        for message in ["héllo", b"\x00\xff" * 3, "not json {", "x" * 2**20]:
            await ws.send(message)
            assert await asyncio.wait_for(ws.recv(), 5) == message


def test_echo_route_exists_only_when_the_setting_is_on() -> None:
    router = SocketRouter()
    scope = {"type": "websocket", "path": "/ws/echo/", "server": ("127.0.0.1", 1)}
    with override_settings(BROKER={}):
        assert router.choose(scope) is None  # refused with 4404 like any unknown path
    with override_settings(BROKER={"ECHO_ROUTE": "1"}):
        assert router.choose(scope) is router.echo


@pytest.mark.xfail(strict=True, reason=(
    "daphne 4.2.3 WebSocketProtocol.handle_reply sends only truthy text/bytes "
    "(`if message.get('bytes', None):`), so an empty message is silently dropped: "
    "Autobahn 1.1.1, 1.2.1, 6.1.1, 6.1.2, 9.7.1, 9.8.1"))
async def test_daphne_sends_empty_messages(broker_factory: Callable[..., Broker]) -> None:
    broker = broker_factory(env=ECHO_ENV)
    async with websockets.connect(f"{broker.requester_url}/ws/echo/") as ws:
        await ws.send("")
        await ws.send("after")  # echoed after the empty one, unless that one is dropped
        assert await asyncio.wait_for(ws.recv(), 10) == ""
