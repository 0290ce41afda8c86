"""JSON text in and out, and frames that carry several envelopes at once.

Both sides of both sockets parse and write JSON only through here, so what counts
as a frame (an object, or a batch array of them) and how big integers survive are
decided once. orjson is used when installed; a worker machine need not have it.
"""

from __future__ import annotations

import json
import re
import sys
from contextvars import ContextVar
from typing import Any, Callable, Iterator, TypeVar

from .errors import ProtocolError
from .fields import kind_of

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
T = TypeVar("T")
#: A relay keeps integers of more digits than this as they came (:func:`relayed`): all
#: that orjson cannot write (beyond 64 bits), so that what a relay writes never needs
#: the stdlib encoder, which cannot write a kept one.
RELAY_DIGITS = 19
_relaying: ContextVar[bool] = ContextVar("relaying", default=False)
#: What the stdlib parser raises on bad input: ValueError also covers integers over
#: 4,300 digits, RecursionError deep nesting.
STDLIB_DECODE_ERRORS: tuple[type[Exception], ...] = (ValueError, RecursionError)

try:  # orjson is several times faster; the worker side must not require it.
    import orjson

    def dumps(obj: Any) -> str:
        """Serialize to compact JSON text.

        What orjson refuses but JSON can carry (integers beyond 64 bits, as
        ``calculate`` can produce, or non-string keys) goes through the stdlib
        encoder, so an answer does not depend on whether orjson is installed.
        """
        return dumps_fast(obj) or _encoder.encode(obj)

    def dumps_fast(obj: Any) -> str | None:
        """:func:`dumps` if it is quick; None when only the stdlib encoder can write it
        (integers beyond 64 bits cost it quadratic time: 57 ms for a megabyte of
        4,300-digit ones), so a server can write that one beside its event loop."""
        try:
            return orjson.dumps(obj).decode()
        except orjson.JSONEncodeError:
            return None

    #: An integer outside [-2**63, 2**64 - 1] (20 digits, or 19 after a minus) would come
    #: out of orjson as a float (2**64 + 1 -> 1.8446744073709552e+19); the stdlib parser
    #: keeps it exact. A run of 19 digits is looked for by mapping every digit to "0"
    #: and everything else to " " (bytes.translate: ~0.5 us a frame; a regex took 7).
    #: Digits in strings count too: that costs only speed.
    _DIGITS = bytes(48 if 48 <= i <= 57 else 32 for i in range(256))
    _RUN = b"0" * 19

    def _long_digits(text: str | bytes) -> bool:
        raw = text.encode() if isinstance(text, str) else text
        return _RUN in raw.translate(_DIGITS)

    def _no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")  # as orjson refuses NaN and Infinity

    def _int_or_verbatim(digits: str) -> Any:
        length = len(digits.lstrip("-"))
        if length > sys.get_int_max_str_digits():  # as converting would refuse it
            raise ValueError(f"an integer of {length} digits is over the limit "
                             f"({sys.get_int_max_str_digits()})")
        return int(digits) if length <= RELAY_DIGITS else orjson.Fragment(digits)

    def _loads(text: str | bytes) -> Any:
        """orjson, unless the text may hold an integer it cannot keep exact."""
        if _long_digits(text):
            return json.loads(text, parse_constant=_no_constants,
                              parse_int=_int_or_verbatim if _relaying.get() else None)
        return orjson.loads(text)

    _DecodeError: tuple[type[Exception], ...] = (orjson.JSONDecodeError,
                                                 *STDLIB_DECODE_ERRORS)
except ImportError:  # pragma: no cover - exercised on worker machines
    def dumps(obj: Any) -> str:
        """Serialize to compact JSON text."""
        return _encoder.encode(obj)

    def dumps_fast(obj: Any) -> str | None:
        """Without orjson nothing is quick: None (the caller writes it as it can)."""
        return None

    def _loads(text: str | bytes) -> Any:
        return json.loads(text)

    _DecodeError = STDLIB_DECODE_ERRORS


