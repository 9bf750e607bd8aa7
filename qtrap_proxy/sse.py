"""Incremental Server-Sent-Events framing for relayed streams."""

from __future__ import annotations


class SSESplitter:
    """Cuts a byte stream into complete events (without their blank-line terminator).

    CRLF line ends are normalised to LF; everything else is left byte-for-byte.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        if self._buf:
            data = self._buf + data
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        parts = data.split(b"\n\n")
        self._buf = parts.pop()
        return parts

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated (non-empty only if the stream was cut)."""
        return self._buf


def data_of(event: bytes) -> bytes | None:
    """The event's data field (multi-line data joined by LF), or None if it has none."""
    if event.startswith(b"data:") and b"\n" not in event:
        return event[5:].strip()
    lines = [ln[5:].strip() for ln in event.split(b"\n") if ln.startswith(b"data:")]
    return b"\n".join(lines) if lines else None
