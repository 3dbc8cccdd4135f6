"""``python -m omni_fast.bench.model [UNITS...] [--trace] [--json PATH] [--markdown] [--write-baseline]``

A cost model of omni-fast's units of work, with no GPU (see :mod:`omni_fast.bench.costmodel`):

- default (cheap, minutes): counts each unit's kernel launches on tiny configs with the real layer counts,
  compiles every Triton kernel for sm_90a (registers, spills, shared memory, occupancy, wgmma / mma / FMA, TMA),
  reads the byte traces saved by ``--trace`` (and the sm_90a facts saved in ``static_sm90a.json``; ``--static``
  recompiles them), and prints per unit the floor, the predicted H100 time and
  floor / predicted. Writes ``bench/results/model/model.json`` (or ``--json PATH``); with UNITS, their rows
  replace theirs there and the other units' rows are kept.
- ``--trace`` (expensive, ~10-20 min on one core): runs the units at real (or exactly scaled) shapes under the
  instrumented interpreter and saves per-kernel bytes / FLOPs / CTAs to ``bench/results/model/traces.json``.
- ``--markdown``: print the BENCHMARKS.md section; ``--write-baseline``: save the launch counts as the CI gate's
  baseline (``bench/results/model/launch_baseline.json``); ``--calibrate FILE``: constants from a GPU run.

UNITS: substrings of unit names (``moe``, ``attn-decode``, ``talker-step``, ...); all units when none.
Everything this prints is predicted from a model, not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from omni_fast.bench.cli_paths import output_path_problem

RESULTS = Path(__file__).resolve().parent / "results" / "model"
TRACES = RESULTS / "traces.json"
BASELINE = RESULTS / "launch_baseline.json"
STATICS = RESULTS / "static_sm90a.json"
COUNTS = RESULTS / "launch_counts.json"


def _select(units, names):
    """The units whose name contains one of ``names`` (all when empty), in the order ``names`` are given."""
    if not names:
        return list(units)
    return sorted((u for u in units if any(n in u.name for n in names)),
                  key=lambda u: min(i for i, n in enumerate(names) if n in u.name))


def _scaled(tr_kernels: dict, scale: dict, half: dict | None = None) -> dict:
    """Full-shape stats from scaled traces (rules in :mod:`omni_fast.bench.costmodel.units`).

    ``heads``: every count times ``s``. ``inter``: ``tr_kernels`` traced at I/s, ``half`` at 2I/s; every count is
    affine in I, so the full-shape value is ``f(I/s) + (f(2I/s) - f(I/s)) * (s - 1)`` (per launch for CTAs).
    """
    s = scale.get("s", 1)
    if s == 1:
        return tr_kernels
    out = {}
    for name, k in tr_kernels.items():
        k = dict(k)
        if scale["kernels"] == "all" or name in scale["kernels"]:
            k["unique_loaded"] = k["unique_stored"] = 0
            if scale["rule"] == "heads":
                for f in ("loaded", "stored", "flops"):
                    k[f] *= s
                k["ctas"] = [c * s for c in k["ctas"]]
            else:
                h = half[name]
                for f in ("loaded", "stored", "flops"):
                    k[f] += (h[f] - k[f]) * (s - 1)
                k["ctas"] = [c + (c2 - c) * (s - 1) for c, c2 in zip(k["ctas"], h["ctas"])]
        out[name] = k
    return out


def run_traces(units) -> dict:
    """Trace ``units`` (those with a ``trace``) at real / scaled shapes under the instrumented interpreter: per-kernel
    bytes, FLOPs and CTAs, scaled to the real shape by the unit's rule. Each unit's entry is written to ``TRACES`` as
    soon as it is done; returns every saved entry ``{unit name: {"kernels", "syncs", "scale", "unique"}}``."""
    from omni_fast.bench.costmodel.counter import trace

    saved = json.loads(TRACES.read_text()) if TRACES.exists() else {}
    for u in units:
        if u.trace is None:
            continue
        t0 = time.time()
        tr = trace(u.trace(), bytes=True, unique=u.unique, warmup=u.warmup)
        kernels = {n: s.as_dict() for n, s in tr.kernels.items()}
        half = None
        if u.scale.get("rule") == "inter":  # the second point of the affine rule: I * 2 / s
            s2 = u.scale["s"] // 2 if u.scale["s"] % 2 == 0 else u.scale["s"] / 2  # the divisor of 2I / s
            half = {n: s.as_dict() for n, s in trace(u.trace(s2), bytes=True, unique=u.unique,
                                                     warmup=u.warmup).kernels.items()}  # as the first point
        kernels = _scaled(kernels, u.scale, half)
        saved[u.name] = {"kernels": kernels, "syncs": tr.syncs, "scale": u.scale, "unique": u.unique}
        print(f"traced {u.name} in {time.time() - t0:.0f} s of interpreter wall time (not a speed)", flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        on_disk = json.loads(TRACES.read_text()) if TRACES.exists() else {}
        TRACES.write_text(json.dumps(dict(on_disk, **{u.name: saved[u.name]}), indent=1, sort_keys=True))
    return saved


def kernel_facts(statics: dict, hints: dict) -> dict[str, dict]:
    """``{kernel fn name: facts}``: the specialisation named by the unit's hint (a substring of the static case
    name), else the kernel's worst (most registers) specialisation."""
    from omni_fast.bench.costmodel.statics import by_kernel

    out = by_kernel(statics)
    for kernel, sub in hints.items():
        match = [dict(v, case=name) for name, v in statics.items() if v["kernel"] == kernel and sub in name]
        if match:
            out[kernel] = match[0]
    return out


