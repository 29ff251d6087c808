"""Entry point of a training script: Megatron-LM's ``pretrain()`` for megatron-core GPT.

``pretrain(forward_step_func)`` parses Megatron-LM flags (and ``--yaml-cfg``), checks them against the
world size the launcher gives, applies the CPU patch when CUDA is unavailable, builds generation 0 of the
job, resumes from ``--load`` and trains. With ``--unicron`` every step runs under the self-healing loop
(``megatron_unicron.healing``); a process the agent restarted after a failure joins the generation the
coordinator decided instead of starting a new job. Bad input ends the process with one line and exit
code 2; a job the coordinator stopped ends with exit code 3 and the reason.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from megatron_unicron.errors import UnicronError
from megatron_unicron.megatron.train import ForwardStepFunc, Trainer, WorkerEnv
from megatron_unicron.testing import leaks

if TYPE_CHECKING:
    from megatron_unicron.healing import Healer
    from megatron_unicron.megatron.args import MegatronArgs
    from megatron_unicron.protocol import JobChannel

logger = logging.getLogger("megatron_unicron")

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
REPORTED_MARK = "unicron_reported"


def report_once(line: str) -> None:
    """Print a message that every rank finds (bad flags, a stopped job) once per node.

    The first of a node's ranks to get here prints it: it claims a mark in the launch attempt's
    directory, the one holding each worker's ``TORCHELASTIC_ERROR_FILE`` (``unicron-run`` and torchrun
    both lay it out so). Printing from rank 0 alone lost the line whenever another rank exited first
    and the launcher ended rank 0 before it printed. A process without a launcher just prints.
    """
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        mark = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(error_file))), REPORTED_MARK)
        try:
            os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        except OSError:
            pass  # no mark to share: better twice than never
    print(line, file=sys.stderr, flush=True)


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


def _device_memory_bytes(configured_gib: float) -> float | None:
    """The device memory new layouts must fit: as configured, else the CUDA device's, else None."""
    if configured_gib > 0:
        return configured_gib * 2**30
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return None


