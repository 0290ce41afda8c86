"""The one exception of the protocol, in a module of its own because every other
module here raises it (the parser, the field checks, the envelope, the requester API).
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """A frame that breaks the protocol.

    ``str(error)`` is meant for the peer: it says what is wrong in words a
    developer can act on. ``request_id`` is kept when it could be read, so the
    error answer can still be matched to its request.
    """

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
