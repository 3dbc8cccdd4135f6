"""The prepared GPU sessions: one time-boxed command per device call, its results in one bundle.

    bash scripts/gpu_session.sh first-light [--dry-run] [--steps 3,4] [--time-scale F]
    python -m omni_fast.bench.session first-light|second-light [--dry-run] [--out DIR] [--work DIR] ...

A lent GPU comes with ~15 minutes in all, one command at most 10, and at most 8 files back from ``$OUT``. So a
session is a fixed list of steps (:data:`SESSIONS`), each run as its own process group under its own time box
(SIGINT when the box runs out, SIGKILL 5 s later), so a hang or a failure costs that step only. Each step writes
``NN_name/log.txt`` (its command and output) and ``NN_name/step.json`` (status, seconds, box, the facts parsed from
its output) in a work folder; after every step the folder is packed into ``$OUT/<session>.tar.gz`` (so a call cut
off early still returns what finished), beside ``$OUT/summary.json`` and ``$OUT/summary.md``: three files.

``first-light`` (~8 min on an H100): versions and device; the sm_90a static check with the image's Triton; the gpu
tests of ``tests/gpu_first_light.txt``; the quick benchmark cases of moe, attention, mtp, code2wav, rope and decode with
every peer in the image and the two measured ceilings (one process per family); the full-shape pipeline at
concurrency 1 and 4; the cost model's calibration (:mod:`omni_fast.bench.session_tools`). ``second-light``
(~6.5 min, after a clean first light): MoE tuning for N = 768 and 384 on a reduced T grid, compute-sanitizer
memcheck over ``tests/gpu_memcheck.txt``, then the same tuning for the FP8 block-scaled experts.

``--dry-run`` (a CPU, in CI: ``tests/test_gpu_session_dry_run.py``): every step in a wiring-only form (tiny
inputs, ``--list`` / ``--collect-only`` / the interpreter; listed test ids must all be collected and gpu-marked),
then the check that every step's log and JSON are in the bundle. It proves the plumbing, never speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omni_fast._layout import REPO_ROOT
from omni_fast.bench import session_tools as tools

GRACE_S = 5.0  # between SIGINT (pytest and the bench save what they have) and SIGKILL when a box runs out
FIRST_LIGHT_TESTS = Path(REPO_ROOT, "tests", "gpu_first_light.txt")
MEMCHECK_TESTS = Path(REPO_ROOT, "tests", "gpu_memcheck.txt")
# seconds; 185 in all. decode: today's talker / thinker step vs the phase-fused step (issue 16) and its PDL variant
BENCH_BOXES = {"moe": 40, "attention": 30, "code2wav": 30, "mtp": 25, "rope": 20, "decode": 40}
DRY_STATIC = "rvq"  # the dry run compiles only the specialisations whose name holds this (plumbing, in seconds)


@dataclass
class Ctx:
    dry: bool
    work: Path
    py: str
    scale: float = 1.0

    def box(self, seconds: float) -> float:
        return seconds * self.scale


@dataclass
class Step:
    key: str  # folder name, "NN_name"
    title: str
    box_s: float  # the time box, before --time-scale
    argv: Callable[[Ctx, Path], list[str]]  # (ctx, step folder) -> command
    summarize: Callable[[Ctx, Path, dict], dict] | None = None  # (ctx, step folder, step record) -> extra fields
    env: dict | None = None


# --- the steps ---------------------------------------------------------------------------------------------------


def _pytest(ctx: Ctx, d: Path, list_file: Path, *, per_test_s: int, extra: list[str]) -> list[str]:
    """pytest over the ids of ``list_file``, a JUnit XML in ``d``; per-test timeouts where pytest-timeout exists
    (thread method: a test stuck inside a CUDA call is still ended, its stacks dumped), the step's box otherwise."""
    argv = [ctx.py, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={d / 'junit.xml'}"]
    if tools.has_module("pytest_timeout"):
        argv += [f"--timeout={per_test_s}", "--timeout-method=thread"]
    return argv + extra + tools.read_ids(list_file)


def _env_step(ctx, d):
    return [ctx.py, "-m", "omni_fast.bench.session_tools", "env", "--json", str(d / "env.json")]


def _static_step(ctx, d):
    # ~365 specialisations (2 cores here: ~2 min; 16 cores: well inside the box): one compiling process per core
    return [ctx.py, "-m", "omni_fast.bench.static_check", "--jobs", str(os.cpu_count() or 1)] + \
        ([DRY_STATIC] if ctx.dry else [])


def _tests_step(ctx, d):
    # -m gpu: a listed id that lost its marker is deselected, and the dry run's count check fails on it.
    extra = ["-m", "gpu", "--maxfail=5", "--durations=15"]
    if not ctx.dry and tools.has_module("xdist"):
        extra += ["-n", "4"]  # Triton compiles dominate; four processes share the GPU
    return _pytest(ctx, d, FIRST_LIGHT_TESTS, per_test_s=60, extra=extra)


def _bench_step(family):
    def argv(ctx, d):
        base = [ctx.py, "-m", "omni_fast.bench", family]
        if ctx.dry:  # the quick cases, listed (their providers' plumbing is CI's smoke run: test_bench_smoke.py)
            return base + ["--preset", "quick", "--list"]
        # the bench stops starting cases 15 s before the box, so it saves its JSON itself
        return base + ["--preset", "quick", "--out", str(d / "results"),
                       "--deadline-s", f"{max(ctx.box(BENCH_BOXES[family]) - 15, 5):.0f}"]
    return argv


def _pipeline_step(ctx, d):
    # On a CPU the module runs its tiny check against transformers instead (the dry run's plumbing check).
    return [ctx.py, "-m", "omni_fast.bench.cases.pipeline", "--concurrency", "1", "4", "--repeats", "1",
            "--providers", "omni_fast", "--out", str(d / "results")]


def _calibrate_step(ctx, d):
    return [ctx.py, "-m", "omni_fast.bench.session_tools", "calibrate", "--results", str(ctx.work),
            "--json", str(d / "calibration.json")] + (["--dry-run"] if ctx.dry else [])


def _tune_step(n, box, fmt=None):
    def argv(ctx, d):
        base = [ctx.py, "-m", "omni_fast.bench.tune_moe", "--n", str(n), "--out-dir", str(d / "configs")]
        if fmt:  # quantized experts: the kernel's tile rules, the sm_90a static prune (a process per core)
            base += ["--format", fmt, "--jobs", str(os.cpu_count() or 1)]
        if ctx.dry:  # the tuner's whole path on the interpreter at toy sizes, one candidate per GEMM
            return base + ["--device", "cpu", "--experts", "4", "--hidden", "128" if fmt else "32", "--top-k", "2",
                           "--tokens", "3", "--dtype", "fp16", "--max-configs", "1"]
        # T: the cost model's MoE units (prefill 4096 first: its fallback tiles are the known-bad ones, then decode)
        return base + ["--tokens", "4096", "1", "64", "8", "--max-configs", "12",
                       "--budget-s", f"{max(ctx.box(box) - 15, 5):.0f}"]
    return argv


SANITIZER_UNAVAILABLE = "SANITIZER UNAVAILABLE on this machine"


def _memcheck_step(ctx, d):
    if ctx.dry:  # no sanitizer on a CPU: check that every listed id is collected
        return [ctx.py, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider"] + tools.read_ids(MEMCHECK_TESTS)
    run = ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "99", "--target-processes", "all",
           *_pytest(ctx, d, MEMCHECK_TESTS, per_test_s=30, extra=["-x"])]
    # A 5-second probe first: some machines' sanitizer refuses the device ("Device not supported", error 999 on
    # gVisor, device/KINDS.md); then the step says so and ends instead of failing every test after a long start.
    probe = ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "99", ctx.py, "-c",
             "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()"]
    return ["bash", "-c", f"{shlex.join(probe)} >{shlex.quote(str(d / 'probe.log'))} 2>&1 || "
            f"{{ echo \"{SANITIZER_UNAVAILABLE} (probe exit $?)\"; tail -5 {shlex.quote(str(d / 'probe.log'))}; "
            f"exit 3; }}; exec {shlex.join(run)}"]


