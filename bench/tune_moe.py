"""Tune the fused-MoE grouped-GEMM launch configs on a GPU and write them as JSON files.

    python -m omni_fast.bench.tune_moe                      # thinker N=768 and talker N=384, N=192; all token buckets
    python -m omni_fast.bench.tune_moe --n 384 --tokens 1 16 256 4096 --quick

One file per (E, N, dtype, device, Triton version) under ``omni_fast/configs/moe/``, named like
``E=128,N=768,dtype=bf16,device=NVIDIA_H100_80GB_HBM3,triton=3.6.0.json`` (see
:func:`omni_fast.kernels.moe_gemm.config_file_stem`), mapping a token-count bucket to a config::

    {"1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 4,
           "num_stages": 4, "USE_TMA": true, "down": {"BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, ...}}, "2": {...}}

``USE_TMA`` picks the weight path of each GEMM: TMA tensor descriptors for the weight tiles (Hopper's bulk tensor
copies) or pointer loads; both are in the search space, so each shape and bucket keeps whichever is faster.

The top-level keys configure the gate/up GEMM (SwiGLU fused), ``down`` the second GEMM (routed weight fused);
``BLOCK_SIZE_M`` is shared because it is the alignment block. For each bucket and each ``BLOCK_SIZE_M``, the two
GEMMs are timed separately over the search space (CUDA events via ``triton.testing.do_bench``, fixed random
routing), and the ``BLOCK_SIZE_M`` with the smallest sum wins. At run time
:func:`omni_fast.kernels.moe_gemm.get_config` picks the bucket nearest the call's T; without a file it falls
back to :func:`omni_fast.kernels.moe_gemm.default_config`.

Quantized experts (``--format fp8_block|fp8_channel|int4_w4a16``): the same loop over the quantized kernel's two
GEMMs, a search space that keeps its tile constraints, pruned by the sm_90a static compile, and a file named with
the format's tag (vLLM's ``dtype=fp8_w8a8,block_shape=[128,128]`` / ``dtype=fp8_w8a8`` / ``dtype=int4_w4a16``);
see :mod:`omni_fast.bench.tune_moe_quant`.

Needs a CUDA GPU: on a CPU-only machine it prints a message and exits with status 2. ``--device cpu`` (tests and
the GPU session's dry run, on the interpreter at toy sizes) checks the wiring with a wall-clock timer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import types
from pathlib import Path

import torch

import omni_fast
from omni_fast.bench.cli_paths import output_path_problem, positive_int, positive_seconds

# (N = expert intermediate) -> (hidden, top_k): the Qwen3-Omni thinker, talker, and the talker with the
# experts' intermediate split in two (tensor parallel 2).
SHAPES = {768: (2048, 8), 384: (1024, 6), 192: (1024, 6)}
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 8192, 16384)
SMEM_LIMIT = 227 * 1024
# The checkout's config directory (shipped with the package; see its README.md), not wherever the installed
# package happens to resolve kernels.launch.CONFIG_DIR.
OUT_DIR = Path(omni_fast.__file__).resolve().parent / "configs" / "moe"


def tile_axes(quick: bool) -> dict:
    """The search axes both MoE tuners share, in enumeration order (config key -> values). The quantized tuner
    (:func:`omni_fast.bench.tune_moe_quant.search_space`) takes these and swaps in what its formats need."""
    return dict(BLOCK_SIZE_N=(32, 64, 128) if quick else (32, 64, 128, 256),
                BLOCK_SIZE_K=(64, 128) if quick else (64, 128, 256),
                GROUP_SIZE_M=(1, 8) if quick else (1, 8, 16, 32),
                num_warps=(4, 8),
                num_stages=(3, 4) if quick else (2, 3, 4, 5),
                USE_TMA=(False, True))


def pipeline_smem(cfg: dict, gated: bool, act_bytes: float, weight_bytes: float) -> float:
    """Shared memory of the software pipeline: ``num_stages`` x (A tile + one B tile, two when ``gated``)."""
    bm, bn, bk = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"]
    return cfg["num_stages"] * (bm * bk * act_bytes + (2 if gated else 1) * bk * bn * weight_bytes)


def configs_within(axes: dict, block_m: int, smem) -> list[dict]:
    """Every combination of ``axes`` (first axis outermost) with ``BLOCK_SIZE_M=block_m`` whose ``smem(cfg)``
    fits :data:`SMEM_LIMIT`."""
    out = []
    for values in itertools.product(*axes.values()):
        cfg = dict(BLOCK_SIZE_M=block_m, **dict(zip(axes, values)))
        if smem(cfg) <= SMEM_LIMIT:
            out.append(cfg)
    return out


def search_space(quick: bool, block_m: int, gated: bool, elem: int) -> list[dict]:
    """Launch configs to time for one GEMM: tile sizes, grouping, warps, stages, and the weight path (``USE_TMA``:
    TMA tensor descriptors or pointer loads; every tile here is within TMA's 256-element box limit)."""
    return configs_within(tile_axes(quick), block_m, lambda cfg: pipeline_smem(cfg, gated, elem, elem))


def block_ms(T: int, E: int, k: int) -> tuple[int, ...]:
    rows = T * k / E
    cands = [16, 32, 64, 128]
    # Tiles much taller than the mean rows per expert only multiply padding.
    return tuple(m for m in cands if m <= max(16, 4 * rows))


def _do_bench(fn) -> float:
    """Milliseconds per call of ``fn`` (CUDA events, ``triton.testing.do_bench``)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25)


def _wall_ms(fn) -> float:
    """Wall-clock milliseconds per call: the timer off CUDA (``--device cpu``: the session's dry run checks the
    tuner's plumbing with it; such a number says nothing about speed and lands in no configs folder)."""
    t0 = time.perf_counter()
    for _ in range(2):
        fn()
    return (time.perf_counter() - t0) * 1e3 / 2


def nearest_first(configs: list[dict], default: dict, limit: int | None) -> list[dict]:
    """``configs`` ordered by how many knobs differ from ``default`` (stable: ties keep the search-space order), the
    first ``limit`` of them (all when None): a reduced search around the fallback heuristic for a short GPU lease."""
    if limit is None:
        return configs

    def distance(cfg):
        return sum(cfg.get(key) != default.get(key) for key in
                   ("BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages"))

    return sorted(configs, key=distance)[:limit]


def _float_problem(T, E, N, H, k, dtype, dev):
    """(w13, w2, launcher, fallback config, adjust) of the float experts."""
    from omni_fast.kernels import moe_gemm

    w13 = torch.randn(E, 2 * N, H, device=dev, dtype=dtype) * H ** -0.5
    w2 = torch.randn(E, H, N, device=dev, dtype=dtype) * N ** -0.5
    return w13, w2, moe_gemm._launch_gemm, moe_gemm.default_config(T, E, k, H, N, dtype), None


def _quant_problem(T, E, N, H, k, dtype, dev, quant: dict):
    """The same for quantized experts (``quant``: format, block, group_size): random experts quantized once; the
    fallback is what the kernel runs without a file (the bf16 heuristic, K tiles set by the format)."""
    from omni_fast.bench import tune_moe_quant as tq
    from omni_fast.kernels import moe_gemm, moe_gemm_quant

    experts = tq.random_experts(quant["format"], E, N, H, dev, block=quant["block"], group_size=quant["group_size"],
                                scale_dtype=dtype)
    up, down = moe_gemm._split(moe_gemm.default_config(T, E, k, H, N, torch.bfloat16))
    moe_gemm_quant.adjust_config(experts, up, down)
    default = dict(up, down={key: v for key, v in down.items() if key != "BLOCK_SIZE_M"})

    def adjust(up_cfg, down_cfg):
        moe_gemm_quant.adjust_config(experts, up_cfg, down_cfg)

    return "w13", "w2", moe_gemm_quant._gemm_for(experts), default, adjust


def _candidates(configs: list[dict], default: dict, limit: int | None, prune, gated: bool) -> list[dict]:
    """:func:`nearest_first`, then ``prune`` (when given) over the nearest first so up to ``limit`` survive."""
    ordered = nearest_first(configs, default, len(configs))
    if prune is None:
        return ordered[:limit] if limit is not None else ordered
    kept, start = [], 0
    step = limit or len(ordered)
    while start < len(ordered) and (limit is None or len(kept) < limit):
        kept += prune(ordered[start:start + step], gated)
        start += step
    return kept[:limit] if limit is not None else kept


def _adjusted(cfg: dict, adjust, gated: bool) -> dict:
    """The config the kernel launches for candidate ``cfg`` (``adjust``: the quantized format's tile rules,
    which leave the quantized search space unchanged)."""
    cfg = dict(cfg, SPLIT_K=cfg.get("SPLIT_K", 1))
    if adjust is not None:
        up, down = dict(cfg), dict(cfg)
        adjust(up, down)
        cfg = up if gated else down
    return cfg


def tune_bucket(T: int, E: int, N: int, H: int, k: int, dtype: torch.dtype, quick: bool, verbose: bool, *,
                device: torch.device | str = "cuda", bench=None, space=None, max_configs: int | None = None,
                deadline: float | None = None, quant: dict | None = None, prune=None) -> dict:
    """The best config for T tokens: ``{gate/up keys..., "down": {...}}`` (the JSON file's value for bucket T).

    ``bench(fn) -> ms`` times one launch closure (default :func:`_do_bench`, which needs a GPU); ``space(block_m,
    gated, elem) -> [config]`` lists the candidates (default :func:`search_space`). Both are injectable so the
    whole tuner runs in a test on the CPU interpreter with a stub timer and a tiny search space.
    ``max_configs``: per GEMM and BLOCK_M, only the candidates nearest the fallback heuristic
    (:func:`nearest_first`). ``deadline`` (``time.monotonic()``): past it, each GEMM keeps the best of what it timed.
    ``quant`` (``{"format", "block", "group_size"}``): tune the quantized kernel instead
    (:mod:`omni_fast.bench.tune_moe_quant`); ``prune(configs, gated) -> configs`` drops candidates before timing
    (the quantized mode's sm_90a static prune), applied to the nearest ones first so ``max_configs`` survive.
    """
    from omni_fast.kernels import moe_align
    from omni_fast.reference import moe as ref

    dev = torch.device(device)
    bench = bench or (_do_bench if dev.type == "cuda" else _wall_ms)
    space = space or (lambda bm, gated, elem: search_space(quick, bm, gated, elem))
    x = torch.randn(T, H, device=dev, dtype=dtype)
    w13, w2, gemm, default, adjust = (_float_problem(T, E, N, H, k, dtype, dev) if quant is None else
                                      _quant_problem(T, E, N, H, k, dtype, dev, quant))
    weights, ids = ref.topk_softmax(torch.randn(T, E, device=dev), k)
    n = T * k
    act = torch.randn(n, N, device=dev, dtype=dtype)
    y = torch.empty(n, H, device=dev, dtype=dtype)
    elem = torch.finfo(dtype).bits // 8
    best = None
    for bm in block_ms(T, E, k):
        sorted_ids, expert_ids, npost = moe_align.moe_align_block_size(ids, bm, E)
        results = {}
        for gated in (True, False):
            fastest = (float("inf"), None)
            for cfg in _candidates(space(bm, gated, elem), default if gated else default["down"], max_configs,
                                   prune, gated):
                if deadline is not None and time.monotonic() > deadline and fastest[1] is not None:
                    break
                a, c, NN, K = (x, act, N, H) if gated else (act, y, H, N)
                b = w13 if gated else w2
                run_cfg = _adjusted(cfg, adjust, gated)

                def run(cfg=run_cfg, a=a, b=b, c=c, NN=NN, K=K, gated=gated):
                    gemm(a, b, c, weights, sorted_ids, expert_ids, npost, NN, K, n, k, gated=gated,
                         mul_weight=not gated, a_per_token=gated, cfg=cfg)

                try:
                    run()
                    ms = bench(run)
                except Exception as exc:  # out of resources etc.: skip the config
                    if verbose:
                        print(f"    skip {cfg}: {type(exc).__name__}", file=sys.stderr)
                    continue
                if ms < fastest[0]:
                    fastest = (ms, cfg)
            results[gated] = fastest
        total = results[True][0] + results[False][0]
        if verbose:
            up_us, down_us = results[True][0] * 1e3, results[False][0] * 1e3
            print(f"  T={T} BLOCK_M={bm}: gate_up {up_us:.1f} us, down {down_us:.1f} us")
        if results[True][1] is not None and results[False][1] is not None and (best is None or total < best[0]):
            down = {key: v for key, v in results[False][1].items() if key != "BLOCK_SIZE_M"}
            best = (total, dict(results[True][1], down=down))
    if best is None:
        raise RuntimeError(f"no config ran for T={T}, N={N}")
    return best[1]


def _quant_setup(args, fmt: str, space):
    """(quant, space, prune, file tag) of the quantized mode (:mod:`omni_fast.bench.tune_moe_quant`)."""
    from omni_fast.bench import tune_moe_quant as tq
    from omni_fast.kernels.moe_gemm_quant import config_key

    quant = dict(format=fmt, block=tuple(args.block), group_size=args.group_size)
    gk = tq.group_k(fmt, quant["block"], args.group_size)
    space = space or (lambda bm, gated, elem: tq.search_space(fmt, gk, args.quick, bm, gated, elem))
    prune = None if args.no_prune else tq.StaticPrune(fmt, gk, fmt == "int4_w4a16", args.dtype, args.jobs)
    return quant, space, prune, config_key(types.SimpleNamespace(format=fmt, block=quant["block"]))


def _check_args(p: argparse.ArgumentParser, args) -> None:
    """The cross-flag rules argparse's types cannot see (before the GPU check: the same errors on any machine)."""
    if args.top_k is not None and args.top_k > args.experts:
        p.error(f"--top-k ({args.top_k}) must not exceed --experts ({args.experts})")
    try:
        torch.device(args.device)
    except RuntimeError:
        p.error(f"--device: not a torch device: {args.device!r}")
    problem = output_path_problem(args.out_dir, folder=True)
    if problem:
        p.error(f"--out-dir: {problem}")


def main(argv=None, *, bench=None, space=None) -> int:
    """The CLI. ``bench`` and ``space``: see :func:`tune_bucket` (tests inject a stub timer and a tiny space)."""
    p = argparse.ArgumentParser(prog="python -m omni_fast.bench.tune_moe", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=positive_int, nargs="+", default=sorted(SHAPES, reverse=True), help="expert intermediate sizes")
    p.add_argument("--experts", type=positive_int, default=128)
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--tokens", type=positive_int, nargs="+", default=list(BUCKETS))
    p.add_argument("--quick", action="store_true", help="a smaller search space")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR, help=f"default: {OUT_DIR}")
    p.add_argument("--hidden", type=positive_int, default=None, help="hidden size (default: the model's for --n)")
    p.add_argument("--top-k", type=positive_int, default=None, help="experts per token (default: the model's for --n)")
    p.add_argument("--max-configs", type=positive_int, default=None,
                   help="per GEMM and BLOCK_M, time only the K candidates nearest the fallback heuristic")
    p.add_argument("--budget-s", type=positive_seconds, default=None,
                   help="stop after this many seconds: buckets not started are left out of the file (it is written "
                        "after every bucket), a bucket in progress keeps the best config it timed")
    p.add_argument("--device", default="cuda", help="default cuda; anything else only for tests (interpreter)")
    p.add_argument("--format", default=None, help="quantized experts: fp8_block, fp8_channel or int4_w4a16 (int4); "
                   "default: the float experts in --dtype")
    p.add_argument("--block", type=positive_int, nargs=2, default=(128, 128), metavar=("BN", "BK"), help="fp8_block's block")
    p.add_argument("--group-size", type=positive_int, default=128, help="int4_w4a16's group (asymmetric)")
    p.add_argument("--no-prune", action="store_true", help="quantized: skip the sm_90a static prune")
    p.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1, help="processes for the static prune")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    from omni_fast.bench import tune_moe_quant as tq

    fmt = tq.ALIASES.get(args.format, args.format)
    if fmt is not None and fmt not in tq.FORMATS:
        p.error(f"--format must be one of {tq.FORMATS} (or int4, fp8), got {args.format!r}")
    _check_args(p, args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("omni_fast.bench.tune_moe: needs a CUDA GPU (none found); nothing tuned. Without tuned files the kernels use "
              "the fallback heuristic omni_fast.kernels.moe_gemm.default_config.", file=sys.stderr)
        return 2
    from omni_fast.kernels.launch import CONFIG_DIR
    from omni_fast.kernels.moe_gemm import CONFIG_FAMILY, config_file_stem

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    quant, prune, tag = None, None, dtype
    if fmt is not None:
        quant, space, prune, tag = _quant_setup(args, fmt, space)
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if out_dir.resolve() != (CONFIG_DIR / CONFIG_FAMILY).resolve():
        print(f"note: the installed omni_fast reads tuned configs from {CONFIG_DIR / CONFIG_FAMILY}, not {out_dir}",
              file=sys.stderr)
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    for N in args.n:
        H, k = SHAPES.get(N, (2048, 8))
        H, k = args.hidden or H, args.top_k or k
        path = out_dir / f"{config_file_stem(args.experts, N, tag, device)}.json"
        table = json.loads(path.read_text()) if path.is_file() else {}
        for T in args.tokens:
            if deadline is not None and time.monotonic() > deadline:
                print(f"E={args.experts} N={N} T={T}: not tuned (the --budget-s of {args.budget_s:g} s is spent)")
                continue
            t0 = time.time()
            table[str(T)] = tune_bucket(T, args.experts, N, H, k, dtype, args.quick, args.verbose, device=device,
                                        bench=bench, space=space, max_configs=args.max_configs, deadline=deadline,
                                        quant=quant, prune=prune)
            if prune is not None:
                print(f"  {len(prune.dropped)} candidates pruned by the sm_90a static check" +
                      "".join(f"\n    {cfg}: {why}" for cfg, why in prune.dropped if args.verbose))
                prune.dropped.clear()
            print(f"E={args.experts} N={N} T={T}: {table[str(T)]} ({time.time() - t0:.0f} s)")
            # Written after every bucket, so an interrupted run keeps what it tuned.
            ordered = {key: table[key] for key in sorted(table, key=int)}
            path.write_text(json.dumps(ordered, indent=1) + "\n")
        print(f"wrote {path}" if path.is_file() else f"E={args.experts} N={N}: nothing tuned, no file written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
