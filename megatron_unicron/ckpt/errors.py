"""The one exception type of the checkpoint converter.

Every refusal (unknown version, missing or duplicated shards, args inconsistent with the shards, a layout
that does not divide heads or layers, foreign pickled code, ...) is a ``CheckpointError`` whose message is
one line naming what is wrong and, where there is one, what to do. The CLI prints that line and exits
non-zero without a traceback.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint the converter cannot read or write as asked; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class VerificationError(CheckpointError):
    """The written checkpoint did not read back as written (nothing was left in place)."""
