"""py-spy on the broker process during a scenario's measured window, and a summary of it.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``),
which speedscope and flamegraph.pl read; :func:`summarize` turns them into tables:
time by area (daphne/Twisted, Channels, our dispatch code, JSON, ...), the
functions where samples end (self time), and those on the stack (inclusive time).
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import python


def py_spy_path() -> str | None:
    import os

    return shutil.which("py-spy", path=os.path.dirname(python())) or shutil.which("py-spy")


class PySpy:
    """Callable given to the runner: ``profile(pids, seconds)`` records each pid.

    One ``py-spy record`` per pid (a 2-process system has two brokers), written to
    ``<prefix>-<i>.txt``; :attr:`outputs` lists them, :attr:`error` says what failed.
    """

    def __init__(self, prefix: Path, rate: int = 100) -> None:
        self.prefix = prefix
        self.rate = rate
        self.procs: list[tuple[subprocess.Popen[bytes], Path, Any]] = []
        self.outputs: list[Path] = []
        self.error = ""

    def __call__(self, pids: list[int], seconds: float) -> "PySpy":
        exe = py_spy_path()
        if exe is None:
            self.error = "py-spy is not installed"
            return self
        for i, pid in enumerate(pids):
            out = Path(f"{self.prefix}-{i}.txt")
            log = open(out.with_suffix(".log"), "wb")
            # Blocking mode (the default): --nonblocking lost over half the samples here.
            proc = subprocess.Popen(
                [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
                 "--rate", str(self.rate), "--format", "raw", "--output", str(out)],
                stdout=log, stderr=subprocess.STDOUT)
            self.procs.append((proc, out, log))
        return self

    def finish(self) -> None:
        for proc, out, log in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            log.close()
            if proc.returncode == 0 and out.exists():
                packed = out.with_name(out.name + ".gz")  # ~20x smaller to keep in git
                packed.write_bytes(gzip.compress(out.read_bytes()))
                out.unlink()
                self.outputs.append(packed)
            else:
                self.error += out.with_suffix(".log").read_text(errors="replace")[-300:]
            out.with_suffix(".log").unlink(missing_ok=True)


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

AREAS = [  # first match wins: (area, prefixes of the path py-spy prints)
    ("dispatch (our broker)", ("dispatch/",)),
    ("workers.protocol (parse/serialize)", ("workers/",)),
    ("channels (consumers, layer)", ("channels/", "channels_redis/")),
    ("asgiref", ("asgiref/",)),
    ("daphne", ("daphne/",)),
    ("autobahn (websocket framing)", ("autobahn/", "txaio/")),
    ("twisted (reactor, transports)", ("twisted/",)),
    ("django", ("django/",)),
    ("json", ("json/",)),
    ("asyncio (event loop)", ("asyncio/",)),
    ("logging", ("logging/",)),
    ("uuid / random", ("uuid.py", "random.py")),
    ("threads (history writer etc.)", ("threading.py", "concurrent/")),
    ("redis", ("redis/",)),
]


#: Leaves that are a thread waiting for work, which py-spy's idle detection misses.
IDLE_LEAVES = {("_worker", "concurrent/futures/thread.py"), ("Condition.wait", "threading.py"),
               ("Event.wait", "threading.py")}
ROOTS = {"Handle._run", "BaseEventLoop._run_once", "_WorkItem.run", "Thread.run"}


def area_of(file: str) -> str:
    for area, prefixes in AREAS:
        if file.startswith(prefixes) or any(f"/{p}" in file for p in prefixes):
            return area
    return "other (stdlib, C, ...)"


def parse_frame(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), ""
    file = m.group("file")
    short = file.split("site-packages/")[-1].split("/work/main/")[-1]
    return m.group("func"), short


def summarize(raw: Path, top: int = 20) -> str:
    """Markdown tables from a py-spy raw (collapsed) file."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = idle = 0
    text = (gzip.decompress(raw.read_bytes()).decode(errors="replace")
            if raw.suffix == ".gz" else raw.read_text(errors="replace"))
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [parse_frame(f) for f in stack.split(";") if f]
        # py-spy puts the thread name first ("process 123:..." / "thread ..."): drop non-frames
        frames = [f for f in frames if f[1]]
        if not frames:
            continue
        if (frames[-1][0], frames[-1][1]) in IDLE_LEAVES:  # py-spy took a wait for work
            idle += n
            total -= n
            continue
        threads["other threads (history writer, executors)" if frames[0][0].startswith(
            "Thread._bootstrap") else "main thread (event loop)"] += n
        func, file = frames[-1]
        self_time[f"{func} ({file})"] += n
        areas[area_of(file)] += n
        # Inclusive time below the event loop / thread pool: the frames above them are
        # on every stack and say nothing.
        cut = max((i for i, (fn, _) in enumerate(frames) if fn in ROOTS), default=-1)
        for key in {f"{fn} ({fl})" for fn, fl in frames[cut + 1:]}:
            inclusive[key] += n
    if not total:
        return "_py-spy recorded no samples_\n"

    def pct(n: int) -> str:
        return f"{100 * n / total:.1f}%"

    out = [f"{total} samples (idle time is not sampled; {idle} more of pool threads waiting "
           "for work were dropped).\n", "| thread | share |",
           "| --- | ---: |"]
    out += [f"| {t} | {pct(n)} |" for t, n in threads.most_common()]
    out += ["", "**Self time by area** (where the samples end)\n",
           "| area | share |", "| --- | ---: |"]
    out += [f"| {a} | {pct(n)} |" for a, n in areas.most_common()]
    out += ["", f"**Top {top} functions by self time**\n", "| function | self |", "| --- | ---: |"]
    out += [f"| `{k}` | {pct(n)} |" for k, n in self_time.most_common(top)]
    out += ["", f"**Top {top} functions by inclusive time** (on the stack, below the event "
            "loop's callback runner)\n",
            "| function | inclusive |", "| --- | ---: |"]
    out += [f"| `{k}` | {pct(n)} |" for k, n in inclusive.most_common(top)]
    return "\n".join(out) + "\n"