def _first_light() -> list[Step]:
    # env: 30 s, a fresh machine's first imports of torch/transformers/cupy come from a cold disk
    steps = [Step("01_env", "versions and device", 30, _env_step, tools.summarize_env),
             Step("02_static", "sm_90a static check (image's Triton)", 60, _static_step, tools.summarize_static),
             Step("03_tests", "gpu tests: tests/gpu_first_light.txt", 140, _tests_step,
                  lambda c, d, r: tools.summarize_junit(d, r, expect=None if not c.dry else
                                                        len(tools.read_ids(FIRST_LIGHT_TESTS))))]
    steps += [Step(f"04_bench_{f}", f"bench {f} (quick, all peers, ceilings)", box, _bench_step(f),
                   tools.summarize_bench) for f, box in BENCH_BOXES.items()]
    steps += [Step("05_pipeline", "pipeline, full shapes, concurrency 1 and 4", 70, _pipeline_step,
                   tools.summarize_pipeline),
              Step("06_calibrate", "cost-model calibration", 30, _calibrate_step, tools.summarize_json_file)]
    return steps


def _second_light() -> list[Step]:
    return [Step("01_env", "versions and device", 20, _env_step, tools.summarize_env),
            Step("02_tune_768", "MoE tuning N=768 (thinker)", 75, _tune_step(768, 75), tools.summarize_tune),
            Step("03_tune_384", "MoE tuning N=384 (talker)", 55, _tune_step(384, 55), tools.summarize_tune),
            Step("04_memcheck", "compute-sanitizer memcheck: tests/gpu_memcheck.txt", 70, _memcheck_step,
                 tools.summarize_memcheck, env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),
            # FP8 block 128x128 (Qwen's published FP8 checkpoints) only: fp8_channel and int4 would take another
            # ~2.5 min and keep the heuristic meanwhile (docs/moe.md); after memcheck, so a slow tune costs itself
            Step("05_tune_fp8_768", "MoE tuning fp8 block N=768 (thinker)", 90, _tune_step(768, 90, "fp8_block"),
                 tools.summarize_tune),
            Step("06_tune_fp8_384", "MoE tuning fp8 block N=384 (talker)", 70, _tune_step(384, 70, "fp8_block"),
                 tools.summarize_tune)]


