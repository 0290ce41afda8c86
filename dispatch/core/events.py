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
CANCEL = "broker.cancel"  # the request's dispatcher -> the worker's: stop that request
PROGRESS = "broker.progress"  # the worker's dispatcher -> the request's: how far it got
CHUNK = "broker.chunk"  # the worker's dispatcher -> the request's: one partial result
CHUNK_ACK = "broker.chunk_ack"  # the request's dispatcher -> the worker's: chunk passed on
ASK = "broker.ask"  # anyone -> every dispatcher (group): cancel or attach a request by id
ASKED = "broker.asked"  # a dispatcher -> who asked: what it found
WATCHED = "broker.watched"  # the holder -> an attached process: an event or the answer

#: Group every dispatcher's inbox joins, so one group_send reaches every broker process,
#: which passes it on to the workers it holds.
INBOXES_GROUP = "dispatch.inboxes"


def forward(key: str, action: str, params: dict[str, Any], reply_to: str,
            timeout: float, worker_id: str, worker: str, stream: bool = False,
            traceparent: str = "") -> dict[str, Any]:
    """``worker`` is the name of the worker's connection, in the receiving process."""
    return {"type": FORWARD, "key": key, "action": action, "params": params,
            "reply_to": reply_to, "timeout": timeout, "worker_id": worker_id,
            "worker": worker, "stream": stream, "traceparent": traceparent}


def reply(key: str, worker_id: str, success: bool, data: Any, error: str | None,
          latency_ms: float, code: str | None = None) -> dict[str, Any]:
    """``code``: the ErrorCode of a failure (the worker's, or the broker's about it)."""
    return {"type": REPLY, "key": key, "worker_id": worker_id, "success": success,
            "data": data, "error": error, "latency_ms": latency_ms, "code": code}


def lost(key: str, worker_id: str, reason: str, code: str | None = None) -> dict[str, Any]:
    """``code``: the ErrorCode to answer with if it is not re-sent (default worker_lost)."""
    return {"type": LOST, "key": key, "worker_id": worker_id, "reason": reason, "code": code}


def cancel(key: str, worker: str, reason: str) -> dict[str, Any]:
    return {"type": CANCEL, "key": key, "worker": worker, "reason": reason}


def progress(key: str, worker_id: str, value: float | None, message: str | None
             ) -> dict[str, Any]:
    return {"type": PROGRESS, "key": key, "worker_id": worker_id, "progress": value,
            "message": message}


def chunk(key: str, worker_id: str, seq: int, data: Any, ack_to: str, worker: str
          ) -> dict[str, Any]:
    """``ack_to``/``worker``: the inbox and connection of the worker to acknowledge to."""
    return {"type": CHUNK, "key": key, "worker_id": worker_id, "seq": seq, "data": data,
            "ack_to": ack_to, "worker": worker}


def chunk_ack(key: str, worker: str, seq: int) -> dict[str, Any]:
    return {"type": CHUNK_ACK, "key": key, "worker": worker, "seq": seq}


def ask(what: str, owner: str | None, request_id: str, reply_to: str, token: str,
        **extra: Any) -> dict[str, Any]:
    """``what``: "cancel" or "attach"; ``owner`` None: whoever's (an operator's cancel)."""
    return {"type": ASK, "what": what, "owner": owner, "request_id": request_id,
            "reply_to": reply_to, "token": token, **extra}


def asked(token: str, found: int) -> dict[str, Any]:
    return {"type": ASKED, "token": token, "found": found}


def watched(key: str, text: str, final: bool = False,
            mergeable: bool = False) -> dict[str, Any]:
    """To a process attached to a request: ``text`` to pass on; ``final``: it is the
    answer."""
    return {"type": WATCHED, "key": key, "text": text, "final": final,
            "mergeable": mergeable}


def batch(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": BATCH, "messages": messages}


def notify(message: Any, **extra: Any) -> dict[str, Any]:
    return {"type": NOTIFY, "message": message, "extra": extra}


def kick(worker: str, reason: str, code: int = 4000) -> dict[str, Any]:
    """``worker`` is the name of the worker's consumer in the receiving process."""
    return {"type": KICK, "worker": worker, "reason": reason, "code": code}
