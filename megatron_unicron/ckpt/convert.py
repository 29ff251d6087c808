"""``unicron-convert``: convert a Megatron-LM checkpoint to another TP/PP layout and/or format.

    unicron-convert --load-dir CKPT --save-dir OUT --target-tensor-parallel-size 1 \\
        --target-pipeline-parallel-size 1 [--ckpt-format torch|torch_dist] [--no-optimizer] \\
        [--iteration N] [--json]

Reads a legacy (``torch``) or ``torch_dist`` checkpoint at any TP/PP and writes it at the target layout in
either format, keeping optimizer state, scheduler, iteration and args (and RNG when the layout does not
change). It runs on CPU in one process without a process group and streams slab by slab. The output is
written into a temporary directory beside ``--save-dir``, read back and checked tensor by tensor against what
was written (shape, float64 sum, sha256), and only then renamed into place; on any error nothing is left
behind. The report (a table, or JSON with ``--json``) lists every full tensor before and after, totals,
GB/s and peak RSS. Exit status: 0 when every tensor verified, 1 on a verification mismatch, 2 on a refusal
(one line on stderr naming what is wrong).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

from megatron_unicron.ckpt.errors import CheckpointError, VerificationError
from megatron_unicron.ckpt.plan import Pipeline, make_target
from megatron_unicron.ckpt.report import ConversionReport, TensorStats
from megatron_unicron.ckpt.source import TRACKER, CheckpointSource, open_checkpoint
from megatron_unicron.ckpt.writer_dist import DistWriter
from megatron_unicron.ckpt.writer_legacy import LegacyWriter


def build_parser() -> argparse.ArgumentParser:
    """The CLI flags (Megatron-LM converter names where they exist)."""
    p = argparse.ArgumentParser(
        prog="unicron-convert",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--load-dir",
        required=True,
        help="checkpoint root (with latest_checkpointed_iteration.txt) or an iter_NNNNNNN directory",
    )
    p.add_argument("--save-dir", required=True, help="output checkpoint root (must not exist or be empty)")
    p.add_argument(
        "--target-tensor-parallel-size", type=int, default=None, help="target TP (default: source's)"
    )
    p.add_argument(
        "--target-pipeline-parallel-size", type=int, default=None, help="target PP (default: source's)"
    )
    p.add_argument(
        "--ckpt-format",
        choices=["torch", "torch_dist"],
        default=None,
        help="output format (default: the source's)",
    )
    p.add_argument(
        "--no-optimizer", action="store_true", help="write the model only (no optimizer, scheduler)"
    )
    p.add_argument("--iteration", type=int, default=None, help="source iteration (default: the tracker's)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--true-vocab-size",
        type=int,
        default=None,
        help="unpadded vocabulary size, needed when the padded size changes with TP",
    )
    p.add_argument(
        "--target-optimizer",
        choices=["same", "plain", "distributed"],
        default="same",
        help="optimizer the target run uses (default: the source's)",
    )
    p.add_argument(
        "--target-layer-spec",
        choices=["local", "te"],
        default=None,
        help="legacy parameter names of the target run (default: the source's)",
    )
    p.add_argument("--no-validate", action="store_true", help="skip reading the output back")
    return p


def _prepare_output(save_dir: str) -> str:
    save_dir = os.path.abspath(save_dir)
    if os.path.exists(save_dir) and (not os.path.isdir(save_dir) or os.listdir(save_dir)):
        raise CheckpointError(f"--save-dir {save_dir} exists and is not empty; choose a new directory")
    parent = os.path.dirname(save_dir)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(save_dir)}.partial-", dir=parent)


def _verify(tmp: str, pipeline: Pipeline, report: ConversionReport, true_vocab_size: int | None) -> None:
    with open_checkpoint(
        tmp, true_vocab_size=true_vocab_size, load_optimizer=pipeline.target.optimizer is not None
    ) as out:
        for key in pipeline.tensors:
            got = out.tensors.get(key)
            if got is None:
                report.notes.append(f"{key}: missing in the written checkpoint")
                continue
            stats = TensorStats(got.shape, got.dtype)
            for layer in got.layers:
                stats.add(out.read(key, layer), layer)
            report.key(key).after = stats.digest()
        src = pipeline.source.common
        if out.common.iteration != src.iteration:
            raise CheckpointError(f"written iteration {out.common.iteration} != source {src.iteration}")
        if pipeline.target.optimizer is not None and src.optimizer is not None:
            if out.common.optimizer is None or float(out.common.optimizer.step) != float(src.optimizer.step):
                raise CheckpointError("the written optimizer step differs from the source's")


def _describe(src: CheckpointSource) -> dict[str, object]:
    opt = src.common.optimizer
    return {
        "path": src.path,
        "format": src.format,
        "layout": str(src.layout),
        "iteration": src.iteration,
        "optimizer": opt.kind.value if opt else None,
        "layer_spec": src.layer_spec,
        "padded_vocab_size": src.spec.padded_vocab_size,
    }


def convert(
    load_dir: str,
    save_dir: str,
    *,
    tp: int | None = None,
    pp: int | None = None,
    fmt: str | None = None,
    no_optimizer: bool = False,
    iteration: int | None = None,
    true_vocab_size: int | None = None,
    target_optimizer: str = "same",
    layer_spec: str | None = None,
    validate: bool = True,
) -> ConversionReport:
    """Convert ``load_dir`` into ``save_dir``; returns the report. Raises ``CheckpointError`` on a refusal."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    source = open_checkpoint(
        load_dir, iteration, true_vocab_size=true_vocab_size, load_optimizer=not no_optimizer
    )
    try:
        return convert_source(
            source,
            save_dir,
            tp=tp,
            pp=pp,
            fmt=fmt,
            no_optimizer=no_optimizer,
            true_vocab_size=true_vocab_size,
            target_optimizer=target_optimizer,
            layer_spec=layer_spec,
            validate=validate,
            started=(t0, cpu0),
        )
    finally:
        source.close()


