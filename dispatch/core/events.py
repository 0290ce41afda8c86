"""Channel-layer messages between broker processes, as plain dicts.

Every one goes to a process's inbox (its dispatcher's channel) and is handled by
:meth:`Dispatcher.handle <dispatch.core.dispatcher.Dispatcher.handle>`, which
passes it on to a socket of its process where it is for one. Keeping their shapes
here means the sender and the receiver of each one are written against one
definition.
"""

from __future__ import annotations

from typing import Any

FORWARD = "broker.forward"  # dispatcher -> the worker's dispatcher: run this request
REPLY = "broker.reply"  # worker consumer -> dispatcher: the worker's answer
LOST = "broker.lost"  # worker consumer -> dispatcher: the worker went away mid-request
NOTIFY = "broker.notify"  # anyone -> every dispatcher (group) -> its workers: a notification
KICK = "broker.kick"  # a dispatcher -> the dispatcher holding one worker: close that socket
BATCH = "broker.batch"  # dispatcher -> dispatcher: several of the above in one layer message

#: Group every dispatcher's inbox joins, so one group_send reaches every broker process,
#: which passes it on to the workers it holds.
INBOXES_GROUP = "dispatch.inboxes"


def forward(key: str, action: str, params: dict[str, Any], reply_to: str,
            timeout: float, worker_id: str, worker: str) -> dict[str, Any]:
    """``worker`` is the channel of the worker's consumer, in the receiving process."""
    return {"type": FORWARD, "key": key, "action": action, "params": params,
            "reply_to": reply_to, "timeout": timeout, "worker_id": worker_id,
            "worker": worker}


def reply(key: str, worker_id: str, success: bool, data: Any, error: str | None,
          latency_ms: float, code: str | None = None) -> dict[str, Any]:
    """``code``: the ErrorCode of a failure (the worker's, or the broker's about it)."""
    return {"type": REPLY, "key": key, "worker_id": worker_id, "success": success,
            "data": data, "error": error, "latency_ms": latency_ms, "code": code}


def lost(key: str, worker_id: str, reason: str) -> dict[str, Any]:
    return {"type": LOST, "key": key, "worker_id": worker_id, "reason": reason}


def batch(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": BATCH, "messages": messages}


def notify(message: Any, **extra: Any) -> dict[str, Any]:
    return {"type": NOTIFY, "message": message, "extra": extra}


def kick(worker: str, reason: str, code: int = 4000) -> dict[str, Any]:
    """``worker`` is the name of the worker's consumer in the receiving process."""
    return {"type": KICK, "worker": worker, "reason": reason, "code": code}