def loads(text: str | bytes) -> Any:
    """Parse JSON text as the frame parsers do, raising what the parser raises.

    For this package's own round trips (a schema default); looks ``_loads`` up at
    each call, so a test that swaps the parser here swaps it everywhere.
    """
    return _loads(text)


def relayed(parse: Callable[[str], T], text: str) -> T:
    """``parse(text)`` as a relay (the broker) parses: an integer of over
    :data:`RELAY_DIGITS` digits is kept as its text, and written back as it came
    (an orjson Fragment), instead of converted. Converting costs quadratic time: a
    megabyte of 4,300-digit integers took 21 ms to parse and 57 ms to write again, and
    a relay only passes them on. (Without orjson, as on a worker machine, it is parse.)"""
    token = _relaying.set(True)
    try:
        return parse(text)
    finally:
        _relaying.reset(token)


def parsed_size(text: str) -> int:
    """About what ``text`` costs in memory once parsed (bytes), for limits that must hold
    in memory, not in text: an empty object is 2 characters and 64 bytes parsed, a
    one-letter string 3 and ~50. Containers and strings are counted (three scans in C,
    ~1 ms a megabyte); numbers are not, so arrays of numbers may cost up to 8 times
    this (floats), everything else about it or less."""
    return len(text) + 64 * (text.count("{") + text.count("[")) + 28 * text.count('"')


def loads_object(text: str | bytes) -> dict[str, Any]:
    """Parse JSON text that must hold an object."""
    try:
        obj = _loads(text)
    except _DecodeError as exc:
        raise ProtocolError(f"Malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"Expected a JSON object, got {kind_of(obj)}")
    return obj


#: Envelopes in one batch frame (:attr:`~workers.protocol.Feature.BATCH`), and the size
#: a sender keeps a batch frame under (a larger envelope still goes alone, in its own
#: frame).
MAX_BATCH = 256
BATCH_BYTES = 64 * 1024


def loads_frames(text: str | bytes) -> list[dict[str, Any]]:
    """One frame's envelopes: an object, or a batch (a JSON array of objects)."""
    try:
        obj = _loads(text)
    except _DecodeError as exc:
        raise ProtocolError(f"Malformed JSON: {exc}") from None
    if isinstance(obj, dict):
        return [obj]
    if not isinstance(obj, list) or not obj:
        raise ProtocolError(f"Expected a JSON object or a non-empty array of them, got "
                            f"{kind_of(obj) if obj != [] else 'an empty array'}")
    if len(obj) > MAX_BATCH:
        raise ProtocolError(f"Batch of {len(obj)} frames (at most {MAX_BATCH})")
    return obj


def is_batch(text: str | bytes) -> bool:
    """Whether a frame is a batch: a JSON array (JSON may begin with whitespace)."""
    head = text[:1]
    if head.isspace():
        head = text.lstrip()[:1]
    return head in ("[", b"[")


def batch_frames(texts: list[str], limit: int = BATCH_BYTES) -> Iterator[str]:
    """Encoded envelopes joined into as few frames as ``limit`` allows, in order."""

    def joined(run: list[str]) -> str:
        return run[0] if len(run) == 1 else "[" + ",".join(run) + "]"

    run: list[str] = []
    size = 0
    for text in texts:
        if run and (size + len(text) + 1 > limit or len(run) == MAX_BATCH):
            yield joined(run)
            run, size = [], 0
        run.append(text)
        size += len(text) + 1
    if run:
        yield joined(run)


#: How far into a frame too large to parse :func:`peek` looks.
PEEK_CHARS = 4096


def peek(text: str, name: str) -> str | None:
    """The string field ``name`` of a JSON frame too large to parse, if it is in its
    first PEEK_CHARS (clients write ids first): refusing a frame must cost no parse of
    megabytes. Any occurrence of the name counts: for error messages, and as a cheap
    guess at a frame's kind."""
    found = re.search(rf'"{re.escape(name)}"\s*:\s*"((?:[^"\\]|\\.){{0,256}})"',
                      text[:PEEK_CHARS])
    if found is None:
        return None
    try:
        value = json.loads(f'"{found.group(1)}"')
    except ValueError:
        return None
    return value if isinstance(value, str) else None
