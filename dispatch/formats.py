"""Numbers as people read them, alike in the admin, the dashboard's page and the
management commands (the dashboard's script follows the same rules)."""

from __future__ import annotations


def duration(ms: float | None) -> str:
    """Milliseconds as people read them: 0.42 ms, 41.2 ms, 412 ms, 2.3 s, 4 min 05 s.

    Three significant figures are all a measured latency carries; the sixteen digits
    of a float only hide its size.
    """
    if ms is None:
        return "-"
    sign, ms = ("-" if ms < 0 else ""), abs(ms)
    if ms < 9.995:
        text = f"{ms:.2f} ms"
    elif ms < 99.95:
        text = f"{ms:.1f} ms"
    elif ms < 999.5:
        text = f"{ms:.0f} ms"
    elif ms < 59_950:
        text = f"{ms / 1000:.1f} s"
    else:
        seconds = round(ms / 1000)
        text = f"{seconds // 60} min {seconds % 60:02d} s" if seconds < 3600 else \
            f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return sign + text


def percent(rate: float) -> str:
    """A share as 0%, 0.4%, 12%: a tenth of a percent matters only below ten."""
    return f"{rate * 100:.1f}%" if 0 < rate < 0.0995 else f"{rate:.0%}"
