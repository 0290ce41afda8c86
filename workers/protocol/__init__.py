"""Wire formats of both sockets, as plain data.

Nothing here does I/O: a frame goes in as text and comes out as an object, or the
other way round. The broker imports this package too, so the worker side and the
broker can never disagree about what a frame means.

Two formats live here:

* the **envelope** spoken on the worker socket (and by the seed's console):
  ``{"type", "msg_id", "timestamp", "data"}`` (:mod:`.envelope`, :mod:`.bodies`,
  :mod:`.registration`, :mod:`.schemas`);
* the **requester API** spoken on the requester socket:
  ``{"request_id", "command", "data"}`` answered by
  ``{"request_id", "success", "data", "error", "processed_by"}`` (:mod:`.api`).

Both share the JSON codec (:mod:`.codec`), the field checks (:mod:`.fields`,
:mod:`.labels`, :mod:`.traceparent`), error and close codes (:mod:`.codes`), ids
(:mod:`.ids`) and :func:`quote` (:mod:`.text`). Every public name is imported here:
``from workers.protocol import X`` is how the rest of the code reads them.
"""

from __future__ import annotations

from .api import (PRIORITIES, ROUTE_FIELDS, ApiRequest, ApiResponse, Attach, Cancel, event,
                  requester_frame, requester_object)
from .bodies import (CHUNK_WINDOW, MAX_PROGRESS_MESSAGE, ChunkBody, ProgressBody, RequestBody,
                     ResponseBody)
from .codec import (BATCH_BYTES, MAX_BATCH, STDLIB_DECODE_ERRORS, batch_frames, dumps,
                    dumps_fast, is_batch, loads_frames, loads_object, parsed_size, peek,
                    relayed)
from .codes import (ALL_BUSY, ANSWER_TOO_LARGE, ANSWERED_ELSEWHERE, BROKER_OVERLOADED,
                    BROKER_UNAVAILABLE, CANCELLED, LEASE_EXPIRED, NO_WORKERS, SHUTTING_DOWN,
                    TIMEOUT, WORKER_ANSWER_CODES, WORKER_LOST, CloseCode, ErrorCode)
from .envelope import Message, MessageType, batch_messages
from .errors import ProtocolError
from .fields import MAX_COMMANDS, MAX_ID_CHARS, MAX_NAME_CHARS, MAX_PROTOCOL_TIMEOUT
from .ids import new_id, random_id
from .labels import (MAX_LABEL_CHARS, MAX_LABELS, POOL_NAME, label, parse_labels,
                     pool_label)
from .registration import MAX_JOBS, WORKER_ID, Feature, Registration
from .schemas import (MAX_PARAMS, MAX_SCHEMA_CHARS, MAX_SCHEMA_REASONS, MAX_SCHEMAS_BYTES,
                      SchemaError, parse_schema, parse_schemas)
from .text import quote
from .traceparent import parse_traceparent

__all__ = [
    "ALL_BUSY", "ANSWERED_ELSEWHERE", "ANSWER_TOO_LARGE", "BATCH_BYTES", "BROKER_OVERLOADED",
    "BROKER_UNAVAILABLE", "CANCELLED", "CHUNK_WINDOW", "LEASE_EXPIRED", "MAX_BATCH", "MAX_COMMANDS",
    "MAX_ID_CHARS", "MAX_LABELS", "MAX_LABEL_CHARS", "MAX_NAME_CHARS", "MAX_PARAMS",
    "MAX_PROGRESS_MESSAGE", "MAX_PROTOCOL_TIMEOUT", "MAX_SCHEMAS_BYTES", "MAX_SCHEMA_CHARS",
    "MAX_SCHEMA_REASONS", "NO_WORKERS", "POOL_NAME", "PRIORITIES", "ROUTE_FIELDS",
    "SHUTTING_DOWN",
    "MAX_JOBS", "STDLIB_DECODE_ERRORS", "TIMEOUT", "WORKER_ANSWER_CODES", "WORKER_ID",
    "WORKER_LOST",
    "ApiRequest", "ApiResponse", "Attach", "Cancel", "ChunkBody", "CloseCode", "ErrorCode",
    "Feature", "Message", "MessageType", "ProgressBody", "ProtocolError", "Registration",
    "RequestBody", "ResponseBody", "SchemaError", "batch_frames", "batch_messages", "dumps",
    "is_batch",
    "dumps_fast",
    "event", "label", "loads_frames", "loads_object", "peek", "new_id", "parse_labels",
    "parsed_size", "relayed",
    "parse_schema", "pool_label", "parse_schemas", "parse_traceparent", "quote", "random_id",
    "requester_frame",
    "requester_object",
]
