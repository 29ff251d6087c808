"""Test worker: the step guard undoes an optimizer step exactly, twice in a row (reused copy buffers).

    unicron-run --nproc-per-node 1 tests/workers/guard_roundtrip.py <Megatron flags> --unicron
        [--unicron-snapshot-interval 1]

Trains two iterations, then for two more: copy before the step (as every --unicron iteration does),
step, undo, and step again. The redone iteration must leave every parameter and optimizer tensor
bit-identical to the first attempt, and the undo must restore the pre-step values. With snapshots every
iteration the guard takes its copy from the newest snapshot's slot (it counts the tensors it took).
Prints ``GUARD OK <iterations> kept=<tensors from the slot>`` on success.
"""

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from examples.gpt.pretrain_gpt import forward_step  # noqa: E402
from megatron_unicron.megatron.args import parse_args, resolve_world  # noqa: E402
from megatron_unicron.megatron.guard import _optimizer_tensors  # noqa: E402
from megatron_unicron.megatron.train import Trainer, WorkerEnv  # noqa: E402


def state(trainer: Trainer) -> list[torch.Tensor]:
    bundle = trainer.generation.bundle
    return [t.detach().clone() for t in (*_optimizer_tensors(bundle.optimizer), *bundle.gpt.parameters())]


def main() -> int:
    env = WorkerEnv.from_environ()
    args = resolve_world(parse_args(sys.argv[1:]), env.world_size)
    import megatron.core  # noqa: F401

    from megatron_unicron.megatron import cpu

    cpu.apply()
    from megatron_unicron.snapshot.service import SnapshotService

    trainer = Trainer(args, forward_step, env)
    trainer.start_generation(0, env.rank, env.world_size, 1, 1)
    trainer.ensure_datasets()
    snapshots = None
    if args.unicron.snapshot_interval:
        directory = Path(tempfile.mkdtemp(prefix="guard_roundtrip_"))
        snapshots = SnapshotService(trainer, directory=directory, job=env.job, node="node0", launch_rank=0)
    for _ in range(2):
        trainer.train_step()
    kept = 0
    for _ in range(2):
        before = state(trainer)
        first = trainer.train_step()
        after = state(trainer)
        if snapshots is not None:
            snapshots.quiesce()  # as a transition does before it aligns the state
            kept = trainer.guard.kept_tensors
        assert trainer.guard.can_undo_step(trainer.progress.iteration - 1)
        trainer.guard.undo_step(trainer.generation.bundle, trainer.progress)
        restored = state(trainer)
        assert all(torch.equal(a, b) for a, b in zip(restored, before, strict=True)), "undo is not exact"
        trainer.guard.rewind_in_flight()
        again = trainer.train_step()
        assert again.lm_loss == first.lm_loss and again.iteration == first.iteration
        assert all(torch.equal(a, b) for a, b in zip(state(trainer), after, strict=True)), "redo differs"
    print(f"GUARD OK {trainer.progress.iteration} kept={kept}", flush=True)
    if snapshots is not None:
        snapshots.close()
    trainer.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
