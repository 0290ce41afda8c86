"""The broker's own errors: one root, so a caller can tell ours from a bug.

Each names a condition the broker plans for and answers (a request gets an error
answer, a registration is refused, a layer message is counted as lost); anything
else that rises is a defect and is logged with its traceback.
"""

from __future__ import annotations


class DispatchError(Exception):
    """Root of the errors the broker raises on purpose."""


class RegistryUnavailable(DispatchError, ConnectionError):
    """The shared registry cannot be reached (Redis down): requests get an error answer."""


class LayerUnavailable(DispatchError, ConnectionError):
    """The channel layer cannot take or give messages now (its backend is down)."""


class LayerFull(LayerUnavailable):
    """A process's inbox on the layer is at capacity (``ChannelFull``): it is overloaded."""


class WorkerIdTaken(DispatchError):
    """The worker id is registered, or was lately, by another credential.

    An id stays with its owner while it is registered and for
    ``WORKER_ID_CLAIM_SECONDS`` after it leaves, so that another credential cannot
    slip in while the worker reconnects.
    """
