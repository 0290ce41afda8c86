"""The bench's Django task (``python -m bench.tasks``): returns when it started."""

import time

from dispatch.tasks import task


@task()
def stamp() -> float:
    return time.time()