def count_units(units, reuse: bool = False) -> dict:
    """``{unit: {"counts": {kernel: launches}, "syncs": n}}`` on the tiny configs, saved to ``COUNTS`` after each
    unit (``reuse``: take the saved ones where present)."""
    from omni_fast.bench.costmodel.counter import count_unit

    saved = json.loads(COUNTS.read_text()) if COUNTS.exists() else {}
    out = {}
    for u in units:
        if not (reuse and u.name in saved):
            tr = count_unit(u)
            saved[u.name] = {"counts": tr.launches(), "syncs": tr.syncs}
            RESULTS.mkdir(parents=True, exist_ok=True)
            on_disk = json.loads(COUNTS.read_text()) if COUNTS.exists() else {}  # another run may have added some
            COUNTS.write_text(json.dumps(dict(on_disk, **{u.name: saved[u.name]}), indent=1, sort_keys=True))
            print(f"counted {u.name}: {sum(tr.launches().values())} launches", flush=True)
        out[u.name] = saved[u.name]
    return out


def evaluate(units, statics: dict | None = None, traces: dict | None = None, counted: dict | None = None
             ) -> list[dict]:
    """One row per unit: launches (tiny config), traced kernels (if any), static facts, floor and prediction.
    ``statics``: ``{static case name: facts}`` (:func:`omni_fast.bench.costmodel.statics.facts`)."""
    from omni_fast.bench.costmodel.predict import assign_hbm, predict

    counted = counted if counted is not None else count_units(units)
    all_statics = statics or {}
    traces = traces if traces is not None else (json.loads(TRACES.read_text()) if TRACES.exists() else {})
    rows = []
    for u in units:
        statics = kernel_facts(all_statics, u.statics)
        counts = counted[u.name]["counts"]
        row = dict(unit=u.name, group=u.group, mode=u.mode, params=u.params, min_bytes=u.min_bytes, flops=u.flops,
                   math=u.math,
                   launch_counts=counts, syncs=counted[u.name]["syncs"], traced=u.name in traces)
        if row["traced"]:
            kernels = {n: dict(k) for n, k in traces[u.name]["kernels"].items()}
            assign_hbm(kernels, u.min_bytes)
            row["scale"] = traces[u.name].get("scale", {})
        else:
            kernels = {n: {"launches": c} for n, c in counts.items()}
        # launch counts are the tiny config's (real layer counts); bytes the real-shape trace's
        for n, k in kernels.items():
            k["launches"] = counts.get(n, k["launches"])
            if n.startswith("triton:") and n[7:] in statics:
                k["static"] = {x: statics[n[7:]].get(x) for x in ("case", "regs", "spill_bytes", "smem", "occupancy",
                                                                  "tensor_core", "tma", "num_warps")}
        row["kernels"] = kernels
        row.update(predict(row, statics))
        rows.append(row)
    return rows


