"""Helpers of the prepared GPU sessions (:mod:`omni_fast.bench.session`): the two steps that are Python of their own
(``env``: versions and device; ``calibrate``: the cost-model hook), and what each step's record holds.

    python -m omni_fast.bench.session_tools env --json PATH
    python -m omni_fast.bench.session_tools calibrate --results WORK --json PATH [--dry-run]

The calibration hook: when ``omni_fast.bench.model`` (the cost model, issue 15) is in the checkout and has a
``calibrate`` function, it is called as ``calibrate(measurements, out_dir=STEP_DIR)`` (or ``out=``, or with the
measurements alone, whichever its signature takes), ``measurements`` being the sorted list of the session's
measured JSON files (every ``*/results/<device>/*.json``: the bench families' runs and ``pipeline.json``); a dict it
returns is written as ``calibration.json`` next to the measurements. Without the module or the function the step
logs one line saying so and is recorded as skipped.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

SMI_FIELDS = ("name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,pstate,"
              "temperature.gpu,power.draw,power.limit")


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def read_ids(path: Path) -> list[str]:
    """The pytest node ids of a list file: one per line, ``#`` starts a comment, blank lines skipped. An id written
    ``?tests/x.py::test_y[...]`` is optional: kept only when ``tests/x.py`` defines ``test_y`` (a test another
    branch is adding: listed before it lands, run once it has)."""
    from omni_fast._layout import REPO_ROOT

    out = []
    for line in Path(path).read_text().splitlines():
        node = line.split("#", 1)[0].strip()
        if node.startswith("?"):
            node = node[1:].strip()
            file, _, func = node.partition("::")
            source = Path(REPO_ROOT, file)
            if not (source.is_file() and f"def {func.split('[')[0]}(" in source.read_text()):
                continue
        if node:
            out.append(node)
    return out


def tail(path: Path, n: int) -> str:
    lines = Path(path).read_text(errors="replace").splitlines() if Path(path).is_file() else []
    return "\n".join("      | " + line for line in lines[-n:])


def _run(argv: list[str], timeout: float = 10.0) -> str | None:
    """stdout of a tool, or None when it is missing or fails."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _version(module: str) -> str | None:
    try:
        return str(getattr(importlib.import_module(module), "__version__", "present"))
    except Exception:  # noqa: BLE001 - absent or broken: recorded as None
        return None


def nvidia_smi() -> dict | None:
    out = _run(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader"])
    if not out:
        return None
    return dict(zip(SMI_FIELDS.split(","), (v.strip() for v in out.splitlines()[0].split(","))))


def collect_env() -> dict:
    """Versions (torch, triton, transformers, CUDA, CuPy, test plugins, peers), the GPU's properties, and the
    driver's view of it (nvidia-smi) idle and right after ~0.3 s of bf16 matmuls (the SM clock under load)."""
    import torch

    from omni_fast.bench.harness import git_commit

    commit = git_commit()  # the device tool's copy of the tree may come without .git: then the caller's word
    commit = os.environ.get("OMNI_FAST_COMMIT", commit) if commit == "unknown" else commit
    info = {"python": platform.python_version(), "commit": commit, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda}
    for mod in ("triton", "transformers", "cupy", "numpy", "xdist", "pytest_timeout", "liger_kernel"):
        info[mod] = _version(mod)
    nvcc = (_run(["nvcc", "--version"]) or "").splitlines()
    info["nvcc"] = nvcc[-1] if nvcc else None
    info["compute_sanitizer"] = shutil.which("compute-sanitizer")
    info["smi_idle"] = nvidia_smi()
    if torch.cuda.is_available():
        from omni_fast.kernels import cuda_cupy

        info["cupy_compile"] = cuda_cupy.compile_check() if info["cupy"] else None  # NVRTC + CUDA headers
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count,
                       "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
                       "memory_gib": round(total / 2**30, 1), "free_gib": round(free / 2**30, 1)}
        a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        t = time.perf_counter()
        while time.perf_counter() - t < 0.3:
            for _ in range(20):
                a @ a
            torch.cuda.synchronize()
        info["smi_after_matmuls"] = nvidia_smi()
    return info


