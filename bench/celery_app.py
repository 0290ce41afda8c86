"""The Celery peer: an echo task over the local Redis, set up as a Django user would.

Celery is what a Django user would otherwise pick to hand a job to a worker and wait
for its answer, so the bench measures its round trip on the same machine: the load
generator calls ``echo.apply_async((payload,))`` and then ``AsyncResult.get()``; one
``celery worker`` process runs the task, which returns the payload unchanged (as the
bench worker echoes). Redis is both the broker (kombu's Redis transport) and the
result backend (whose ``get()`` waits on pub/sub, not by polling).

Settings, each the fair choice for a round trip rather than the default where they
differ: ``task_acks_late=True`` (the job is acked once done, the durable setting our
job store is compared with), results kept (``task_ignore_result=False``), JSON both
ways, no task events, ``worker_prefetch_multiplier=1`` (with late acks a worker holds
at most its pool's size of reserved jobs; more only queues them in the worker instead
of in Redis), a producer pool as large as the requests in flight (else callers wait
for one of the default 10 connections), and ``result_backend_thread_safe=True``: the
threads of a process (the callers, the worker's pool) share one result backend, so
one pub/sub connection on which one thread at a time waits and hands the others
their results, instead of a backend and connections per thread (5-10% more req/s at
64 in flight here, the same at 1). Only from Celery 5.7, whose Redis result consumer
serialises its pub/sub; before it, threads sharing one race on the socket (celery
issue 6335), so older versions keep Celery's default of a backend per thread. The
worker runs with ``--without-gossip --without-mingle --without-heartbeat``: none of
that traffic is part of a job.

Every key (queues, unacked set, results, pub/sub channels) starts with a prefix of the
run's own (kombu and the result backend's ``global_keyprefix``), in a Redis database
of its own (``--celery-redis-db``): the harness deletes those keys afterwards and
flushes nothing.

``python -m bench.worker --proto celery --url redis://127.0.0.1:6379/14 --subject Q``
runs the worker (:func:`run_worker`); ``python -m bench.loadgen --proto celery ...``
the callers (:func:`bench.loadgen.celery_main`).
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import Any

import celery
from celery import Celery, signals

TASK = "bench.echo"


def shared_backend_is_safe() -> bool:
    """True from Celery 5.7: its Redis result consumer locks its pub/sub connection."""
    return tuple(celery.VERSION[:2]) >= (5, 7)


def make_app(url: str, prefix: str, queue: str, pool_limit: int = 10) -> Celery:
    """A Celery app whose only task is :data:`TASK` (echo), on Redis at ``url``."""
    app = Celery("bench_celery", broker=url, backend=url, set_as_current=False)
    keys = {"global_keyprefix": prefix}
    app.conf.update(
        task_acks_late=True,
        task_ignore_result=False,
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_default_queue=queue,
        task_send_sent_event=False,
        worker_send_task_events=False,
        worker_prefetch_multiplier=1,
        worker_redirect_stdouts=False,  # stdout carries READY to the harness
        worker_hijack_root_logger=False,
        broker_pool_limit=max(10, pool_limit),
        broker_connection_retry_on_startup=False,
        broker_transport_options=dict(keys),
        result_backend_transport_options=dict(keys),
        result_expires=600,  # the harness deletes them anyway
        result_backend_thread_safe=shared_backend_is_safe(),
    )

    @app.task(name=TASK)
    def echo(payload: str) -> str:
        return payload

    return app


def run_worker(args: argparse.Namespace) -> int:
    """``celery worker`` in this process (so the harness's worker pid is Celery's own);
    prints ``READY 1`` once it consumes."""
    pool, _, concurrency = args.celery_pool.partition(":")
    app = make_app(args.url, args.celery_prefix, args.subject)

    def ready(**_: Any) -> None:
        os.write(1, b"READY 1\n")

    signals.worker_ready.connect(ready, weak=False)
    # The bench worker's --max-seconds: a warm shutdown, as SIGTERM from the harness.
    timer = threading.Timer(args.max_seconds, os.kill, (os.getpid(), signal.SIGTERM))
    timer.daemon = True
    timer.start()
    argv = ["worker", "-P", pool, "-c", concurrency or "1", "-Q", args.subject,
            "-l", "warning", "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", f"{args.prefix}@bench"]
    app.worker_main(argv)
    return 0
