"""What a worker's ``connect`` frame may claim, and what the broker makes of it.

Which commands its token allows, the caps on weight and concurrency, who owns its
worker id, the registry entry it becomes and the answer it gets; a refusal closes
the connection, saying why. The worker's link (:mod:`.links`) calls :func:`admit`
and carries on with what it returns.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import TYPE_CHECKING, Any

from workers import protocol
from workers.protocol import CloseCode, ErrorCode, Feature, Registration, quote

from .. import conf
from ..auth import Grant
from ..errors import RegistryUnavailable, WorkerIdTaken
from ..logsafe import LogBudget
from ..registry import WorkerEntry
from .events import CloseWorker, Forward
from .liveness import takeover_seconds

if TYPE_CHECKING:
    from .links import WorkerLink

log = logging.getLogger("dispatch.links")

#: Lines about workers coming and going, for the whole process: a fleet of thousands
#: dialling back after a restart gets a few lines and counts, not a line each.
FLEET_LOG = LogBudget(burst=50, refill_seconds=0.1)


@functools.lru_cache(maxsize=64)
def _shared(text: str) -> str:
    """One copy of each distinct schemas text: a fleet registers the same few, and a
    worker's entry then costs no more than before."""
    return text


def refused_commands(grant: Grant, reg: Registration) -> str | None:
    """Why this token may not register these commands (None: it may)."""
    refused = grant.refused_commands([*reg.commands, *reg.no_retry])
    if not refused:
        return None
    return ("Bad registration: Commands not allowed for this worker token: "
            + ", ".join(f"'{quote(c, 60)}'" for c in refused[:20])
            + (f" and {len(refused) - 20} more" if len(refused) > 20 else ""))


def pinned(grant: Grant, reg: Registration) -> Registration | str:
    """``reg`` as its token has it: the token's pools and labels added, its version, its
    weight within the token's cap; or why it claims what its token pins otherwise."""
    for name, value in grant.labels:
        if reg.labels.get(name, value) != value:
            return (f"Bad registration: label '{quote(name)}' is '{quote(value)}' for this "
                    f"worker token, not '{quote(reg.labels[name])}'")
    if grant.version and reg.version not in ("", grant.version):
        return (f"Bad registration: version is '{quote(grant.version)}' for this worker "
                f"token, not '{quote(reg.version)}'")
    if not (grant.labels or grant.pools or grant.version or grant.max_weight):
        return reg
    return dataclasses.replace(
        reg, labels={**reg.labels, **dict(grant.labels), **grant.pool_labels},
        version=grant.version or reg.version,
        weight=min(reg.weight, grant.max_weight or reg.weight))


def capped(reg: Registration) -> tuple[float, int]:
    """Its weight and concurrency within this broker's caps (logged when cut)."""
    weight = min(reg.weight, conf.get("MAX_WORKER_WEIGHT"))
    max_concurrency = min(reg.max_concurrency, conf.get("MAX_WORKER_CONCURRENCY"))
    if (weight, max_concurrency) != (reg.weight, reg.max_concurrency):
        FLEET_LOG.log(log, logging.WARNING, "worker %s asked for weight %s and "
                      "max_concurrency %s; capped to %s and %s (BROKER_MAX_WORKER_WEIGHT, "
                      "BROKER_MAX_WORKER_CONCURRENCY)", quote(reg.worker_id), reg.weight,
                      reg.max_concurrency, weight, max_concurrency)
    return weight, max_concurrency


def new_entry(reg: Registration, *, connection: str, session_id: str, process: str,
              inbox: str, address: str, owner: str) -> WorkerEntry:
    """The registry entry of a worker registering on this connection."""
    weight, max_concurrency = capped(reg)
    return WorkerEntry(
        worker_id=reg.worker_id, name=reg.name, connection=connection,
        commands=frozenset(reg.commands), weight=weight, max_concurrency=max_concurrency,
        process=process, address=address, session_id=session_id,
        no_retry=frozenset(reg.no_retry), inbox=inbox, owner=owner, leases=dict(reg.leases),
        labels=dict(reg.labels), version=reg.version, hedge=frozenset(reg.hedge),
        schemas=_shared(protocol.dumps(reg.schemas)) if reg.schemas else "")


def welcome(reg: Registration, entry: WorkerEntry, adopted: list[Forward]
            ) -> dict[str, Any]:
    """The data of the ``connect`` frame that answers a registration (with
    :attr:`Feature.RESUME`: which of the jobs it reported it goes on with)."""
    answer: dict[str, Any] = {
        "worker_id": entry.worker_id, "heartbeat_interval": conf.get("HEARTBEAT_INTERVAL"),
        "process": entry.process, "weight": entry.weight,
        "max_concurrency": entry.max_concurrency}
    if reg.features:
        answer["features"] = Feature.listed(reg.features)
        answer["max_message_bytes"] = conf.get("MAX_MESSAGE_BYTES")
    if reg.schemas_dropped:  # it registered; it is told what describe will not show
        answer["schemas_dropped"] = reg.schemas_dropped
    if Feature.RESUME in reg.features:
        answer["adopted"] = [f.key for f in adopted]
        # Long enough for a takeover too (a minute with the default heartbeat): the
        # process that will adopt them may be one that has yet to notice a death.
        answer["adopt_grace"] = max(conf.get("ADOPT_GRACE"), takeover_seconds())
    return answer