def job_config(args: MegatronArgs, env: WorkerEnv, vocab_size: int) -> dict[str, object]:
    """What the coordinator needs to know about the job (posted once by launch rank 0)."""
    incident_log = args.unicron.incident_log or os.path.join(
        args.save or os.getcwd(), "unicron_incidents.jsonl"
    )
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(env.world_size)))
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    return {
        "incident_log": os.path.abspath(incident_log),
        "save": os.path.abspath(args.save) if args.save else None,
        "detection": args.unicron.detection.__dict__,
        "world_size": env.world_size,
        "layout": {"tp": tp, "pp": pp, "dp": env.world_size // (tp * pp)},
        "train_iters": args.train_iters,
        "rank_node": {str(r): f"node{r // local}" for r in range(env.world_size)},
        "gpus_per_node": local,
        "global_batch_size": args.global_batch_size,
        "micro_batch_size": args.micro_batch_size,
        "restart_min_replicas": args.unicron.restart_min_replicas,
        "snapshot_interval": args.unicron.snapshot_interval,
        "use_distributed_optimizer": args.use_distributed_optimizer,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "device_memory_bytes": _device_memory_bytes(args.unicron.device_memory_gib),
        "model": {
            "num_layers": args.num_layers,
            "hidden_size": args.hidden_size,
            "num_attention_heads": args.num_attention_heads,
            "num_query_groups": args.num_query_groups,
            "ffn_hidden_size": args.ffn_hidden_size,
            "vocab_size": vocab_size,
            "seq_length": args.seq_length,
            "swiglu": args.swiglu,
            "untie_embeddings_and_output_weights": args.untie_embeddings_and_output_weights,
            "make_vocab_size_divisible_by": args.make_vocab_size_divisible_by,
        },
    }


def _injector(args: MegatronArgs, env: WorkerEnv, trainer: Trainer, channel: JobChannel | None) -> object:
    from megatron_unicron.testing.injector import (
        FaultInjector,
        close_peer_sockets,
        flip_a_byte,
        schedule_from,
    )

    schedule = schedule_from(args.unicron.inject)
    if not schedule or (channel is None and env.restart_count > 0):
        return None  # without a store to mark faults fired, a restarted group must not fire them again

    def close_connections() -> None:  # every connection but the one to the job's store
        closed = close_peer_sockets({env.master_port})
        logger.warning("unicron-inject: shut down %d peer connection(s)", closed)

    injector = FaultInjector(
        schedule,
        env.rank,
        mark_fired=(lambda spec, record: channel.claim_fault(spec.index, record)) if channel else None,
        close_connections=close_connections,
        corrupt_transfer=lambda: setattr(trainer, "transfer_tamper", flip_a_byte),
    )
    trainer.phases.listeners.append(injector)
    return injector


def _start(trainer: Trainer, healer: Healer | None, env: WorkerEnv, args: MegatronArgs) -> None:
    restarted_into = os.environ.get("UNICRON_GENERATION") if os.environ.get("UNICRON_RESTARTED") else None
    if healer is not None and restarted_into is not None:
        # A process the agent restarted: join the generation that restarted it, state from the others.
        trainer.ensure_datasets()
        healer.generation = int(restarted_into) - 1
        healer.wait_as_spare()
        return
    if healer is not None and os.environ.get("UNICRON_JOINING"):
        # A returning node's process: wait for the generation the coordinator plans with it.
        trainer.ensure_datasets()
        healer.generation = healer.channel.latest_generation()
        healer.channel.post_joined(env.rank)
        healer.wait_as_spare()
        return
    trainer.start_generation(
        0, env.rank, env.world_size, args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    )
    trainer.load_checkpoint()


def pretrain(forward_step_func: ForwardStepFunc, argv: Sequence[str] | None = None) -> int:
    """Train a GPT model as Megatron-LM's pretrain_gpt.py does; returns the process exit code."""
    from megatron_unicron.megatron.args import parse_args, resolve_world

    env = WorkerEnv.from_environ()
    prog = os.path.basename(sys.argv[0]) if sys.argv else "pretrain_gpt.py"
    try:
        args = resolve_world(parse_args(argv, prog=prog), env.world_size)
    except UnicronError as error:
        report_once(f"{prog}: error: {error}")
        return EXIT_BAD_INPUT
    if args.unicron.enabled and os.environ.get("UNICRON_MODE") != "unicron":
        report_once(
            f"{prog}: error: --unicron needs a self-healing launcher: start the job with "
            "'unicron-run --unicron ...' (it runs the coordinator that answers failures)",
        )
        return EXIT_BAD_INPUT
    configure_logging(env.rank)
    leaks.write_report_if_requested("start")
    import megatron.core  # noqa: F401  (imported before patching, so every module gets patched)

    from megatron_unicron.healing import Healer, JobStopped, TrainingDone
    from megatron_unicron.megatron import cpu
    from megatron_unicron.protocol import JobChannel
    from megatron_unicron.snapshot.service import start_service as start_snapshots
    from megatron_unicron.store import JobKeys

    cpu.apply()
    # Everything imported so far lives as long as the process: keep it out of the collector's scans, so
    # the collections that free a generation's groups (on every change of layout) stay fast.
    gc.freeze()
    healer = None
    snapshots = None
    try:
        trainer = Trainer(args, forward_step_func, env)
        node = os.environ.get("UNICRON_NODE", "node0")
        snapshots = start_snapshots(trainer, launch_rank=env.rank, node=node)
        channel = JobChannel(trainer.store, JobKeys(env.job)) if args.unicron.enabled else None
        injector = _injector(args, env, trainer, channel)
        if channel is not None:
            healer = Healer(
                trainer, channel, launch_rank=env.rank, node=os.environ.get("UNICRON_NODE", "node0"),
                generation=0, injector=injector,  # type: ignore[arg-type]
            )  # fmt: skip
            if env.rank == 0 and not (
                os.environ.get("UNICRON_RESTARTED") or os.environ.get("UNICRON_JOINING")
            ):
                channel.post_config(job_config(args, env, trainer.tokenizer.vocab_size))
        _start(trainer, healer, env, args)
        trainer.train(attempt=healer.attempt if healer is not None else None)
        if channel is not None:
            channel.mark_done()
        trainer.finish()
    except TrainingDone:
        trainer.finish()
    except JobStopped as stop:
        report_once(f"{prog}: {stop}")
        return EXIT_STOPPED
    except UnicronError as error:
        report_once(f"{prog}: error: {error}")
        return EXIT_BAD_INPUT
    finally:
        if snapshots is not None:
            snapshots.close()
        if healer is not None:
            healer.close()
    leaks.write_report_if_requested("end")
    return 0
