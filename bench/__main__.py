"""``python -m omni_fast.bench [OPS...] [--preset quick|full|smoke] [--providers P ...] [--out DIR] [--deadline-s S] [--list]``

Runs the benchmark cases of the named op families (all when none; families are the ``bench/cases/*.py`` names).
On a GPU: timings, saved under ``DIR/<device>/`` (default ``bench/results``). Without one: correctness checks
under the Triton interpreter and the static sm_90a report. ``--preset smoke`` (CPU or GPU): every provider called
once at tiny shapes, reported ok / skipped / FAILED, no timing. See :mod:`omni_fast.bench.harness`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from omni_fast.bench.cli_paths import output_path_problem, positive_seconds


def main(argv=None) -> int:
    """The ``python -m omni_fast.bench`` command line (the module doc; ``argv``: default ``sys.argv[1:]``): list,
    smoke-run, time (GPU) or check (CPU, Triton interpreter) the selected cases. Returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m omni_fast.bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("ops", nargs="*", help="op families to run (default: all)")
    parser.add_argument("--preset", default="quick", choices=("quick", "full", "smoke"))
    parser.add_argument("--providers", nargs="+", default=(), help="only these providers (e.g. eager omni_fast)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    parser.add_argument("--deadline-s", type=positive_seconds, default=None,
                        help="on a GPU: stop starting new cases after this many seconds (the rest are reported as "
                             "skipped); what was measured is saved (the time-boxed GPU session uses it)")
    parser.add_argument("--list", action="store_true", help="list the selected cases (no setup, no timing) and exit")
    parser.add_argument("--no-static", action="store_true",
                        help="without a GPU: skip the static sm_90a report (python -m omni_fast.bench.static_check prints it)")
    args = parser.parse_args(argv)
    problem = args.out is not None and output_path_problem(args.out, folder=True)
    if problem:
        parser.error(f"--out: {problem}")

    import torch

    gpu = torch.cuda.is_available()
    if not gpu:  # must precede the first import of any triton.jit kernel
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("OMP_NUM_THREADS", "1")

    from omni_fast.bench import harness

    cases = harness.discover(args.ops, args.preset)
    if not cases:
        print("no benchmark cases selected")
        return 1
    unused = [f for f, v in (("--out", args.out), ("--deadline-s", args.deadline_s),
                             ("--providers", args.list and args.providers or None)) if v is not None]
    if unused and (args.list or args.preset == "smoke" or not gpu):  # (silently ignored before)
        why = "with --list" if args.list else "by --preset smoke" if args.preset == "smoke" else "without a GPU"
        print(f"{', '.join(unused)}: not used {why} (nothing is timed or saved)")
    if args.list:
        for c in cases:
            print(f"  {c.op:<10} {c.name:<44} bound={c.bound}")
        print(f"{len(cases)} cases (preset {args.preset})")
        return 0
    if args.preset == "smoke":
        return harness.run_smoke(cases, providers=args.providers)
    if gpu:
        return harness.run_gpu(cases, preset=args.preset, providers=args.providers,
                               out_dir=args.out or harness.RESULTS_DIR, deadline_s=args.deadline_s)
    if args.providers:  # (silently ignored before: a user asking for one provider got every check)
        print(f"--providers {' '.join(args.providers)}: not used without a GPU (the CPU run checks each case against "
              "its reference; --preset smoke calls the providers)")
    return harness.run_cpu(cases, static=not args.no_static)


if __name__ == "__main__":
    sys.exit(main())
