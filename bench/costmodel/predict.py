"""The floor and the predicted H100 time of a unit (every constant from :mod:`.constants`).

Per kernel ``i`` (its launches averaged: bytes, FLOPs and CTAs per launch), with ``c`` the constants:

- HBM bytes ``b``: the distinct bytes the launch touched (traced with ``unique``); for a scaled trace (no distinct
  counts) the unit's minimum bytes shared out in proportion to the kernels' loaded + stored bytes (L2 assumed to
  catch every re-read: true for MoE / attention tiles whose re-reads are close in time);
- fill ``f = min(1, min(CTAs, sms * occupancy) * warps / (sms * warps_per_sm_full_bw))``; memory time
  ``b / (hbm_bytes_per_s * f)``;
- tensor-core time ``FLOPs / (mma_flops_per_s * min(1, CTAs / sms) * e)``, ``e`` the instruction's efficiency
  (wgmma: shared-memory bound below n64, see constants; mma.sync: ``mma_sync_fraction``; FMA: ``fma_fraction``);
- GPU time ``g_i = max(memory, tensor-core) + graph_node_s`` (the ~1.3 us gap of each kernel, graph or not).

Unit time: ``sum_i g_i`` in a CUDA graph; eager, ``sum_i max(host_i, g_i)`` with ``host_i`` the Python launch
cost (``eager_triton_s`` / ``eager_aten_s``), plus ``sync_s`` per host sync. Torch ops inside a traced unit carry
no bytes (small glue), but for the hidden copies the counter adds (``counter.HIDDEN_COPY_INPUTS``: their bytes).
A unit with no byte trace: its kernels' GPU work is the floor spread evenly, so
predicted = ``floor + n * graph_node_s`` (graph) or ``max(n_host_cost, floor + n * graph_node_s)`` (eager).

Floor: ``max(min_bytes / hbm_bytes_per_s, flops / mma_flops_per_s)`` (the rate x ``fma_fraction`` for a unit whose
GEMMs run in IEEE fp32, ``math="fp32"``: the FMA units; x ``tf32_fraction`` for ``"tf32"``); ``floor_pct = 100 * floor / predicted``.
"""

from __future__ import annotations

import math

from .constants import Constants, current


def tc_efficiency(tc: str | None, c: Constants) -> float:
    """Fraction of ``c.mma_flops_per_s`` a kernel's dots reach, from its instruction ``tc`` (a
    :func:`.statics.tensor_core` string): ``fma_fraction`` for "fma" / None, ``mma_sync_fraction`` for "mma.sync",
    and for "wgmma m64nNk16" the shared-memory bound ``min(1, intensity * smem_bytes_per_clk / tc_flops_per_clk)``."""
    if not tc or tc == "fma":
        return c.fma_fraction
    if tc == "mma.sync":
        return c.mma_sync_fraction
    n = int(tc.split("n")[1].split("k")[0])
    intensity = 2 * 64 * n * 16 / ((64 * 16 + 16 * n) * 2)
    return min(1.0, intensity * c.smem_bytes_per_clk / c.tc_flops_per_clk)


def kernel_time(k: dict, st: dict | None, c: Constants) -> dict:
    """GPU seconds per launch of one kernel row (see module docstring); ``st`` its static facts or None."""
    n = max(k["launches"], 1)
    ctas = (sum(k["ctas"]) / len(k["ctas"])) if k.get("ctas") else 1.0
    warps = (st or {}).get("num_warps", 4)
    occ = (st or {}).get("occupancy") or 1
    resident = min(ctas, c.sms * occ) * warps
    fill = min(1.0, resident / (c.sms * c.warps_per_sm_full_bw))
    mem = k.get("hbm_bytes", 0) / n / (c.hbm_bytes_per_s * fill)
    flops = k.get("flops", 0) / n
    mma = flops / (c.mma_flops_per_s * min(1.0, ctas / c.sms) * tc_efficiency((st or {}).get("tensor_core"), c)) \
        if flops else 0.0
    return {"fill": fill, "mem_s": mem, "mma_s": mma, "gpu_s": max(mem, mma) + c.graph_node_s}


def assign_hbm(kernels: dict[str, dict], min_bytes: float) -> None:
    """Set ``hbm_bytes`` on every kernel row (distinct bytes, or the minimum shared out; module docstring)."""
    traced = [k for k in kernels.values() if k.get("loaded", 0) + k.get("stored", 0)]
    if traced and all(k.get("unique_loaded", 0) + k.get("unique_stored", 0) for k in traced):
        for k in kernels.values():
            k["hbm_bytes"] = k.get("unique_loaded", 0) + k.get("unique_stored", 0)
        return
    total = sum(k.get("loaded", 0) + k.get("stored", 0) for k in kernels.values())
    for k in kernels.values():
        k["hbm_bytes"] = min_bytes * (k.get("loaded", 0) + k.get("stored", 0)) / total if total else 0


def predict(unit: dict, statics: dict[str, dict], c: Constants | None = None) -> dict:
    """Predicted seconds of a unit row (``kernels``, ``mode``, ``min_bytes``, ``flops``, ``syncs``, ``traced``)."""
    c = c or current()
    rate = c.mma_flops_per_s * {"fp32": c.fma_fraction, "tf32": c.tf32_fraction}.get(unit.get("math"), 1.0)
    floor = max(unit["min_bytes"] / c.hbm_bytes_per_s, unit["flops"] / rate)
    kernels = unit["kernels"]
    n = sum(k["launches"] for k in kernels.values())
    host = sum(k["launches"] * (c.eager_triton_s if name.startswith("triton:") else c.eager_aten_s)
               for name, k in kernels.items())
    eager = unit["mode"] == "eager"
    if not unit.get("traced"):
        gpu = floor + n * c.graph_node_s
        pred = max(host, gpu) if eager else gpu
    else:
        pred = 0.0
        for name, k in kernels.items():
            st = statics.get(name.split(":", 1)[1]) if name.startswith("triton:") else None
            t = kernel_time(k, st, c)
            k.update(model={kk: round(v, 9) for kk, v in t.items()})
            h = c.eager_triton_s if name.startswith("triton:") else c.eager_aten_s
            pred += k["launches"] * (max(h, t["gpu_s"]) if eager else t["gpu_s"])
    pred += unit.get("syncs", 0) * c.sync_s
    return {"floor_s": floor, "predicted_s": pred, "floor_pct": 100.0 * floor / pred if pred else math.nan,
            "launches": n, "host_s": host}