SESSIONS = {"first-light": _first_light, "second-light": _second_light}


# --- running -----------------------------------------------------------------------------------------------------


def step_env(ctx: Ctx, step: Step, cuda: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cuda:
        env.pop("TRITON_INTERPRET", None)
    else:  # the dry run on a CPU: every Triton kernel on the interpreter
        env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return {**env, **(step.env or {})}


def run_step(ctx: Ctx, step: Step, cuda: bool) -> dict:
    """Run one step in its own process group under its box; returns its record (also written as step.json)."""
    d = ctx.work / step.key
    d.mkdir(parents=True, exist_ok=True)
    box = ctx.box(step.box_s)
    rec = {"step": step.key, "title": step.title, "box_s": round(box, 1), "dry_run": ctx.dry, "log": "log.txt"}
    t0 = time.monotonic()
    try:
        argv = step.argv(ctx, d)
    except Exception as exc:  # e.g. a missing list file: the step fails, the session goes on
        argv, rec["status"], rec["error"] = [], "failed", f"{type(exc).__name__}: {exc}"
    rec["command"] = " ".join(argv)
    with open(d / "log.txt", "w") as log:
        log.write(f"$ {rec['command']}\n(time box {box:.0f} s)\n")
        log.flush()
        if argv:
            rec.update(_run_boxed(argv, log, box, step_env(ctx, step, cuda)))
    rec["seconds"] = round(time.monotonic() - t0, 1)
    if step.summarize is not None:
        try:
            rec.update(step.summarize(ctx, d, rec))
        except Exception as exc:  # a parse failure must not lose the step's record
            rec["summary_error"] = f"{type(exc).__name__}: {exc}"
    (d / "step.json").write_text(json.dumps(rec, indent=1, default=str))
    return rec


def _run_boxed(argv: list[str], log, box: float, env: dict) -> dict:
    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env,
                                start_new_session=True)
    except OSError as exc:  # e.g. compute-sanitizer not on the PATH
        log.write(f"could not start: {exc}\n")
        return {"status": "failed", "rc": None, "error": str(exc)}
    try:
        rc = proc.wait(timeout=box)
        return {"status": "ok" if rc == 0 else "failed", "rc": rc}
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGINT, GRACE_S), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)  # the step's own process group (start_new_session): nothing else
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.write(f"\n(time box of {box:.0f} s ran out: stopped)\n")
        return {"status": "timeout", "rc": proc.returncode}


