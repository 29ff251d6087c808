"""Entry point of a training script: Megatron-LM's ``pretrain()`` for megatron-core GPT.

``pretrain(forward_step_func)`` parses Megatron-LM flags (and ``--yaml-cfg``), checks them against the
world size the launcher gives, applies the CPU patch when CUDA is unavailable, builds generation 0 of the
job, resumes from ``--load`` and trains. Bad input ends the process with one line and exit code 2.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence

from megatron_unicron.errors import UnicronError
from megatron_unicron.megatron.train import ForwardStepFunc, Trainer, WorkerEnv

logger = logging.getLogger("megatron_unicron")


def configure_logging(rank: int) -> None:
    """INFO from rank 0, warnings from the others, each line tagged with the rank."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("megatron").setLevel(logging.WARNING)
    # Megatron reports on every rank that it falls back from apex/TE to torch code, and that mock data
    # is not cached: expected on a CPU machine, noise in every log.
    for text in ("Apex is not installed", "Transformer Engine", "CUDA_DEVICE_MAX_CONNECTIONS", "full scope"):
        warnings.filterwarnings("ignore", message=f".*{text}", category=UserWarning)
    logging.getLogger("megatron.core.datasets.gpt_dataset").setLevel(logging.ERROR)


def pretrain(forward_step_func: ForwardStepFunc, argv: Sequence[str] | None = None) -> int:
    """Train a GPT model as Megatron-LM's pretrain_gpt.py does; returns the process exit code."""
    from megatron_unicron.megatron.args import parse_args, resolve_world

    env = WorkerEnv.from_environ()
    prog = os.path.basename(sys.argv[0]) if sys.argv else "pretrain_gpt.py"
    try:
        args = resolve_world(parse_args(argv, prog=prog), env.world_size)
    except UnicronError as error:
        if env.rank == 0:
            print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        return 2
    configure_logging(env.rank)
    import megatron.core  # noqa: F401  (imported before patching, so every module gets patched)

    from megatron_unicron.megatron import cpu

    cpu.apply()
    try:
        trainer = Trainer(args, forward_step_func, env)
        trainer.start_generation(
            0, env.rank, env.world_size, args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        )
        trainer.load_checkpoint()
        trainer.train()
        trainer.end_generation()
    except UnicronError as error:
        if env.rank == 0:
            print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0
