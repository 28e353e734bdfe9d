"""A file the kit depends on (an environment file, known_hosts, an ssh config, an identity file),
read with the reason it cannot be, in words each caller puts in its own error."""

from __future__ import annotations

from pathlib import Path


class Unreadable(Exception):
    """Why a file cannot be read: `kind` is "missing", "directory" or "other"; `reason` in words
    ("does not exist", "is a directory", "cannot read it: ...", "line N: not UTF-8 text (byte 0x..)")."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def read_bytes(path: Path | str, limit: int = -1) -> bytes:
    """The file's bytes (its first `limit`, when given)."""
    try:
        with Path(path).open("rb") as f:
            return f.read(limit)
    except FileNotFoundError:
        raise Unreadable("missing", "does not exist") from None
    except IsADirectoryError:
        raise Unreadable("directory", "is a directory") from None
    except OSError as exc:
        raise Unreadable("other", f"cannot read it: {exc.strerror or exc}") from None


def read_text(path: Path | str) -> str:
    """The file as UTF-8 text; a byte that is not names its line."""
    raw = read_bytes(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise Unreadable("other", f"line {line}: not UTF-8 text (byte {raw[exc.start]:#04x})") from None