def convert_source(
    source: CheckpointSource,
    save_dir: str,
    *,
    tp: int | None = None,
    pp: int | None = None,
    fmt: str | None = None,
    no_optimizer: bool = False,
    true_vocab_size: int | None = None,
    target_optimizer: str = "same",
    layer_spec: str | None = None,
    validate: bool = True,
    started: tuple[float, float] | None = None,
) -> ConversionReport:
    """Write an opened checkpoint at a target layout/format into ``save_dir`` (see ``convert``)."""
    t0, cpu0 = (time.perf_counter(), time.process_time()) if started is None else started
    target = make_target(
        source,
        tp=tp or source.layout.tp,
        pp=pp or source.layout.pp,
        fmt=fmt or source.format,
        no_optimizer=no_optimizer,
        target_optimizer=target_optimizer,
        layer_spec=layer_spec,
    )
    report = ConversionReport(
        source=_describe(source),
        target={
            "path": os.path.abspath(save_dir),
            "format": target.format,
            "layout": str(target.layout),
            "iteration": target.iteration,
            "optimizer": target.optimizer.value if target.optimizer else None,
            "layer_spec": target.layer_spec,
            "padded_vocab_size": target.padded_vocab_size,
        },
    )
    report.notes.extend(source.notes)
    if source.common.rng is not None and not target.keep_rng:
        report.notes.append(
            "rng_state dropped: the layout changes and RNG streams belong to TP/PP ranks "
            "(args.no_save_rng is set; load legacy output with --no-load-rng)"
        )
    tmp = _prepare_output(save_dir)
    try:
        pipeline = Pipeline(source, target, report)
        writer = LegacyWriter if target.format == "torch" else DistWriter
        writer(tmp, source, target, pipeline, report).write()
        with open(os.path.join(tmp, TRACKER), "w") as f:
            f.write("release" if target.release else str(target.iteration))
        pipeline.finish()
        report.seconds = time.perf_counter() - t0
        report.cpu_seconds = time.process_time() - cpu0
        if not validate:
            for entry in report.keys.values():
                entry.verified = False
        else:
            t1 = time.perf_counter()
            _verify(tmp, pipeline, report, true_vocab_size)
            report.seconds_validate = time.perf_counter() - t1
            if not report.ok:
                bad = [k for k, v in report.keys.items() if v.status == "MISMATCH"]
                raise VerificationError(
                    f"validation failed for {len(bad)} tensors, first {bad[0]}; nothing written"
                )
        final = os.path.abspath(save_dir)
        if os.path.isdir(final):
            os.rmdir(final)  # empty (checked above)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _no_heap_hoarding() -> None:
    """Serve large allocations with mmap so each freed slab goes back to the OS (glibc only).

    glibc raises its mmap threshold to the largest block freed so far (up to 32 MiB); slabs below that then
    come from the heap, which fragments and keeps the peak RSS near the checkpoint's size instead of a few
    slabs. A fixed 4 MiB threshold keeps memory bounded by the slabs in flight.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    _no_heap_hoarding()
    try:
        report = convert(
            args.load_dir,
            args.save_dir,
            tp=args.target_tensor_parallel_size,
            pp=args.target_pipeline_parallel_size,
            fmt=args.ckpt_format,
            no_optimizer=args.no_optimizer,
            iteration=args.iteration,
            true_vocab_size=args.true_vocab_size,
            target_optimizer=args.target_optimizer,
            layer_spec=args.target_layer_spec,
            validate=not args.no_validate,
        )
    except VerificationError as e:
        print(f"unicron-convert: error: {e}", file=sys.stderr)
        return 1
    except CheckpointError as e:
        print(f"unicron-convert: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions: one line, nothing left behind
        print(f"unicron-convert: error: {e.strerror or e} ({e.filename or ''})", file=sys.stderr)
        return 2
    print(report.to_json() if args.json else report.to_text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