def calibrate(results: Path, out_json: Path, dry: bool) -> dict:
    """The cost-model hook (see the module docstring); returns the step's record fields."""
    try:
        model = importlib.import_module("omni_fast.bench.model")
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("omni_fast.bench.model"):
            raise  # the model is there but one of its imports is not: a real failure
        return {"status": "skipped", "reason": "omni_fast.bench.model (the cost model, issue 15) is not in this checkout"}
    fn = getattr(model, "calibrate", None)
    if not callable(fn):
        return {"status": "skipped", "reason": "omni_fast.bench.model has no calibrate() yet"}
    files = sorted(Path(results).glob("*/results/*/*.json"))
    params = inspect.signature(fn).parameters
    kw = next(({k: out_json.parent} for k in ("out_dir", "out") if k in params), {})
    if dry:
        return {"status": "ok", "wiring_only": f"calibrate{inspect.signature(fn)} found; would get {len(files)} "
                                               f"measurement files{' and ' + next(iter(kw)) + '=' if kw else ''}"}
    if not files:
        return {"status": "skipped", "reason": "no measured JSON in this session (the bench steps saved none)"}
    constants = fn(files, **kw)
    return {"status": "ok", "measurements": [str(f.relative_to(results)) for f in files],
            "constants": constants if isinstance(constants, dict) else repr(constants)}


# --- what each step's record holds ------------------------------------------------------------------------------


def summarize_env(ctx, d: Path, rec: dict) -> dict:
    f = d / "env.json"
    return {"env": json.loads(f.read_text())} if f.is_file() else {}


def summarize_static(ctx, d: Path, rec: dict) -> dict:
    log = (d / "log.txt").read_text(errors="replace")
    verdict = re.findall(r"Static sm_90a check: (PASS|FAIL.*)", log)
    count = re.search(r"Static sm_90a check: (\d+) kernel specialisations", log)
    return {"verdict": verdict[-1] if verdict else None, "kernels": int(count.group(1)) if count else None,
            "problems": [line.strip() for line in log.splitlines() if re.search(r"\sFAIL\b", line)][:20]}


def summarize_junit(d: Path, rec: dict, expect: int | None = None) -> dict:
    """Counts and failed ids from ``junit.xml``; ``expect`` (the dry run): every listed id collected, else failed."""
    f = d / "junit.xml"
    if not f.is_file():
        return {"tests": None}
    cases = list(ET.parse(f).getroot().iter("testcase"))
    out = {"tests": len(cases), "failed": [], "skipped": 0}
    for c in cases:
        tags = {child.tag for child in c}
        if tags & {"failure", "error"}:
            out["failed"].append(f"{c.get('classname')}::{c.get('name')}")
        elif "skipped" in tags:
            out["skipped"] += 1
    out["passed"] = len(cases) - len(out["failed"]) - out["skipped"]
    out["failed"] = out["failed"][:30]
    if expect is not None and len(cases) != expect and rec.get("status") == "ok":
        out["status"] = "failed"
        out["error"] = f"{expect} ids listed, {len(cases)} gpu-marked tests collected (a stale or unmarked id)"
    return out


def summarize_memcheck(ctx, d: Path, rec: dict) -> dict:
    log = (d / "log.txt").read_text(errors="replace")
    if "SANITIZER UNAVAILABLE" in log:  # the probe failed: no memcheck possible here (not a test failure)
        tail = log[log.index("SANITIZER UNAVAILABLE"):].strip().splitlines()
        return {"status": "skipped", "sanitizer": "unavailable", "reason": " | ".join(tail[:6])[:400]}
    errors = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", log)]
    collected = re.search(r"(\d+) tests? collected", log)
    if not (d / "junit.xml").is_file() and collected:  # the dry run: --collect-only
        return {"collected": int(collected.group(1))}
    return {**summarize_junit(d, rec), "sanitizer_errors": sum(errors) if errors else None,
            "sanitizer_processes": len(errors)}


def summarize_bench(ctx, d: Path, rec: dict) -> dict:
    files = sorted((d / "results").glob("*/*.json"))
    if not files:
        m = re.search(r"(\d+) cases \(preset", (d / "log.txt").read_text(errors="replace"))
        return {"results": [], "cases_listed": int(m.group(1)) if m else None}
    res = json.loads(files[-1].read_text())
    rows = res.get("rows", [])
    out = {"results": [str(f.relative_to(d)) for f in files], "device": res.get("device"),
           "roofline": res.get("roofline"), "rows": len(rows),
           "timed": sum("ms" in r for r in rows), "errors": sum("error" in r for r in rows),
           "skipped": sum("skipped" in r for r in rows)}
    if res.get("incomplete"):
        out["incomplete"] = res["incomplete"]
        if rec.get("status") == "ok":
            out["status"] = "partial"
    return out


