"""A client for the running broker's HTTP control API.

Management commands act *through* the broker rather than on its state directly, so
they behave the same against the embedded single process as against a cluster.
Standard library only: the control API is a handful of JSON calls, and an operator's
machine should not need more than Django to run them.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

#: Seconds added to a request's own timeout for the HTTP wait, so the broker's
#: "Worker response timeout" answer arrives before our socket gives up.
TIMEOUT_MARGIN = 10.0


class ControlError(Exception):
    """Base of the errors :class:`BrokerClient` raises."""


class BrokerUnreachable(ControlError):
    """No answer at all: refused, unknown host, timed out, connection dropped."""

    def __init__(self, url: str, reason: object) -> None:
        self.url = url
        self.reason = reason
        super().__init__(
            f"Cannot reach the broker at {url}: {reason}. "
            "Is it running? (python manage.py runbroker)"
        )


class BrokerError(ControlError):
    """The broker answered with an error status; the message is its ``error`` text."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def default_base_url() -> str:
    """``BROKER_URL`` from the environment, else the local broker's HTTP port."""
    url = os.environ.get("BROKER_URL")
    if url:
        return url
    from .. import conf  # here, not at import: the client must work without settings

    return f"http://127.0.0.1:{conf.get('HTTP_PORT')}"


def default_token() -> str:
    return os.environ.get("BROKER_API_TOKEN", "")


class BrokerClient:
    """Calls the broker's control API; one method per endpoint."""

    def __init__(self, base_url: str, token: str = "", timeout: float = 40.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def health(self) -> dict[str, Any]:
        """``/healthz``: status, worker count, process name, pending requests."""
        return self._request("GET", "/healthz")

    def workers(self) -> list[dict[str, Any]]:
        """The online workers with their load, as the shared registry has them."""
        return self._request("GET", "/api/workers").get("workers", [])

    def commands(self, command: str | None = None) -> dict[str, Any]:
        """``{"commands": [...]}``: every command offered now (or only ``command``), by
        which workers, with its parameters as the workers described them."""
        query = "?" + urllib.parse.urlencode({"command": command}) if command else ""
        return self._request("GET", "/api/commands" + query)

    def broadcast(self, message: Any) -> int:
        """Send a notification to every online worker; returns how many got it."""
        return int(self._request("POST", "/api/broadcast", {"message": message})["sent_to"])

    def drain(self, worker_id: str, draining: bool = True) -> None:
        """Take a worker out of rotation (or put it back); its work in hand finishes."""
        self._request("POST", "/api/drain", {"worker_id": worker_id, "draining": draining})

    def send(self, worker_id: str, action: str, params: dict[str, Any] | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        """Run ``action`` on one given worker; returns the requester-style response."""
        body = {"worker_id": worker_id, "action": action, "params": params or {}}
        return self._request("POST", "/api/send", _with_timeout(body, timeout),
                             wait=timeout)

    def cancel(self, request_id: str) -> int:
        """Cancel a running request by its id, whoever sent it; how many were found."""
        return int(self._request("POST", "/api/cancel", {"request_id": request_id})
                   ["cancelled"])

    def call(self, command: str, data: dict[str, Any] | None = None,
             timeout: float | None = None, **routing: Any) -> dict[str, Any]:
        """Run ``command`` on whichever worker the broker picks, as a requester would
        (``routing``: ``select``, ``affinity``, as in a request frame)."""
        body = {"command": command, "data": data or {}, **routing}
        return self._request("POST", "/api/call", _with_timeout(body, timeout), wait=timeout)

    def explain(self, command: str, **routing: Any) -> dict[str, Any]:
        """How a request for ``command`` would be routed now (nothing is sent)."""
        return self._request("POST", "/api/explain", {"command": command, **routing})

    # ----------------------------------------------------------------- transport

    def _request(self, method: str, path: str, body: Any = None,
                 wait: float | None = None) -> Any:
        url = self.base_url + path
        request = urllib.request.Request(url, method=method, headers=self._headers(body))
        if body is not None:
            request.data = json.dumps(body).encode()
        http_timeout = max(self.timeout, wait + TIMEOUT_MARGIN) if wait else self.timeout
        try:
            with urllib.request.urlopen(request, timeout=http_timeout) as response:
                return _decode(response.status, response.read())
        except urllib.error.HTTPError as exc:  # before URLError: it is one
            raise BrokerError(exc.code, _error_text(exc)) from None
        except urllib.error.URLError as exc:
            raise BrokerUnreachable(self.base_url, exc.reason) from None
        except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, not HTTP
            raise BrokerUnreachable(self.base_url, str(exc) or type(exc).__name__) from None

    def _headers(self, body: Any) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers


def _with_timeout(body: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    if timeout is not None:
        body["timeout"] = timeout
    return body


def _decode(status: int, raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise BrokerError(status, f"Broker sent a response that is not JSON: {raw[:200]!r}")


def _error_text(exc: urllib.error.HTTPError) -> str:
    """The server's ``{"error": ...}`` if it sent one, else the status line."""
    try:
        raw = exc.read()
    except OSError:
        raw = b""
    try:
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        error = None
    return str(error) if error else f"HTTP {exc.code} {exc.reason}"