def bundle(work: Path, out: Path, name: str) -> Path:
    """Pack ``work`` into ``out/<name>.tar.gz`` (written beside, then renamed: a cut-off call keeps the last one)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.tar.gz"
    tmp = out / f".{name}.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(work, arcname=name)
    os.replace(tmp, path)
    return path


def check_bundle(path: Path, name: str, records: list[dict]) -> list[str]:
    """What the bundle lacks: every step's log.txt and step.json, and summary.json."""
    with tarfile.open(path) as tar:
        names = set(tar.getnames())
    want = [f"{name}/summary.json"] + [f"{name}/{r['step']}/{f}" for r in records for f in ("log.txt", "step.json")]
    return [w for w in want if w not in names]


def run_session(name: str, out: Path, *, dry: bool = False, work: Path | None = None, only: set[int] | None = None,
                scale: float = 1.0) -> int:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not dry:
        print(f"{name} needs a CUDA GPU; on a CPU run it with --dry-run (the wiring check)")
        return 2
    work = Path(work or tempfile.mkdtemp(prefix=f"omni_fast_{name}_"))
    ctx = Ctx(dry=dry, work=work, py=sys.executable, scale=scale)
    steps = [s for s in SESSIONS[name]() if only is None or int(s.key[:2]) in only]
    total = sum(ctx.box(s.box_s) for s in steps)
    print(f"{name}{' (dry run)' if dry else ''}: {len(steps)} steps, time boxes {total:.0f} s in all; work {work}, "
          f"bundle {out / (name + '.tar.gz')}", flush=True)
    records, t0 = [], time.monotonic()
    for i, step in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {step.key}: {step.title} (box {ctx.box(step.box_s):.0f} s) ...", flush=True)
        rec = run_step(ctx, step, cuda)
        records.append(rec)
        print(f"    {rec['status']} in {rec['seconds']:.0f} s  {tools.one_line(rec)}", flush=True)
        if rec["status"] not in ("ok", "skipped"):
            print(tools.tail(work / step.key / "log.txt", 12), flush=True)
        tools.write_summary(work, name, records, dry, time.monotonic() - t0)
        bundle(work, out, name)
    path = bundle(work, out, name)
    missing = check_bundle(path, name, records)
    for f in ("summary.json", "summary.md"):
        shutil.copy(work / f, out / f)
    print(tools.summary_table(records))
    print(f"bundle {path} ({path.stat().st_size / 1e6:.2f} MB)"
          + (f"; MISSING from it: {missing}" if missing else "; every step's log and JSON are in it"))
    bad = [r["step"] for r in records if r["status"] not in ("ok", "skipped")]
    return 1 if bad or missing else 0


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = argparse.ArgumentParser(prog="python -m omni_fast.bench.session", description=__doc__.split("\n\n")[1])
    parser.add_argument("session", choices=sorted(SESSIONS))
    parser.add_argument("--dry-run", action="store_true", help="wiring only, on a CPU (what CI runs)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_out")),
                        help="where the bundle and the summary go (default $OUT, else ./gpu_out)")
    parser.add_argument("--work", type=Path, default=None, help="the work folder (default: a fresh temp folder)")
    parser.add_argument("--steps", default=None, help="only these step numbers, e.g. 3,4 (a rerun)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply every time box (e.g. 0.8)")
    args = parser.parse_args(argv)
    # checked here, before any work: a typo used to end in a traceback, or (a zero / negative / NaN scale) in
    # every step "timeout", a device call lost
    if not (math.isfinite(args.time_scale) and args.time_scale > 0):
        parser.error(f"--time-scale must be a positive number, got {args.time_scale}")
    numbers = sorted({int(s.key[:2]) for s in SESSIONS[args.session]()})
    try:
        only = {int(s) for s in args.steps.split(",")} if args.steps else None
    except ValueError:
        parser.error(f"--steps must be step numbers separated by commas (of {numbers}), got {args.steps!r}")
    if only is not None and not only <= set(numbers):
        parser.error(f"--steps {args.steps}: {args.session} has the steps {numbers}")
    return run_session(args.session, args.out, dry=args.dry_run, work=args.work, only=only, scale=args.time_scale)


if __name__ == "__main__":
    sys.exit(main())
