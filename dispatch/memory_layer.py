"""Channels' in-memory layer (the embedded default), with its expiry sweep rationed.

``InMemoryChannelLayer`` sweeps every channel and every group member for expired
entries on each ``receive`` and ``group_send``. Every worker consumer receives from
the layer (broadcasts, takeovers), so with N workers connected, each message costs
O(N), and N workers registering cost O(N^2): one broker process saturated with
about 3,000 of 10,000 workers registered. Here the sweep runs at most once a
second; messages expire after a minute, so it is as good as ever.
"""

from __future__ import annotations

import time

from channels import layers

#: Seconds between two sweeps for expired messages and group members.
SWEEP_EVERY = 1.0


class InMemoryChannelLayer(layers.InMemoryChannelLayer):
    """The channel layer of a single broker process (settings pick it without REDIS_URL)."""

    _swept = float("-inf")

    def _clean_expired(self) -> None:
        now = time.monotonic()
        if now - self._swept >= SWEEP_EVERY:
            self._swept = now
            super()._clean_expired()
