"""Datasets a warm spare builds before it becomes a worker, so that a restart does not wait for them.

A restarted worker builds its train/valid/test datasets before it joins the survivors (megatron's
builder must not meet a collective of a running job). For the tiny CPU model that is most of the time
the survivors wait for it: megatron-core builds the sample and shuffle indices of every split. The
datasets depend on the command line only (``data.py``: not on the layout, not on the rank), so the
node's warm spare, which already holds the worker's imports, builds them too while it waits
(:func:`prepare_from_argv`, called by ``spare.py`` for scripts built on this package). The worker it
becomes takes them (:func:`take`) when it asks for exactly the same datasets, and builds its own
otherwise.

The cache is this process's: one entry at most, taken once.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from megatron_unicron.megatron import data

if TYPE_CHECKING:
    from megatron_unicron.megatron.args import MegatronArgs

logger = logging.getLogger(__name__)

DEFAULT_SPLIT = "969, 30, 1"


@dataclass(frozen=True)
class DatasetRequest:
    """Everything ``data.build_datasets`` builds from; the tokenizer by its settings."""

    data_path: tuple[str, ...] | None
    mock: bool
    split: str
    seq_length: int
    seed: int
    train_samples: int
    valid_samples: int
    test_samples: int
    data_cache_path: str | None
    tokenizer: tuple[str, int | None, str | None, str | None]
    """(type, vocab size, vocab file, merge file), files as absolute paths."""
    cwd: str
    """Relative data paths resolve against it."""

    @classmethod
    def for_args(cls, args: MegatronArgs) -> DatasetRequest:
        """What a trainer with ``args`` (global batch size resolved) builds."""
        assert args.global_batch_size is not None, "resolve_world() must fill the global batch size"
        eval_runs = (args.train_iters // args.eval_interval + 1) if args.eval_interval else 0
        vocab, merges = (os.path.abspath(f) if f else None for f in (args.vocab_file, args.merge_file))
        return cls(
            data_path=tuple(args.data_path) if args.data_path is not None else None,
            mock=args.mock_data,
            split=args.split or DEFAULT_SPLIT,
            seq_length=args.seq_length,
            seed=args.seed,
            train_samples=args.train_iters * args.global_batch_size,
            valid_samples=eval_runs * args.eval_iters * args.global_batch_size,
            test_samples=args.eval_iters * args.global_batch_size,
            data_cache_path=args.data_cache_path,
            tokenizer=(args.tokenizer_type, args.vocab_size, vocab, merges),
            cwd=os.getcwd(),
        )

    def build(self, tokenizer: data.Tokenizer) -> data.Datasets:
        """Build the datasets (through megatron-core's builder)."""
        kwargs = asdict(self)
        for settings_only in ("tokenizer", "cwd"):
            del kwargs[settings_only]
        kwargs["data_path"] = list(self.data_path) if self.data_path is not None else None
        return data.build_datasets(tokenizer=tokenizer, **kwargs)


_prepared: dict[DatasetRequest, data.Datasets] = {}


def take(request: DatasetRequest) -> data.Datasets | None:
    """The datasets prepared for exactly ``request`` (once), else None; drops any other entry."""
    found = _prepared.pop(request, None)
    _prepared.clear()
    return found


def waiting() -> int:
    """How many prepared datasets wait to be taken (0 or 1)."""
    return len(_prepared)


def prepare(request: DatasetRequest, tokenizer: data.Tokenizer) -> None:
    """Build the datasets of ``request`` now, for a worker of this process to take later."""
    _prepared.clear()
    _prepared[request] = request.build(tokenizer)


def prepare_from_argv(argv: Sequence[str], world_size: int) -> bool:
    """In a warm spare: build the datasets a worker run with ``argv`` will ask for; whether it did.

    Quiet whatever happens (a bad command line is the worker's to report, where it belongs): argparse's
    messages and megatron's cache notices are swallowed, and any failure leaves nothing prepared.
    """
    from megatron_unicron.megatron.args import parse_args, resolve_world

    dataset_logger = logging.getLogger("megatron.core.datasets")
    level = dataset_logger.level
    dataset_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            args = resolve_world(parse_args(list(argv)), world_size)
            tokenizer = data.build_tokenizer(
                args.tokenizer_type, vocab_size=args.vocab_size, vocab_file=args.vocab_file,
                merge_file=args.merge_file,
            )  # fmt: skip
            prepare(DatasetRequest.for_args(args), tokenizer)
        return True
    except (Exception, SystemExit) as error:  # noqa: BLE001 (the worker meets and reports it itself)
        logger.debug("the warm spare prepared no datasets: %s", error)
        _prepared.clear()
        return False
    finally:
        dataset_logger.setLevel(level)
