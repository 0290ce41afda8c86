"""The requests the broker sent, running: each command in a task of its own and a slot
of the worker's, stopped when the broker cancels it, and always answered, whatever
happens to it. One runner per worker, not per connection: its jobs outlive a
connection, and what they send goes through the :class:`~workers.relay.Relay`.

Apart from :class:`~workers.session.Session`, which reads frames and decides (with
:func:`~workers.session.react`) what to do: here the jobs are only carried out.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterable

from . import tracing
from .handlers import CommandRegistry, run_safely
from .jobs import JobContext
from .outbox import Spawn
from .protocol import CANCELLED, ErrorCode, Message, MessageType, RequestBody
from .relay import Kind, Relay, adopted_jobs

logger = logging.getLogger("workers.client")

STOPPED = "Worker stopped before the command finished"


#: The frame a broker's server takes at most, until it says (its default MAX_MESSAGE_BYTES
#: is 1 MiB).
DEFAULT_MAX_ANSWER = 4 << 20


class Runner:
    """The jobs of one connection: started, cancelled, let stream on, answered."""

    def __init__(self, registry: CommandRegistry, slots: asyncio.Semaphore, spawn: Spawn,
                 relay: Relay) -> None:
        self.registry = registry
        self.slots = slots
        self._spawn = spawn
        self.relay = relay
        #: Requests started and not yet answered (the broker hears it in heartbeats).
        self.in_flight = 0
        #: request id -> its context, its task, and whether cancelling the task stops it
        #: (an async handler; a thread cannot be interrupted)
        self.jobs: dict[str, tuple[JobContext, asyncio.Task[Any], bool]] = {}
        self._forgetting: asyncio.Task[None] | None = None  # ends the grace for adoption
        #: The longest answer the broker's server takes in one frame (four times its
        #: MAX_MESSAGE_BYTES, which it says when it takes the registration): a longer one
        #: is failed here, instead of the server cutting the connection off, and every
        #: other job's answer with it. (Over MAX_MESSAGE_BYTES, the broker fails it.)
        self.max_answer = DEFAULT_MAX_ANSWER

    def start(self, request_id: str, body: RequestBody) -> None:
        """Run it in a task of its own, so that reading frames never waits for a job.
        One it runs already (sent again after a broker restart) is not run twice: it
        is the broker's again, and its answer goes out."""
        if request_id in self.jobs:
            self._spawn(self.adopted([request_id]))
            return
        self.in_flight += 1
        ctx = JobContext(request_id, time_left=body.time_left, stream=body.stream,
                         lease=self.registry.lease_of(body.action), send=self._send_frame,
                         loop=asyncio.get_running_loop(), traceparent=body.traceparent)
        task = self._spawn(self._run(request_id, body, ctx))
        self.jobs[request_id] = (ctx, task, self.registry.runs_on_loop(body.action))

    def cancel(self, request_id: str, reason: str) -> None:
        """Stop a job: an async handler gets CancelledError now; a thread sees
        ``ctx.cancelled`` (it cannot be interrupted)."""
        job = self.jobs.get(request_id)
        if job is None:
            return
        ctx, task, on_loop = job
        logger.info("Cancelling request %s: %s", request_id, reason)
        ctx.cancel(reason)
        if on_loop:
            task.cancel()

    async def resume(self, answer: dict[str, Any], granted: bool) -> None:
        """Registered again (``answer``: the broker's): go on with the jobs of before it
        adopted; those it did not, another process may adopt within its grace (they go
        on meanwhile, what they send held); a broker that cannot adopt (not
        ``granted``) has none of them, and they stop, as they would after the grace."""
        adopted = adopted_jobs(answer) if granted else set()
        pending = (set(self.jobs) | set(self.relay.held)) - adopted if granted else set()
        self.relay.resume(adopted, pending)
        for request_id in list(self.jobs):
            if request_id not in adopted | pending:
                self.cancel(request_id, "the broker no longer has this request")
        await self.adopted(adopted)
        if pending:  # not a task the worker's stop waits for
            grace = answer.get("adopt_grace")
            if self._forgetting is not None:
                self._forgetting.cancel()
            self._forgetting = asyncio.get_running_loop().create_task(
                self._forget_pending_after(float(grace) if isinstance(grace, (int, float))
                                           else 30.0))

    async def adopted(self, request_ids: Iterable[str]) -> None:
        """These jobs are the broker's again: what they hold goes out, and their chunk
        windows start afresh (acknowledgements lost with the old connection never come)."""
        ids = list(request_ids)
        for request_id in ids:
            job = self.jobs.get(request_id)
            if job is not None:
                job[0].resumed()
        await self.relay.adopt(ids)

    async def _forget_pending_after(self, grace: float) -> None:
        """The grace for adoption ends: the jobs no process adopted stop."""
        await asyncio.sleep(grace)
        for request_id in self.relay.forget():
            self.cancel(request_id, "no broker process adopted this request")

    def acked(self, request_id: str, seq: int) -> None:
        """The broker passed chunk ``seq`` on: the job may send more."""
        job = self.jobs.get(request_id)
        if job is not None:
            job[0].acked(seq)

    async def _send_frame(self, msg: Message) -> bool:
        kind = Kind.PROGRESS if msg.type == MessageType.PROGRESS.value else Kind.CHUNK
        return await self.relay.send(str(msg.data.get("request_id")), kind, msg.to_json())

    async def _run(self, request_id: str, body: RequestBody, ctx: JobContext) -> None:
        """Run one command in its own task and answer it, whatever happens."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        span, ctx.traceparent = tracing.start_span(f"run {body.action}", body.traceparent,
                                                   "CONSUMER", command=body.action)
        outcome = None
        try:
            async with self.slots:
                outcome = await run_safely(self.registry, body.action, body.params, ctx)
        except asyncio.CancelledError:
            if ctx.cancelled:  # the broker asked: confirm, and stay up
                await ctx.settle()
                await self.answer(request_id, False, None,
                                  f"{CANCELLED}: {ctx.cancel_reason}", ErrorCode.CANCELLED)
                return
            await self.answer(request_id, False, None, STOPPED, ErrorCode.WORKER_STOPPING)
            raise
        finally:
            self.in_flight -= 1
            self.jobs.pop(request_id, None)
            tracing.end_span(span, outcome is not None and outcome.ok,
                             outcome.code.value if outcome is not None and outcome.code
                             else None)
        logger.debug("%s %s in %.1f ms%s%s", body.action, "done" if outcome.ok else "failed",
                     (loop.time() - started) * 1000, "" if outcome.ok else f": {outcome.error}",
                     f" (trace {body.traceparent})" if body.traceparent else "")
        await ctx.settle()
        await self.answer(request_id, outcome.ok, outcome.data, outcome.error, outcome.code)

    async def answer(self, request_id: str, ok: bool, data: Any, error: str | None,
                     code: ErrorCode | None) -> None:
        """Send a ``response``; a result that is not JSON becomes an error answer."""
        try:
            text = Message.response(request_id, ok, data, error, code).to_json()
        except (TypeError, ValueError) as exc:
            text = Message.response(request_id, False, None,
                                    f"Result is not JSON serializable: {exc}",
                                    ErrorCode.NOT_SERIALIZABLE).to_json()
        if len(text) > self.max_answer:
            text = Message.response(request_id, False, None,
                                    f"Worker answer too large: {len(text)} characters > "
                                    f"limit {self.max_answer}",
                                    ErrorCode.HANDLER_FAILED).to_json()
        await self.relay.send(request_id, Kind.ANSWER, text)