async def admit(link: WorkerLink, reg: Registration, msg_id: str
                ) -> tuple[WorkerEntry, list[Forward]] | None:
    """Register ``reg`` for ``link``, with the jobs of before a broker restart it reports
    (and the broker still has) adopted: their forwards are returned beside its entry.
    None if refused (the connection is then closed, the worker told why). A connection
    that held the id before is told to close."""
    refused = refused_commands(link.grant, reg)
    reg_or_refusal = pinned(link.grant, reg) if refused is None else refused
    if isinstance(reg_or_refusal, str):
        await _refuse(link, reg_or_refusal, msg_id, ErrorCode.NOT_ALLOWED,
                      CloseCode.BAD_REGISTRATION)
        return None
    reg = reg_or_refusal
    host = link.host
    entry = new_entry(reg, connection=link.connection, session_id=link.session_id,
                      process=host.process, inbox=host.inbox, address=str(link.socket.peer),
                      owner=link.grant.owner)
    try:
        if await link.recorder.recent_owner_other_than(reg.worker_id, entry.owner):
            raise WorkerIdTaken(reg.worker_id)
        adopted = await host.adopt(entry, reg.jobs if Feature.RESUME in reg.features else [])
        entry.in_flight = len(adopted)  # their slots are taken
        replaced = await host.registry.add(entry)
    except WorkerIdTaken:
        link.socket.logs.log(log, logging.WARNING, "%s tried to register worker id %s, "
                             "which belongs to another credential: refused",
                             link.socket.peer, quote(reg.worker_id))
        await _refuse(link, f"Worker id '{quote(reg.worker_id)}' belongs to another "
                      "credential: choose another id", msg_id, ErrorCode.NOT_ALLOWED,
                      CloseCode.WORKER_ID_TAKEN)
        return None
    except RegistryUnavailable as exc:  # the worker retries with backoff
        await _refuse(link, f"{protocol.BROKER_UNAVAILABLE}: {exc}", msg_id,
                      ErrorCode.BROKER_UNAVAILABLE, CloseCode.TRY_AGAIN_LATER)
        return None
    if replaced is not None and replaced.connection != link.connection:
        log.warning("worker %s reconnected; closing its previous connection",
                    quote(reg.worker_id))
        await host.deliver(replaced.inbox, CloseWorker(
            replaced.connection, "Replaced by a newer connection with the same worker_id",
            CloseCode.REPLACED))
    if reg.schemas_dropped:
        link.socket.logs.log(log, logging.WARNING, "worker %s: schemas not kept: %s",
                             quote(reg.worker_id), quote("; ".join(reg.schemas_dropped), 300))
    return entry, adopted


async def _refuse(link: WorkerLink, error: str, msg_id: str, code: ErrorCode,
                  close: CloseCode) -> None:
    await link.socket.refuse(error, msg_id, code)
    await link.socket.close(close)


async def restore(link: WorkerLink, entry: WorkerEntry) -> None:
    """Put a live worker back after the shared state lost it (Redis restarted empty)."""
    log.warning("worker %s was missing from the registry; registering it again",
                quote(entry.worker_id))
    entry.in_flight = len(link.held)
    try:
        await link.host.registry.add(entry)
    except WorkerIdTaken:  # another credential took the id meanwhile: it is theirs now
        await link.socket.refuse(f"Worker id '{quote(entry.worker_id)}' belongs to "
                                 "another credential now", None, ErrorCode.NOT_ALLOWED)
        await link.close(CloseCode.WORKER_ID_TAKEN, "worker id taken")


def announce(link: WorkerLink, reg: Registration, entry: WorkerEntry) -> None:
    """A worker registered: in its registration row, and in the log (within bounds)."""
    link.recorder.worker_connected(
        session_id=link.session_id, worker_id=reg.worker_id, name=reg.name,
        address=entry.address, process=entry.process, commands=reg.commands,
        weight=entry.weight, max_concurrency=entry.max_concurrency,
        connected_at=entry.connected_at, owner=entry.owner)
    FLEET_LOG.log(log, logging.INFO, "worker %s (%s) registered from %s: %s",
                  quote(reg.worker_id), quote(reg.name), link.socket.peer,
                  quote(", ".join(reg.commands), 300))
