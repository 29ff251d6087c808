"""Converter throughput (GB/s) against a plain copy of the same bytes; peak RSS against the largest tensor.

    python benchmarks/convert_throughput.py [--hidden 1024 --layers 8 --vocab 32000] [--json]

Writes a synthetic Megatron-LM legacy checkpoint (TP2PP2, fp32, Adam state; ``tests/ckpt/synth_legacy.py``),
then in the same run measures:

* the baseline: ``shutil.copytree`` of the checkpoint directory (read + write of the same bytes), after a
  cache-warming read, so both sides read from the page cache;
* each conversion in a fresh process (``tools/convert_checkpoint.py --json``): its GB/s (tensor bytes read /
  seconds to open, convert and write; the read-back validation is timed apart) and its peak RSS, set
  against the RSS of a process that only imports the converter and against the largest single tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "ckpt"))

CONVERSIONS = [
    (
        "legacy TP2PP2 -> legacy TP1PP1",
        "src",
        "l11",
        ["--target-tensor-parallel-size", "1", "--target-pipeline-parallel-size", "1"],
    ),
    (
        "legacy TP2PP2 -> torch_dist TP4PP1",
        "src",
        "d41",
        [
            "--target-tensor-parallel-size",
            "4",
            "--target-pipeline-parallel-size",
            "1",
            "--ckpt-format",
            "torch_dist",
        ],
    ),
    (
        "torch_dist TP4PP1 -> legacy TP2PP2",
        "d41",
        "l22",
        [
            "--target-tensor-parallel-size",
            "2",
            "--target-pipeline-parallel-size",
            "2",
            "--ckpt-format",
            "torch",
        ],
    ),
]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return env


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _warm(path: str) -> None:
    for d, _, fs in os.walk(path):
        for f in fs:
            with open(os.path.join(d, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass


def _baseline_rss() -> int:
    code = (
        "import megatron_unicron.ckpt.convert, megatron_unicron.ckpt.writer_dist; "
        "from megatron_unicron.ckpt.report import peak_rss_bytes; print(peak_rss_bytes())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def run(args: argparse.Namespace) -> dict[str, Any]:
    import synth_legacy

    work = tempfile.mkdtemp(prefix="convert_bench_", dir=args.dir)
    try:
        src = os.path.join(work, "src")
        t = time.perf_counter()
        nbytes = synth_legacy.write(
            src,
            tp=2,
            pp=2,
            layers=args.layers,
            hidden=args.hidden,
            heads=args.heads,
            ffn=4 * args.hidden,
            vocab=args.vocab,
        )
        gen_s = time.perf_counter() - t
        _warm(src)
        t, cpu = time.perf_counter(), time.process_time()
        shutil.copytree(src, os.path.join(work, "copy"))
        copy_s, copy_cpu = time.perf_counter() - t, time.process_time() - cpu
        shutil.rmtree(os.path.join(work, "copy"))
        base_rss = _baseline_rss()
        rows = []
        for name, frm, to, flags in CONVERSIONS:
            cmd = [
                sys.executable,
                os.path.join(ROOT, "tools", "convert_checkpoint.py"),
                "--load-dir",
                os.path.join(work, frm),
                "--save-dir",
                os.path.join(work, to),
                "--json",
                *flags,
            ]
            p = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"{name}: {p.stderr.strip()}")
            tot = json.loads(p.stdout)["totals"]
            rows.append(
                {
                    "conversion": name,
                    "bytes": tot["bytes_read"],
                    "seconds": tot["seconds"],
                    "gb_per_s": tot["gb_per_s"],
                    "cpu_seconds": tot["cpu_seconds"],
                    "gb_per_cpu_s": round(tot["bytes_read"] / max(tot["cpu_seconds"], 1e-9) / 1e9, 3),
                    "validate_seconds": tot["seconds_validate"],
                    "peak_rss_bytes": tot["peak_rss_bytes"],
                    "rss_above_import_bytes": tot["peak_rss_bytes"] - base_rss,
                    "largest_tensor_bytes": tot["largest_tensor_bytes"],
                    "largest_slab_bytes": tot["largest_slab_bytes"],
                    "status": tot["status"],
                }
            )
        return {
            "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "heads": args.heads},
            "checkpoint_bytes": nbytes,
            "generate_seconds": round(gen_s, 2),
            "copy": {
                "bytes": nbytes,
                "seconds": round(copy_s, 3),
                "gb_per_s": round(nbytes / copy_s / 1e9, 3),
                "cpu_seconds": round(copy_cpu, 3),
                "gb_per_cpu_s": round(nbytes / max(copy_cpu, 1e-9) / 1e9, 3),
            },
            "import_only_rss_bytes": base_rss,
            "conversions": rows,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dir", default=None, help="scratch directory (default: the system temp dir)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=1))
        return
    mib = 2**20
    copy = res["copy"]
    print(
        f"model hidden={args.hidden} layers={args.layers} vocab={args.vocab}: legacy TP2PP2 checkpoint "
        f"{res['checkpoint_bytes'] / 1e9:.2f} GB (model + Adam state, fp32)"
    )
    print(
        f"baseline plain copy (copytree): {copy['seconds']:.2f} s wall = {copy['gb_per_s']:.3f} GB/s, "
        f"{copy['cpu_seconds']:.2f} CPU s = {copy['gb_per_cpu_s']:.3f} GB per CPU s; "
        f"RSS of a process that only imports the converter: {res['import_only_rss_bytes'] / mib:.0f} MiB"
    )
    print(
        f"{'conversion':<36} {'GB/s':>6} {'vs copy':>7} {'GB/CPU s':>8} {'vs copy':>7} {'wall s':>7} "
        f"{'read-back s':>11} {'peak RSS MiB':>12} {'above import':>12} {'largest tensor MiB':>18}"
    )
    for r in res["conversions"]:
        print(
            f"{r['conversion']:<36} {r['gb_per_s']:>6.3f} {r['gb_per_s'] / copy['gb_per_s']:>6.2f}x "
            f"{r['gb_per_cpu_s']:>8.3f} {r['gb_per_cpu_s'] / copy['gb_per_cpu_s']:>6.2f}x "
            f"{r['seconds']:>7.2f} "
            f"{r['validate_seconds']:>11.2f} {r['peak_rss_bytes'] / mib:>12.0f} "
            f"{r['rss_above_import_bytes'] / mib:>12.0f} {r['largest_tensor_bytes'] / mib:>18.1f}"
        )


if __name__ == "__main__":
    main()
