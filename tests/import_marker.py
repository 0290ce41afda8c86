"""A module with a side effect on import (tests/test_tasks.py: no peer can make a
fleetworker or a broker import it): it writes $IMPORT_MARKER."""

import os

if os.environ.get("IMPORT_MARKER"):
    with open(os.environ["IMPORT_MARKER"], "a") as marker:
        marker.write(f"imported in {os.getpid()}\n")


def anything() -> None:
    pass