def _fmt_s(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def table(rows) -> str:
    """The evaluated ``rows`` as a markdown table: launches, CTAs, HBM MB, GFLOP, floor, predicted time and
    floor / predicted per unit."""
    lines = ["| unit | mode | launches (triton + torch) | CTAs (max) | HBM MB (traced / min) | GFLOP | floor | "
             "predicted | floor / predicted |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = r["kernels"]
        tri = sum(v["launches"] for n, v in k.items() if n.startswith("triton:"))
        ctas = max([c for v in k.values() for c in v.get("ctas", [])] or [0])
        hbm = sum(v.get("hbm_bytes", 0) for v in k.values())
        traced = f"{hbm / 1e6:.1f}" if r["traced"] else "-"
        lines.append(f"| {r['unit']} | {r['mode']} | {r['launches']} ({tri} + {r['launches'] - tri}) | "
                     f"{ctas or '-'} | {traced} / {r['min_bytes'] / 1e6:.1f} | {r['flops'] / 1e9:.2f} | "
                     f"{_fmt_s(r['floor_s'])} | {_fmt_s(r['predicted_s'])} | {r['floor_pct']:.0f} % |")
    return "\n".join(lines)


SECTION = "## Cost model (predicted from a model, not measured)"


def markdown(rows) -> str:
    """The BENCHMARKS.md section: how the numbers are made, then the table."""
    from omni_fast.bench.costmodel.constants import current

    c = current()
    return "\n".join([
        SECTION, "",
        "Every number here is **predicted from a model, not measured** (no GPU has run this library). Made by "
        "`python -m omni_fast.bench.model` (bench/model.py, bench/costmodel/): launches counted on tiny configs "
        "with the real layer counts (Triton launches + torch kernels seen by a dispatch mode); HBM bytes, FLOPs "
        "and CTAs traced by the instrumented Triton interpreter at the real (or exactly scaled) shapes where a "
        "trace exists (`--trace`, not in CI), else the unit's minimum bytes; sm_90a facts from the static compile. "
        f"Model: floor = max(min bytes / {c.hbm_bytes_per_s / 1e12:.1f} TB/s, FLOPs / "
        f"{c.mma_flops_per_s / 1e12:.0f} TFLOP/s); per kernel max(bytes / (bandwidth x CTA fill of {c.sms} SMs), "
        f"FLOPs / tensor-core rate) + {c.graph_node_s * 1e6:.1f} us per kernel; eager units pay at least "
        f"{c.eager_triton_s * 1e6:.0f} us per Triton launch and {c.eager_aten_s * 1e6:.0f} us per torch op on the host. "
        "Constants and their sources: bench/costmodel/constants.py; the model: bench/costmodel/predict.py. "
        "JSON: bench/results/model/model.json.", "",
        table(rows), ""])


def update_benchmarks(section: str, path: Path = Path(__file__).resolve().parent.parent / "BENCHMARKS.md") -> None:
    """Replace the cost-model section of BENCHMARKS.md (up to the next ``## `` heading) or append it."""
    text = path.read_text()
    if SECTION in text:
        head, rest = text.split(SECTION, 1)
        nxt = rest.find("\n## ")
        text = head + section + (rest[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv=None) -> int:
    """The ``python -m omni_fast.bench.model`` command line (the module doc); re-runs itself with
    ``TRITON_INTERPRET=1`` when unset. Returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m omni_fast.bench.model", description=__doc__.split("\n\n")[1])
    p.add_argument("units", nargs="*")
    p.add_argument("--trace", action="store_true", help="trace bytes at real / scaled shapes (slow)")
    p.add_argument("--json", type=Path, default=None, help="output JSON (default bench/results/model/model.json, "
                   "where the rows of the selected UNITS replace theirs)")
    p.add_argument("--markdown", action="store_true", help="print the BENCHMARKS.md table")
    p.add_argument("--update-benchmarks", action="store_true",
                   help="write the table into BENCHMARKS.md (replacing its cost-model section)")
    p.add_argument("--write-baseline", action="store_true", help="save launch counts as the CI baseline")
    p.add_argument("--reuse-counts", action="store_true", help="launch counts from launch_counts.json where saved")
    p.add_argument("--saved-only", action="store_true", help="only the units launch_counts.json has (no counting)")
    facts_src = p.add_mutually_exclusive_group()  # (both: --static was dropped without a word)
    facts_src.add_argument("--no-static", action="store_true", help="no sm_90a facts")
    facts_src.add_argument("--static", action="store_true",
                           help="recompile the sm_90a facts (~5 min; else the saved ones)")
    p.add_argument("--calibrate", type=Path, default=None, help="JSON of measured constants / a bench result")
    args = p.parse_args(argv)
    if args.calibrate is not None and not args.calibrate.is_file():
        p.error(f"--calibrate: no such file: {args.calibrate}")
    problem = args.json is not None and output_path_problem(args.json, folder=False)
    if problem:  # (was an IsADirectoryError traceback once every unit had been counted)
        p.error(f"--json: {problem}")
    if os.environ.get("TRITON_INTERPRET") != "1":  # must be set before triton is first imported: re-run with it
        import subprocess

        env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        return subprocess.run([sys.executable, "-m", "omni_fast.bench.model", *(argv if argv is not None
                                                                              else sys.argv[1:])], env=env).returncode

    from omni_fast.bench.costmodel import constants
    from omni_fast.bench.costmodel.model_units import all_units
    from omni_fast.bench.costmodel.statics import facts

    if args.calibrate:
        try:
            constants.calibrate(args.calibrate)
        except ValueError as exc:  # (a JSON error is a ValueError too)
            print(f"--calibrate {args.calibrate}: {exc}", file=sys.stderr)
            return 2
    units = _select(all_units(), args.units)
    if not units:
        print(f"no unit matches {args.units}")
        return 1
    if args.saved_only:
        saved = json.loads(COUNTS.read_text()) if COUNTS.exists() else {}
        missing = [u.name for u in units if u.name not in saved]
        if missing:
            print(f"not counted yet (left out): {missing}")
        units, args.reuse_counts = [u for u in units if u.name in saved], True
    if args.trace:
        run_traces(units)
    if args.no_static:
        statics = {}
    elif args.static or not STATICS.exists():
        statics = facts()
        RESULTS.mkdir(parents=True, exist_ok=True)
        STATICS.write_text(json.dumps(statics, indent=1, sort_keys=True))
    else:
        statics = json.loads(STATICS.read_text())
    counted = count_units(units, reuse=args.reuse_counts)
    if args.write_baseline:
        base = json.loads(BASELINE.read_text()) if BASELINE.exists() else {}
        base.update({name: c["counts"] for name, c in counted.items()})
        BASELINE.write_text(json.dumps(base, indent=1, sort_keys=True))
    rows = evaluate(units, statics, counted=counted)
    print(markdown(rows) if args.markdown else table(rows))
    subset = len(units) < len(all_units())
    written = write_results(args.json or RESULTS / "model.json", rows, [u.name for u in all_units()],
                            merge=subset and args.json is None)
    if args.update_benchmarks:
        if written is None or (subset and args.json is not None):
            print("--update-benchmarks: not done (BENCHMARKS.md's table needs every unit: run without UNITS, or "
                  "without --json so the selected rows merge into bench/results/model/model.json)")
            return 1
        update_benchmarks(markdown(written))
    return 0


def write_results(out: Path, rows: list, order: list, merge: bool) -> list | None:
    """Write ``rows`` (with the constants in force) to ``out``; returns the rows written, None when nothing was.

    ``merge`` (a subset of the units into the default file): the selected units' rows replace theirs in the saved
    file and every other unit's row is kept (in ``order``), so ``python -m omni_fast.bench.model UNIT`` for a
    before/after does not cut the committed results down to one unit. Saved rows made with other constants (a
    ``--calibrate`` run) are not mixed with these: the file is then left as it is.
    """
    from omni_fast.bench.costmodel import constants

    consts = json.loads(json.dumps(constants.current().as_dict(), default=str))
    if merge and out.exists():
        saved = json.loads(out.read_text())
        if saved.get("constants") != consts:
            print(f"not written: {out} holds rows made with other constants; run every unit, or pass --json PATH")
            return None
        by_name = {r["unit"]: r for r in saved.get("units", [])}
        by_name.update({r["unit"]: r for r in rows})
        rows = [by_name[n] for n in order if n in by_name]
        note = f"merged: {len(by_name) - len(rows)} rows of unknown units dropped" if len(rows) < len(by_name) \
            else "merged with the saved rows of the other units"
    else:
        note = None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"note": "predicted from a model, not measured", "constants": consts, "units": rows},
                              indent=1, default=str))
    print(f"wrote {out}" + (f" ({note})" if note else "") + " (predicted from a model, not measured)")
    return rows


def calibrate(measurements) -> dict:
    """The GPU session's calibration hook (first light's ``06_calibrate``, :func:`omni_fast.bench.session_tools.
    calibrate`): the constants the session's measured JSONs imply. Each bench family's
    result carries the two measured ceilings (``roofline``: copy GB/s, bf16 matmul TFLOP/s); their median over the
    families replaces ``hbm_bytes_per_s`` / ``mma_flops_per_s`` (files without a roofline, e.g. ``pipeline.json``,
    or unreadable ones are left out); ``constants`` holds those measured fields only. Nothing global changes:
    ``--calibrate FILE`` applies the result."""
    import math
    import statistics

    from omni_fast.bench.costmodel import constants

    if isinstance(measurements, (str, Path)):  # (iterating it would read one "file" per character, silently)
        raise TypeError(f"measurements must be a list of JSON file paths, got the single path {measurements!r}")
    roofs = {}
    for f in measurements:
        try:
            data = json.loads(Path(f).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("roofline"), dict):
            roofs[str(f)] = data["roofline"]
    merged = {}
    for key in ("copy_gbps", "matmul_tflops"):
        # a failed measurement (0, NaN, inf, or a bool) is no ceiling: a zero one would divide the predictions by 0
        seen = [float(r[key]) for r in roofs.values() if isinstance(r.get(key), (int, float))
                and not isinstance(r[key], bool) and math.isfinite(r[key]) and r[key] > 0]
        if seen:
            merged[key] = statistics.median(seen)
    # only the constants this run measured: an older calibration.json applied later must not pin the others to
    # the defaults of the day it was written
    return {"note": "measured ceilings of this GPU run; apply with python -m omni_fast.bench.model --calibrate",
            "roofline": merged, "from": sorted(roofs),
            "constants": constants.measured_values({"roofline": merged})}


if __name__ == "__main__":
    sys.exit(main())
