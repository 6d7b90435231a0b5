"""Run every benchmark, one after the other, each in its own process, and print a summary of the ratios.

    .venv/bin/python benchmarks/run_all.py            # the figures of benchmarks/RESULTS.md (about 25 minutes on 2 cores, plus about 12 for quickstart_targets)
    .venv/bin/python benchmarks/run_all.py --quick    # smaller models, fewer repeats (about 5-6 minutes)
    .venv/bin/python benchmarks/run_all.py --only packed generate

Each script times ours and the alternative interleaved in one process and prints its figures; a line starting
with `RESULT` carries the headline numbers, collected here. The exit status is non-zero if a script fails (its
equality checks included). The GPU benchmark (`gpu.sh` / `bench_gpu.py`) is not part of it: it needs a GPU.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

BENCHMARKS = {  # name: (script, extra arguments for --quick)
    "preprocessing": ("bench_preprocessing.py", ["--repeats", "2", "--random", "8"]),
    "packed": ("bench_packed_expressions.py", ["--quick"]),
    "generate": ("bench_generate_masks.py", ["--quick"]),
    "trainable": ("bench_trainable_8b.py", []),
    "decoder": ("bench_decoder.py", ["--quick"]),
    "training": ("bench_training.py", ["--quick"]),
    "real_size": ("bench_real_size.py", ["--quick"]),
    "evaluation": ("bench_evaluation.py", ["--quick"]),
    "quickstart": ("quickstart_targets.py", ["--quick"]),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer repeats")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    args = parser.parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    summary, failed = [], []
    for name, (script, quick_args) in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, str(HERE / script), *(quick_args if args.quick else [])]
        print(f"\n$ {' '.join([Path(sys.executable).name, 'benchmarks/' + script, *cmd[2:]])}", flush=True)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            print(line, end="", flush=True)
            if line.startswith("RESULT"):
                summary.append(line.strip())
        proc.wait()
        took = time.perf_counter() - start
        if proc.returncode:
            failed.append(name)
            summary.append(f"FAILED {name} (exit {proc.returncode})")
        print(f"[{name}: {took:.0f} s]", flush=True)
    print("\n== summary ==")
    for line in summary:
        print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
