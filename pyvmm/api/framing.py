"""Splitting a QMP byte stream into JSON texts.

QMP does not need newlines between messages (QEMU's JSON streamer counts
braces), so neither does this: it tracks nesting outside strings and cuts
a text where its top-level object or array closes. Input that is not one
(stray bytes, a text past MAX_MESSAGE bytes or MAX_DEPTH levels) yields a
ValueError in the output and resynchronises at the next newline, so one
bad message costs one error reply, never the connection or the VM."""

from __future__ import annotations

MAX_MESSAGE = 1 << 20   # bytes in one JSON text
MAX_DEPTH = 256         # nesting levels (json.loads recurses per level)
_WHITESPACE = b" \t\r\n"


class JsonSplitter:
    def __init__(self) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._skipping = False    # after an error: dropping bytes up to the next newline

    def __repr__(self) -> str:
        return f"JsonSplitter(buffered={len(self._buf)}, depth={self._depth}, skipping={self._skipping})"

    def feed(self, data: bytes) -> list[str | ValueError]:
        """The complete texts (and errors) `data` finishes, in order."""
        out: list[str | ValueError] = []
        for byte in data:
            if self._skipping:
                if byte == 0x0A:
                    self._skipping = False
                continue
            if self._depth == 0:
                if byte in _WHITESPACE:
                    continue
                if byte not in b"{[":
                    out.append(self._fail("JSON parse error, expected an object"))
                    continue
            self._buf.append(byte)
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif byte == 0x5C:      # backslash
                    self._escape = True
                elif byte == 0x22:
                    self._in_string = False
            elif byte == 0x22:
                self._in_string = True
            elif byte in b"{[":
                self._depth += 1
                if self._depth > MAX_DEPTH:
                    out.append(self._fail(f"JSON nesting deeper than {MAX_DEPTH} levels"))
                    continue
            elif byte in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    text = bytes(self._buf)
                    self._buf.clear()
                    try:
                        out.append(text.decode("utf-8"))
                    except UnicodeDecodeError:
                        out.append(ValueError("JSON parse error, invalid UTF-8"))
                    continue
            if len(self._buf) > MAX_MESSAGE:
                out.append(self._fail(f"JSON message longer than {MAX_MESSAGE} bytes"))
        return out

    def _fail(self, message: str) -> ValueError:
        self._buf.clear()
        self._depth = 0
        self._in_string = self._escape = False
        self._skipping = True
        return ValueError(message)
