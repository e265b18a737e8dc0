"""C2SP transparency-log checkpoints (https://c2sp.org/tlog-checkpoint): a log's tree head.

The note text of a checkpoint is at least three non-empty, newline-terminated lines::

    <origin>
    <tree size, ASCII decimal, no leading zeroes unless it is 0>
    <base64 of the 32-byte RFC 6962 root hash>
    [<extension line>...]

It is signed as a c2sp.org/signed-note (see :mod:`ledger.note`). The origin only has to be
non-empty (a schema-less URL without spaces or ``+`` is a SHOULD that clients MUST NOT assume);
like every note it has no control characters. Written by hand from the C2SP text: there is no
maintained Python library for it. The tree size is capped at 2**64 - 1, the range every
implementation (uint64) can represent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from errors import InputError
from ledger.note import NoteError, b64decode, b64encode, check_note_chars

HASH_SIZE = 32
MAX_SIZE = 2**64 - 1
_DECIMAL = re.compile(r"0|[1-9][0-9]*")


class CheckpointError(InputError):
    """A checkpoint text that does not follow c2sp.org/tlog-checkpoint."""


def parse_decimal(text: str, what: str, maximum: int = MAX_SIZE) -> int:
    """ASCII decimal without leading zeroes (``0`` itself allowed), at most ``maximum``."""
    if not _DECIMAL.fullmatch(text) or len(text) > 20:
        raise CheckpointError(f"{what} {text!r} is not a decimal number without leading zeroes")
    value = int(text)
    if value > maximum:
        raise CheckpointError(f"{what} {value} exceeds {maximum}")
    return value


def _check_line(line: str, what: str) -> None:
    if not line:
        raise CheckpointError(f"the {what} is empty")
    if "\n" in line:
        raise CheckpointError(f"the {what} {line!r} contains a newline")
    try:
        check_note_chars(line, f"the {what}")
    except NoteError as exc:
        raise CheckpointError(str(exc)) from exc


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_line(self.origin, "origin")
        if isinstance(self.size, bool) or not isinstance(self.size, int) \
                or not 0 <= self.size <= MAX_SIZE:
            raise CheckpointError(f"tree size {self.size!r} is not an integer in [0, 2**64)")
        if len(self.root) != HASH_SIZE:
            raise CheckpointError(f"the root hash has {len(self.root)} bytes, not {HASH_SIZE}")
        if not isinstance(self.extensions, tuple):
            object.__setattr__(self, "extensions", tuple(self.extensions))
        for ext in self.extensions:
            _check_line(ext, "extension line")

    def text(self) -> str:
        """The note text: ``origin\\nsize\\nbase64(root)\\n`` then the extension lines."""
        lines = [self.origin, str(self.size), b64encode(self.root), *self.extensions]
        return "".join(line + "\n" for line in lines)


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse a checkpoint note *text* (``Note.text``, without the blank line and signatures)."""
    if not text.endswith("\n"):
        raise CheckpointError("the checkpoint text does not end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise CheckpointError(f"a checkpoint has at least 3 lines, this one {len(lines)}")
    origin, size, root, *extensions = lines
    _check_line(origin, "origin")
    try:
        root_hash = b64decode(root, "the root hash")
    except NoteError as exc:
        raise CheckpointError(str(exc)) from exc
    return Checkpoint(origin, parse_decimal(size, "tree size"), root_hash, tuple(extensions))
