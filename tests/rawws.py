"""A WebSocket client with no manners, for attack tests.

Library clients are too polite to test a gate: they stop sending once a close
frame arrives, they answer pings, they read what they are sent. This one does
only what the test says: it can keep sending after the broker closed, never read,
or send frames of any size, over a plain blocking socket.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
from dataclasses import dataclass

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


@dataclass
class Frame:
    opcode: int
    payload: bytes

    @property
    def text(self) -> str:
        return self.payload.decode()

    @property
    def close_code(self) -> int | None:
        if self.opcode != CLOSE or len(self.payload) < 2:
            return None
        return struct.unpack("!H", self.payload[:2])[0]


def encode(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame."""
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 2**16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    # XOR by whole 8-byte words: masking megabytes a byte at a time in Python is slow.
    key = int.from_bytes(mask * 2, "big")
    padded = payload + b"\0" * (-n % 8)
    words = struct.unpack(f"!{len(padded) // 8}Q", padded)
    masked = struct.pack(f"!{len(words)}Q", *(w ^ key for w in words))[:n]
    return head + mask + masked


class RawClient:
    """``RawClient(host, port, path, headers)``: the handshake is done on construction.

    ``status`` is the HTTP status of the handshake (101 when upgraded).
    ``rcvbuf`` shrinks the kernel's receive buffer, so a client that never reads
    makes the server's send buffer fill sooner; ``source`` is the address to send from.
    """

    def __init__(self, host: str, port: int, path: str = "/", headers: dict[str, str] | None = None,
                 *, timeout: float = 5.0, rcvbuf: int | None = None,
                 source: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if source is not None:  # another loopback address, e.g. 127.0.0.2
            self.sock.bind((source, 0))
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self._buffer = b""
        head = self._read_until(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            self._buffer += chunk
        head, self._buffer = self._buffer.split(marker, 1)
        return head

    def _read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buffer)))
            if not chunk:
                raise ConnectionError("connection closed")
            self._buffer += chunk
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def send(self, opcode: int, payload: bytes) -> bool:
        """Send one frame; False once the server has dropped the TCP connection."""
        try:
            self.sock.sendall(encode(opcode, payload))
        except OSError:
            return False
        return True

    def send_text(self, text: str) -> bool:
        return self.send(TEXT, text.encode())

    def send_close(self, code: int = 1000) -> bool:
        return self.send(CLOSE, struct.pack("!H", code))

    def recv(self) -> Frame:
        """The next frame (raises ``socket.timeout``/``ConnectionError``)."""
        b0, b1 = self._read_exactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read_exactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read_exactly(8))[0]
        return Frame(b0 & 0x0F, self._read_exactly(n))

    def frames_until_close(self, limit: int = 10_000) -> list[Frame]:
        """Read until a close frame (included), the end of the stream, or a timeout."""
        frames: list[Frame] = []
        try:
            while len(frames) < limit:
                frames.append(self.recv())
                if frames[-1].opcode == CLOSE:
                    break
        except (OSError, ConnectionError):
            pass
        return frames

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
