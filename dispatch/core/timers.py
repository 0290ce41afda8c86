"""A request's timers: when its next step comes (its deadline, its hedge, its worker's
grace after a restart, its deferred time), and stopping them once it is answered.

Each timer calls one step of the request table (or of the recovery) with the
request's key, and the dispatcher performs what that step returns.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from .recovery import Recovery
from .requests import Action, Arm, ArmHedge, AwaitWorker, Defer, Request, RequestTable


class Timers:
    """The timer actions of one dispatcher."""

    def __init__(self, table: RequestTable, recovery: Recovery,
                 perform: Callable[[list[Action]], Awaitable[None]]) -> None:
        self.table, self.recovery, self._perform = table, recovery, perform

    def handlers(self) -> dict[type[Any], Callable[[Any], Awaitable[None]]]:
        return {Arm: self.arm, ArmHedge: self.arm_hedge, AwaitWorker: self.await_worker,
                Defer: self.defer}

    async def arm(self, action: Arm) -> None:
        request = action.request
        request.timer = asyncio.get_running_loop().call_at(
            request.deadline, self._fired, self.table.expired, request.key)

    async def arm_hedge(self, action: ArmHedge) -> None:
        action.request.hedge_timer = asyncio.get_running_loop().call_later(
            action.delay, self._fired, self.table.hedge_due, action.request.key)

    async def await_worker(self, action: AwaitWorker) -> None:
        action.request.wait_timer = asyncio.get_running_loop().call_later(
            action.grace, self._fired, self.recovery.not_back, action.request.key)

    async def defer(self, action: Defer) -> None:
        loop = asyncio.get_running_loop()
        action.request.wait_timer = loop.call_later(  # (a deferred one awaits no worker)
            action.delay, self._fired, lambda key: self.table.due(key, loop.time()),
            action.request.key)

    def _fired(self, step: Callable[[str], list[Action]], key: str) -> None:
        actions = step(key)
        if actions:
            asyncio.ensure_future(self._perform(actions))


def disarm(request: Request) -> None:
    """Stop a request's timers (it is answered)."""
    for timer in (request.timer, request.hedge_timer, request.wait_timer):
        if timer is not None:
            timer.cancel()
    request.timer = request.hedge_timer = request.wait_timer = None
