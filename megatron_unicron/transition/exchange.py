"""Executes a transfer plan with point-to-point messages, verifying every received piece.

For every (source, destination) pair of the plan the source packs its pieces, in plan order, into one
byte buffer and sends it with a CRC-32C checksum; the destination checks the checksum before unpacking.
Pieces a rank serves to itself are plain copies. A buffer that fails its checksum is not unpacked; its
source is listed in :attr:`ExchangeStats.corrupt_sources`, so the caller can exclude that source and
fall back to the next rung of the ladder.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_unicron.checksum import crc32c
from megatron_unicron.transition.flat_plan import FlatPiece
from megatron_unicron.transition.transfer_plan import Box, Piece

AnyPiece = Piece | FlatPiece


Tamper = Callable[[torch.Tensor], None]  # alters a payload after its checksum (fault injection)


@dataclass(frozen=True)
class ExchangeStats:
    """What one rank did in an exchange."""

    sent_bytes: int
    received_bytes: int
    local_bytes: int
    messages: int
    seconds: float
    corrupt_sources: tuple[int, ...] = ()  # ranks whose buffers failed their checksum (not unpacked)


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(start, stop) for start, stop in box)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(-1).view(torch.uint8)


def checksum(buffer: torch.Tensor) -> int:
    """CRC-32C of a uint8 CPU tensor (the wire format's checksum), read in place."""
    return crc32c(buffer.contiguous().numpy()) if buffer.numel() else 0


def _read(piece: AnyPiece, sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """The piece's values at its source, flattened."""
    source = sources[piece.src_index]
    if isinstance(piece, FlatPiece):
        flat = source.reshape(-1)
        return torch.cat([flat[start : start + length] for start, _, length in piece.runs])
    return source[_slices(piece.src_slices)].reshape(-1)


def _write(piece: AnyPiece, targets: Sequence[torch.Tensor], values: torch.Tensor) -> None:
    """Put the piece's (flattened) values at its destination."""
    target = targets[piece.dst_index]
    if isinstance(piece, FlatPiece):
        flat = target.view(-1)
        offset = 0
        for _, start, length in piece.runs:
            flat[start : start + length].copy_(values[offset : offset + length])
            offset += length
        return
    view = target[_slices(piece.dst_slices)]
    view.copy_(values.view(view.shape))


def _pack(pieces: Sequence[AnyPiece], sources: Sequence[torch.Tensor]) -> torch.Tensor:
    parts = [_as_bytes(_read(p, sources).cpu()) for p in pieces]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def _unpack(buffer: torch.Tensor, pieces: Sequence[AnyPiece], targets: Sequence[torch.Tensor]) -> None:
    offset = 0
    for piece in pieces:
        dtype = targets[piece.dst_index].dtype
        nbytes = piece.numel * targets[piece.dst_index].element_size()
        _write(piece, targets, buffer[offset : offset + nbytes].view(dtype))
        offset += nbytes


def _piece_bytes(pieces: Sequence[AnyPiece], targets: Sequence[torch.Tensor]) -> int:
    return sum(p.numel * targets[p.dst_index].element_size() for p in pieces)


def pairs(pieces: Sequence[AnyPiece]) -> list[tuple[int, int]]:
    """Distinct (source, destination) pairs that exchange data between processes."""
    return sorted({(p.src_rank, p.dst_rank) for p in pieces if not p.is_local})


def execute(
    pieces: Sequence[AnyPiece],
    rank: int,
    sources: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    *,
    channel: dist.ProcessGroup | None,
    timeout: timedelta = timedelta(seconds=60),
    tamper: Tamper | None = None,
) -> ExchangeStats:
    """Run this rank's part of a plan's ``pieces``: ``sources`` by holding index, ``targets`` by need index.

    ``channel`` is a process group whose ranks are the plan's ranks (it may be a private gloo group
    that is not registered with torch.distributed, so ranks outside the training world can serve);
    it may be None when the plan has no transfer between processes. A receiver sizes each buffer from
    its own targets; a header message (tag 0) carries the checksum and length of the payload (tag 1).
    ``tamper`` alters every payload this rank sends after its checksum was taken (fault injection).
    """
    started = time.perf_counter()
    local_bytes = 0
    for piece in pieces:
        if piece.is_local and piece.dst_rank == rank:
            _write(piece, targets, _read(piece, sources))
            local_bytes += piece.numel * targets[piece.dst_index].element_size()
    works = []
    receives: list[tuple[int, torch.Tensor, torch.Tensor, list[AnyPiece]]] = []
    sent = 0
    for src, dst in pairs(pieces):
        if rank not in (src, dst):
            continue
        if channel is None:
            raise RuntimeError("the transfer plan moves data between processes but no channel was given")
        if src == rank:
            payload = _pack([p for p in pieces if (p.src_rank, p.dst_rank) == (src, dst)], sources)
            header = torch.tensor([checksum(payload), payload.numel()], dtype=torch.int64)
            if tamper is not None:
                tamper(payload)
            works.append(channel.send([header], dst, 0))
            works.append(channel.send([payload], dst, 1))
            sent += payload.numel()
        else:
            incoming = [p for p in pieces if (p.src_rank, p.dst_rank) == (src, dst)]
            header = torch.empty(2, dtype=torch.int64)
            buffer = torch.empty(_piece_bytes(incoming, targets), dtype=torch.uint8)
            works.append(channel.recv([header], src, 0))
            works.append(channel.recv([buffer], src, 1))
            receives.append((src, header, buffer, incoming))
    for work in works:
        work.wait(timeout)
    received = 0
    corrupt = []
    for src, header, buffer, incoming in receives:
        expected_sum, expected_len = int(header[0]), int(header[1])
        if expected_len != buffer.numel() or checksum(buffer) != expected_sum:
            corrupt.append(src)
            continue
        _unpack(buffer, incoming, targets)
        received += buffer.numel()
    return ExchangeStats(
        sent_bytes=sent,
        received_bytes=received,
        local_bytes=local_bytes,
        messages=len(works),
        seconds=time.perf_counter() - started,
        corrupt_sources=tuple(corrupt),
    )
