"""The training loop: Megatron-LM's ``pretrain`` for GPT on megatron-core, one generation at a time.

A :class:`Trainer` owns what survives a change of parallel layout (arguments, datasets, the training
progress) and rebuilds what does not (process groups, model, optimizer, scheduler) per *generation*.
Each iteration consumes one global batch: the same global samples in the same order whatever the
data-parallel degree, so a run's loss curve does not depend on its layout beyond fp32 reduction order.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from megatron_unicron.events import Phase
from megatron_unicron.megatron import data, groups, prepared
from megatron_unicron.megatron.groups import ParallelCoords
from megatron_unicron.megatron.guard import StepGuard
from megatron_unicron.megatron.model import ModelBundle, build_model_bundle
from megatron_unicron.megatron.phases import PhaseTracker
from megatron_unicron.megatron.progress import IterationStats, TrainingReporter, validation_lines
from megatron_unicron.store import TCPStoreBackend, connect_store

if TYPE_CHECKING:
    from megatron_unicron.megatron.args import MegatronArgs
    from megatron_unicron.snapshot.service import SnapshotService

logger = logging.getLogger(__name__)

ForwardStepFunc = Callable[[Iterator[dict[str, Any]] | None, Any], tuple[torch.Tensor, Callable[..., Any]]]
T = TypeVar("T")
Attempt = Callable[[Callable[[], T]], T]


@dataclass(frozen=True)
class WorkerEnv:
    """What the launcher tells a worker through its environment (torchrun's variables)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    job: str
    restart_count: int

    @classmethod
    def from_environ(cls, environ: os._Environ[str] | dict[str, str] | None = None) -> WorkerEnv:
        """Read RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (as torchrun sets them)."""
        env = os.environ if environ is None else environ
        return cls(
            rank=int(env.get("RANK", "0")),
            world_size=int(env.get("WORLD_SIZE", "1")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            job=env.get("UNICRON_JOB") or env.get("TORCHELASTIC_RUN_ID") or "job",
            restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
        )


@dataclass
class TrainingProgress:
    """Where training stands; carried over every change of layout and saved in checkpoints."""

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    floating_point_operations: float = 0.0


@dataclass
class Generation:
    """The process groups and model state of one layout."""

    number: int
    coords: ParallelCoords
    bundle: ModelBundle
    extra: dict[str, Any] = field(default_factory=dict)


def gpt_flops_per_iteration(args: MegatronArgs, padded_vocab_size: int) -> float:
    """Model FLOPs of one iteration (forward + backward), Megatron's dense-GPT formula."""
    assert args.global_batch_size is not None
    tokens = args.global_batch_size * args.seq_length
    h, layers, ffn = args.hidden_size, args.num_layers, args.ffn_hidden_size
    kv = args.kv_channels * args.num_query_groups
    q = args.kv_channels * args.num_attention_heads
    gated = 2 if args.swiglu else 1
    per_layer = 2 * h * (q + 2 * kv) + 2 * q * h + 4 * q * args.seq_length + 2 * h * ffn * (gated + 1)
    return 3.0 * tokens * (layers * per_layer + 2 * h * padded_vocab_size)


class Trainer:
    """Megatron GPT pretraining on megatron-core for one job, across generations of layouts."""

    def __init__(self, args: MegatronArgs, forward_step_func: ForwardStepFunc, env: WorkerEnv) -> None:
        assert args.global_batch_size is not None, "resolve_world() must fill the global batch size"
        self.args = args
        self.phases = PhaseTracker()
        self.forward_step_func = self.phases.wrap_forward_step(forward_step_func)
        self.env = env
        self.timeout = timedelta(minutes=args.distributed_timeout_minutes)
        # With --unicron, adaptive timeouts detect hangs; the groups' own timeout only bounds how long an
        # abandoned operation lingers. Without it, Megatron's --distributed-timeout-minutes.
        detection = args.unicron.detection
        self.op_timeout = timedelta(seconds=detection.pg_timeout_s) if args.unicron.enabled else self.timeout
        self.store: TCPStoreBackend = connect_store(env.master_addr, env.master_port, self.timeout)
        self.progress = TrainingProgress()
        self.tokenizer = data.build_tokenizer(
            args.tokenizer_type,
            vocab_size=args.vocab_size,
            vocab_file=args.vocab_file,
            merge_file=args.merge_file,
        )
        self.padded_vocab_size = self.vocab_size_for(args.tensor_model_parallel_size)
        self.datasets: data.Datasets | None = None
        self.generation: Generation | None = None
        self.reporter: TrainingReporter | None = None
        # The last iterations' results, so that a process that becomes the reporting rank in a transition
        # can log an iteration whose reporting process died before logging it (``unreported``).
        self.recent_stats: deque[IterationStats] = deque(maxlen=2)
        self.unreported: IterationStats | None = None
        self.guard = StepGuard(enabled=args.unicron.enabled)
        self.build_seconds: dict[str, float] = {}  # of the last generation built: groups, model
        # Hooks of other parts (e.g. in-memory snapshots): before the optimizer step of an iteration,
        # and after an iteration committed (the step returned and progress advanced).
        self.before_step_hooks: list[Callable[[], None]] = []
        self.after_commit_hooks: list[Callable[[], None]] = []
        self.snapshots: SnapshotService | None = None  # in-memory snapshots, set by their service
        self._heap_frozen = False
        # Alters what this process sends in its next transition (the fault injector's ``corrupt``).
        self.transfer_tamper: Callable[[torch.Tensor], None] | None = None

    def vocab_size_for(self, tp: int) -> int:
        """Megatron-LM's padded vocabulary for a TP degree (the padding depends on TP)."""
        return data.padded_vocab_size(self.tokenizer.vocab_size, self.args.make_vocab_size_divisible_by, tp)

    # ------------------------------------------------------------------ generations
    def store_prefix(self, generation: int) -> str:
        """Store prefix of one generation's world group (a new prefix per generation and attempt)."""
        return f"/unicron/{self.env.job}/attempt{self.env.restart_count}/gen{generation}/world"

    def start_generation(self, number: int, rank: int, world_size: int, tp: int, pp: int) -> Generation:
        """Create the world and megatron groups, then the model, optimizer and scheduler for (TP, PP)."""
        started = time.perf_counter()
        if not self._heap_frozen:
            # What lives before the first generation (torch, megatron-core and the other imports: most
            # of the heap) lives to the end of the process: out of the cyclic collector's sight, a full
            # collection walks only what came later. Without it, full collections pause every rank of a
            # step for 0.1-0.3 s at once on this machine, which the adaptive timeouts of the peers they
            # stall see as a hang. Only once: a later generation's objects, and a broken one's held
            # while the next forms, must stay collectable.
            gc.freeze()
            self._heap_frozen = True
        store = self.store.c10d_store
        groups.init_world(store, self.store_prefix(number), rank, world_size, self.timeout, self.op_timeout)
        # With --unicron, DP replicas of a stage go to different nodes (a lost node keeps a copy).
        pipelines_first = self.args.use_tp_pp_dp_mapping or self.args.unicron.enabled
        order = groups.PIPELINES_FIRST_ORDER if pipelines_first else groups.DEFAULT_ORDER
        coords = groups.init_model_parallel(tp, pp, self.op_timeout, order)
        groups.seed_everything(self.args.seed, coords)
        built_groups = time.perf_counter()
        self.padded_vocab_size = self.vocab_size_for(tp)
        bundle = build_model_bundle(self.args, coords, self.padded_vocab_size)
        bundle.config.finalize_model_grads_func = self.phases.wrap(
            Phase.ALLREDUCE, bundle.config.finalize_model_grads_func
        )
        self.phases.install_p2p_mark()
        self.generation = Generation(number=number, coords=coords, bundle=bundle)
        self.build_seconds = {
            "groups": built_groups - started,
            "model": time.perf_counter() - built_groups,
        }
        self.ensure_datasets()
        return self.generation

    def end_generation(self) -> None:
        """Tear a healthy generation down: model state first, then every process group."""
        self.leave_generation(broken=False)

    def finish(self) -> None:
        """End of the job: tear down, and wait until abandoned groups of broken generations are released."""
        self.end_generation()
        groups.release_drained(self.op_timeout, wait=True)
        self.store.close()

    def leave_generation(self, *, broken: bool) -> None:
        """Drop the current layout's model state and groups; a broken world is abandoned without blocking."""
        if self.generation is not None:
            self.generation.bundle.release()
            self.generation = None
        self.guard.forget_layout()
        if broken:
            groups.abandon_world()
        else:
            groups.destroy_world()
        # Model, DDP and optimizer reference each other (and the groups) in cycles: collect them now,
        # or the groups' sockets stay open until some later collection. Abandoned broken groups stay in
        # the graveyard until the job ends (``finish``): gloo serves every group of a process from one
        # transport event loop, and destroying old groups while a later generation runs is suspected of
        # the intermittent stalls and closed connections seen after reattempts.
        gc.collect()

    def ensure_datasets(self) -> None:
        """Build the (layout-independent) datasets once per process.

        megatron's builder synchronises over the world group when there is one: a process that joins a
        running job builds them before joining (it then reads the index cache the first start wrote).
        """
        if self.datasets is None:
            self.datasets = self._build_datasets()

    def _build_datasets(self) -> data.Datasets:
        request = prepared.DatasetRequest.for_args(self.args)
        ready = prepared.take(request)  # built by the warm spare this process was, if it was one
        if ready is not None:
            logger.info("unicron: datasets prepared by the warm spare taken over")
            return ready
        return request.build(self.tokenizer)

    # ------------------------------------------------------------------ one iteration
    def _microbatches(self, dataset: Any, consumed: int) -> list[dict[str, Any]] | None:
        gen = self._current()
        if not (gen.coords.is_first_stage or gen.coords.is_last_stage):
            return None  # middle pipeline stages receive activations, not data
        assert self.args.global_batch_size is not None
        return data.microbatches_for_rank(
            dataset,
            consumed_samples=consumed,
            global_batch_size=self.args.global_batch_size,
            micro_batch_size=self.args.micro_batch_size,
            dp_rank=gen.coords.dp_rank,
            dp_size=gen.coords.dp_size,
        )

    def num_microbatches(self) -> int:
        """Micro-batches per data-parallel rank in one global batch, for the current layout."""
        assert self.args.global_batch_size is not None
        return self.args.global_batch_size // (self.args.micro_batch_size * self._current().coords.dp_size)

    def _current(self) -> Generation:
        assert self.generation is not None, "no generation started"
        return self.generation

    def _forward_backward(self, batches: list[dict[str, Any]] | None, forward_only: bool) -> list[Any]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        bundle = self._current().bundle
        return list(
            get_forward_backward_func()(
                forward_step_func=self.forward_step_func,
                data_iterator=iter(batches) if batches is not None else None,
                model=bundle.model,
                num_microbatches=self.num_microbatches(),
                seq_length=self.args.seq_length,
                micro_batch_size=self.args.micro_batch_size,
                forward_only=forward_only,
            )
        )

    def _reduce_loss(self, losses: list[Any]) -> float:
        """Megatron-LM's reported loss: Σ loss / Σ tokens over the global batch (last stage only)."""
        from megatron.core import parallel_state as ps

        if not losses:
            return float("nan")
        total = torch.stack([d["lm loss"].view(-1).double() for d in losses]).sum(dim=0)
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        return float(total[0] / total[1])

    def train_step(self) -> IterationStats:
        """One iteration: forward/backward over the global batch, optimizer step, LR schedule."""
        assert self.datasets is not None and self.args.global_batch_size is not None
        started = time.perf_counter()
        self.phases.iteration = self.progress.iteration + 1
        self.guard.begin_iteration()
        current = self._current()
        bundle, coords = current.bundle, current.coords
        batches = self._microbatches(self.datasets.train, self.progress.consumed_train_samples)
        for chunk in bundle.model:
            chunk.zero_grad_buffer()
        bundle.optimizer.zero_grad()
        losses = self._forward_backward(batches, forward_only=False)
        loss = self._reduce_loss(losses)
        for hook in self.before_step_hooks:  # a snapshot's copy finishes here, before the guard may use it
            hook()
        self.guard.before_step(bundle, self.progress)
        # The commit point: after the step returns nothing else communicates in this iteration.
        with self.phases.inside(Phase.OPTIMIZER):
            update_successful, grad_norm, _ = bundle.optimizer.step()
        if update_successful:
            bundle.scheduler.step(increment=self.args.global_batch_size)
        self.progress.iteration += 1
        self.progress.consumed_train_samples += self.args.global_batch_size
        self.progress.floating_point_operations += gpt_flops_per_iteration(self.args, self.padded_vocab_size)
        stats = IterationStats(
            iteration=self.progress.iteration,
            lm_loss=loss,
            grad_norm=float(grad_norm) if grad_norm is not None else None,
            lr=float(bundle.optimizer.param_groups[0]["lr"]),
            consumed_samples=self.progress.consumed_train_samples,
            global_batch_size=self.args.global_batch_size,
            elapsed_ms=(time.perf_counter() - started) * 1000.0,
            tokens=self.args.global_batch_size * self.args.seq_length,
            skipped=not update_successful,
            loss_scale=float(bundle.optimizer.get_loss_scale().item()),
            time=time.time(),
            layout=f"TP{coords.tp_size}PP{coords.pp_size}DP{coords.dp_size}",
        )
        self.recent_stats.append(stats)
        for hook in self.after_commit_hooks:
            hook()
        return stats

    def evaluate(self) -> float | None:
        """``--eval-iters`` forward-only global batches of the validation set; the mean loss."""
        assert self.datasets is not None and self.args.global_batch_size is not None
        if self.datasets.valid is None or self.args.eval_iters <= 0:
            return None
        for chunk in self._current().bundle.model:
            chunk.eval()
        total = 0.0
        with torch.no_grad():
            for _ in range(self.args.eval_iters):
                batches = self._microbatches(self.datasets.valid, self.progress.consumed_valid_samples)
                total += self._reduce_loss(self._forward_backward(batches, forward_only=True))
                self.progress.consumed_valid_samples += self.args.global_batch_size
        for chunk in self._current().bundle.model:
            chunk.train()
        return total / self.args.eval_iters

    # ------------------------------------------------------------------ the loop
    def is_reporting_rank(self) -> bool:
        """Megatron-LM prints from the last rank (a last-stage rank holding the loss)."""
        return dist.get_rank() == dist.get_world_size() - 1

    def train(
        self,
        on_iteration: Callable[[IterationStats], None] | None = None,
        attempt: Attempt[Any] | None = None,
    ) -> None:
        """Run iterations until ``--train-iters`` (or ``--exit-interval``), evaluating and saving.

        ``attempt(step)`` runs each step (an iteration, an evaluation, a save) and returns its result:
        by default it just calls it; the self-healing loop recovers from a failure inside and retries.
        """
        args = self.args
        run: Attempt[Any] = attempt if attempt is not None else (lambda step: step())
        self.reporter = TrainingReporter(
            train_iters=args.train_iters,
            log_interval=args.log_interval,
            metrics_path=args.unicron.metrics_log,
            is_reporting=self.is_reporting_rank,
        )
        try:
            while self.progress.iteration < args.train_iters:
                stats = run(self.train_step)
                self._catch_up(before=stats.iteration)
                self.reporter.record(stats)
                if on_iteration is not None:
                    on_iteration(stats)
                it = self.progress.iteration
                if args.eval_interval and it % args.eval_interval == 0:
                    run(functools.partial(self._report_validation, it))
                if args.save and args.save_interval and it % args.save_interval == 0:
                    run(self.save_checkpoint)
                if args.exit_interval and it % args.exit_interval == 0:
                    break
            if args.save and not (args.save_interval and self.progress.iteration % args.save_interval == 0):
                run(self.save_checkpoint)
            self._catch_up(before=self.progress.iteration + 1)
        finally:
            self.reporter.close()

    def _catch_up(self, before: int) -> None:
        """Log the iteration a transition resumed after, if the process that reported it died first."""
        missed, self.unreported = self.unreported, None
        if missed is not None and missed.iteration < before and self.reporter is not None:
            self.reporter.catch_up(missed)

    def _report_validation(self, iteration: int) -> None:
        loss = self.evaluate()
        if loss is not None and self.reporter is not None:
            self.reporter.print_lines(validation_lines(iteration, loss))

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """Save a torch_dist checkpoint of the current iteration to ``--save``."""
        from megatron_unicron.megatron import checkpoint

        assert self.args.save is not None
        with self.phases.inside(Phase.SAVE):
            elapsed = checkpoint.save(self.args.save, self, self.args)
        if self.reporter is not None:
            self.reporter.print_lines(
                [f"  successfully saved checkpoint from iteration {self.progress.iteration:7d} to "
                 f"{self.args.save} [ t {elapsed:.2f}s ]"]
            )  # fmt: skip

    def load_checkpoint(self) -> bool:
        """Resume from ``--load``: model, optimizer, scheduler, RNG and data position; False if none."""
        from megatron_unicron.megatron import checkpoint

        if not self.args.load:
            return False
        return checkpoint.load(self.args.load, self, self.args)