def summarize_pipeline(ctx, d: Path, rec: dict) -> dict:
    files = sorted((d / "results").glob("*/pipeline.json"))
    if files:
        return {"results": [str(f.relative_to(d)) for f in files], "runs": json.loads(files[-1].read_text())["runs"]}
    runs = []  # cut off: the per-run JSON lines it printed
    for line in (d / "log.txt").read_text(errors="replace").splitlines():
        if line.startswith("{") and '"provider"' in line:
            try:
                runs.append(json.loads(line))
            except ValueError:
                pass
    return {"runs": runs}


def summarize_tune(ctx, d: Path, rec: dict) -> dict:
    files = sorted((d / "configs").glob("*.json"))
    return {"configs": {f.name: sorted(json.loads(f.read_text()), key=int) for f in files}}


def summarize_json_file(ctx, d: Path, rec: dict) -> dict:
    """The record a Python step wrote itself (``calibration.json``'s ``status`` overrides the exit status's)."""
    f = d / "calibration.json"
    if not f.is_file():
        return {}
    data = json.loads(f.read_text())
    return data if rec.get("status") == "ok" else {k: v for k, v in data.items() if k != "status"}


# --- the session summary -----------------------------------------------------------------------------------------


def one_line(rec: dict) -> str:
    """A step's key facts in one line."""
    if rec.get("error"):
        return rec["error"]
    if "verdict" in rec:
        return f"{rec['verdict']} ({rec.get('kernels')} specialisations)"
    if "passed" in rec:
        extra = f", sanitizer errors {rec['sanitizer_errors']}" if rec.get("sanitizer_errors") is not None else ""
        return f"{rec['passed']} passed, {len(rec['failed'])} failed, {rec['skipped']} skipped{extra}"
    if "rows" in rec:
        return f"{rec['timed']} timed, {rec['errors']} errors, {rec['skipped']} skipped" + \
            (f" ({rec['incomplete']})" if rec.get("incomplete") else "")
    if "collected" in rec:
        return f"{rec['collected']} tests collected"
    if "cases_listed" in rec:
        return f"{rec['cases_listed']} cases listed"
    if "runs" in rec:
        return f"{len(rec['runs'])} pipeline runs"
    if "configs" in rec:
        return "; ".join(f"{k}: T={v}" for k, v in rec["configs"].items()) or "no config written"
    if "env" in rec:
        e = rec["env"]
        return f"{(e.get('gpu') or {}).get('name', 'no GPU')}, torch {e.get('torch')}, triton {e.get('triton')}"
    return rec.get("reason") or rec.get("wiring_only") or ""


def summary_table(records: list[dict]) -> str:
    lines = ["| step | status | s / box | facts |", "|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['step']} | {r['status']} | {r.get('seconds', 0):.0f} / {r['box_s']:.0f} | "
                     f"{one_line(r).replace('|', '/')} |")
    return "\n".join(lines)


def write_summary(work: Path, name: str, records: list[dict], dry: bool, seconds: float) -> None:
    env = next((r["env"] for r in records if "env" in r), {})
    summary = {"session": name, "dry_run": dry, "seconds": round(seconds, 1), "device": (env.get("gpu") or {}).get("name"),
               "commit": env.get("commit"), "steps": records}
    (work / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (work / "summary.md").write_text(f"# {name}{' (dry run)' if dry else ''}: {summary['device'] or 'no GPU'}, "
                                     f"commit {summary['commit']}, {seconds:.0f} s\n\n{summary_table(records)}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omni_fast.bench.session_tools")
    parser.add_argument("what", choices=("env", "calibrate"))
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--results", type=Path, default=None, help="calibrate: the session's work folder")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.what == "env":
        data = collect_env()
    else:
        data = calibrate(args.results, args.json, args.dry_run)
        print(f"calibrate: {data['status'].upper()}: {data.get('reason') or data.get('wiring_only') or 'done'}")
    args.json.write_text(json.dumps(data, indent=1, default=str))
    print(json.dumps(data, indent=1, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
