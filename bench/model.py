"""``python -m omni_fast.bench.model [UNITS...] [--trace] [--json PATH] [--markdown] [--write-baseline]``

A cost model of omni-fast's units of work, with no GPU (see :mod:`omni_fast.bench.costmodel`):

- default (cheap, minutes): counts each unit's kernel launches on tiny configs with the real layer counts,
  compiles every Triton kernel for sm_90a (registers, spills, shared memory, occupancy, wgmma / mma / FMA, TMA),
  reads the byte traces saved by ``--trace``, and prints per unit the floor, the predicted H100 time and
  floor / predicted. Writes ``bench/results/model/model.json`` (or ``--json PATH``).
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

RESULTS = Path(__file__).resolve().parent / "results" / "model"
TRACES = RESULTS / "traces.json"
BASELINE = RESULTS / "launch_baseline.json"


def _select(units, names):
    return [u for u in units if not names or any(n in u.name for n in names)]


def _scaled(tr_kernels: dict, scale: dict) -> dict:
    """Full-shape stats from a scaled trace (rules in :mod:`omni_fast.bench.costmodel.units`)."""
    s = scale.get("s", 1)
    if s == 1:
        return tr_kernels
    out = {}
    for name, k in tr_kernels.items():
        k = dict(k)
        if scale["kernels"] == "all" or name in scale["kernels"]:
            for f in ("loaded", "stored", "flops"):
                k[f] *= s
            k["unique_loaded"] = k["unique_stored"] = 0
            if scale["rule"] == "heads":
                k["ctas"] = [c * s for c in k["ctas"]]
            else:  # "inter": the first GEMM of each (gate/up, down) pair has I-wide column tiles
                k["ctas"] = [c * s if i % 2 == 0 else c for i, c in enumerate(k["ctas"])]
        out[name] = k
    return out


def run_traces(units) -> dict:
    from omni_fast.bench.costmodel.counter import trace

    saved = json.loads(TRACES.read_text()) if TRACES.exists() else {}
    for u in units:
        if u.trace is None:
            continue
        t0 = time.time()
        fn = u.trace()
        tr = trace(fn, bytes=True, unique=u.unique)
        kernels = _scaled({n: s.as_dict() for n, s in tr.kernels.items()}, u.scale)
        saved[u.name] = {"kernels": kernels, "syncs": tr.syncs, "scale": u.scale, "unique": u.unique}
        print(f"traced {u.name} in {time.time() - t0:.0f} s (CPU time; not a speed)", flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        TRACES.write_text(json.dumps(saved, indent=1, sort_keys=True))
    return saved


def evaluate(units, statics: dict | None = None, traces: dict | None = None) -> list[dict]:
    """One row per unit: launches (tiny config), traced kernels (if any), static facts, floor and prediction."""
    from omni_fast.bench.costmodel.counter import trace
    from omni_fast.bench.costmodel.predict import assign_hbm, predict

    statics = statics or {}
    traces = traces if traces is not None else (json.loads(TRACES.read_text()) if TRACES.exists() else {})
    rows = []
    for u in units:
        tr = trace(u.launch(), warmup=True)
        counts = tr.launches()
        row = dict(unit=u.name, group=u.group, mode=u.mode, params=u.params, min_bytes=u.min_bytes, flops=u.flops,
                   launch_counts=counts, syncs=tr.syncs, traced=u.name in traces)
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
                k["static"] = {x: statics[n[7:]].get(x) for x in ("regs", "spill_bytes", "smem", "occupancy",
                                                                  "tensor_core", "tma", "num_warps")}
        row["kernels"] = kernels
        row.update(predict(row, statics))
        rows.append(row)
    return rows


def _fmt_s(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def table(rows) -> str:
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m omni_fast.bench.model", description=__doc__.split("\n\n")[1])
    p.add_argument("units", nargs="*")
    p.add_argument("--trace", action="store_true", help="trace bytes at real / scaled shapes (slow)")
    p.add_argument("--json", type=Path, default=None, help="output JSON (default bench/results/model/model.json)")
    p.add_argument("--markdown", action="store_true", help="print the BENCHMARKS.md table")
    p.add_argument("--write-baseline", action="store_true", help="save launch counts as the CI baseline")
    p.add_argument("--no-static", action="store_true", help="skip the sm_90a compiles")
    p.add_argument("--calibrate", type=Path, default=None, help="JSON of measured constants / a bench result")
    args = p.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from omni_fast.bench.costmodel import constants
    from omni_fast.bench.costmodel.model_units import all_units
    from omni_fast.bench.costmodel.statics import by_kernel, facts

    if args.calibrate:
        constants.calibrate(args.calibrate)
    units = _select(all_units(), args.units)
    if not units:
        print(f"no unit matches {args.units}")
        return 1
    if args.trace:
        run_traces(units)
    statics = {} if args.no_static else by_kernel(facts())
    rows = evaluate(units, statics)
    out = args.json or RESULTS / "model.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"note": "predicted from a model, not measured", "constants":
                               constants.current().as_dict(), "units": rows, "static_sm90a": statics},
                              indent=1, default=str))
    print(table(rows))
    if args.write_baseline:
        base = json.loads(BASELINE.read_text()) if BASELINE.exists() else {}
        base.update({r["unit"]: r["launch_counts"] for r in rows})
        BASELINE.write_text(json.dumps(base, indent=1, sort_keys=True))
    print(f"wrote {out} (predicted from a model, not measured)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
