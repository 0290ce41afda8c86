"""Where the broker is, and how a client shows its token: for both clients and CLIs."""

from __future__ import annotations

import os


def auth_headers(token: str | None) -> dict[str, str] | None:
    """The handshake header that carries a worker token or API key, if there is one."""
    return {"Authorization": f"Bearer {token}"} if token else None


def default_token() -> str | None:
    """``$BROKER_TOKEN``: lets scripts keep the token out of the command line."""
    return os.environ.get("BROKER_TOKEN") or None


def broker_url(host: str, port: int, path: str = "/") -> str:
    """``ws://host:port/``, with brackets around an IPv6 address."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"ws://{host}:{port}{path}"


def is_url(text: str) -> bool:
    """Whether a command-line argument is a full WebSocket URL rather than a host name."""
    return text.startswith(("ws://", "wss://"))
