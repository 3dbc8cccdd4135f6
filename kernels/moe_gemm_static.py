"""sm_90a static compile cases of :mod:`.moe_gemm` (the real model shapes: every tier of its default configs, the
pointer and the TMA weight path, and the combine), for ``python -m omni_fast.bench.static_check moe_gemm``; a
module of their own to keep the kernel module short (as :mod:`.code2wav_static`)."""

from __future__ import annotations

import itertools

import torch

from .launch import static_case
from .moe_gemm import _KEYS, _split, default_config, moe_combine_kernel, moe_gemm_kernel


def _gemm_signature(dt: str, w_dt: str, b_block: tuple[int, int] | None = None, split: bool = False) -> dict:
    """Argument types; ``b_block`` = (BLOCK_N, BLOCK_K) makes ``b_src`` a tensor descriptor (the TMA path)."""
    b_type = f"tensordesc<{dt}[{b_block[0]}, {b_block[1]}]>" if b_block else f"*{dt}"
    sig = {"a_ptr": f"*{dt}", "b_src": b_type, "c_ptr": f"*{dt}", "topk_weights_ptr": f"*{w_dt}",
           "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32", "npost_ptr": "*i32",
           "N": "i32", "K": "i32", "num_valid": "i32", "num_pid_m": "i32", "top_k": "i32",
           "num_experts": "i32", "stride_am": "i32", "stride_be": "i32", "stride_bn": "i32", "stride_cm": "i32"}
    for name in ("GATED", "MUL_ROUTED_WEIGHT", "A_PER_TOKEN", "UPCAST", "DOT_PRECISION", "USE_TMA", "BLOCK_SIZE_M",
                 "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M"):
        sig[name] = "constexpr"
    # split-K: the fp32 workspace and the tile counters; without it the launcher passes C and sorted_ids (unused)
    sig.update(ws_ptr="*fp32" if split else f"*{dt}", cnt_ptr="*i32", k_split="i32", SPLIT_K="constexpr")
    if b_block:
        sig["stride_bn"] = "constexpr"  # 1 on the TMA path, which the JIT specialises as a constant
    return sig


# The kernel's shapes (E, H, I) are runtime arguments, so one compile per (dtype, config, path) covers the thinker
# (E128, H2048, N768) and the talker (E128, H1024, N384 / N192): one case per tier of default_config, at the
# thinker's T that selects it (rows per expert 0.06, 25, 64, 256), for the pointer and the TMA weight path. In
# these shapes N, K and the row strides are multiples of 16, which the JIT's divisibility specialisation sees at
# run time: the cases declare it (``aligned``) so the compile is the one a real launch gets.
# The decode tier's grid-fill tiles (fill_grid) at T=1 of the thinker, the talker and the talker's shared expert
# (one expert, I 768) are extra cases, one per (GEMM, BLOCK_N): "decode-fill n<BLOCK_N>".
_TIERS = ((1, "decode"), (400, "rows<=32"), (1024, "rows<=128"), (4096, "prefill"))


def _static_tiles():
    """(tier label, gemm part, split config, gated) of every static case."""
    out = []
    for T, tier in _TIERS:
        up, down = _split(default_config(T, 128, 8, 2048, 768, torch.bfloat16))
        out += [(tier, "gate_up", up, True), (tier, "down", down, False)]
    base = _split(default_config(1, 128, 8, 2048, 768, torch.bfloat16))
    seen = set()
    for shape in ((128, 8, 2048, 768), (128, 6, 1024, 384), (1, 1, 1024, 768)):
        filled = _split(default_config(1, *shape, torch.bfloat16, True))
        for part, c, b, gated in zip(("gate_up", "down"), filled, base, (True, False)):
            if c != b and (part, c["BLOCK_SIZE_N"]) not in seen:
                seen.add((part, c["BLOCK_SIZE_N"]))
                out.append((f"decode-fill n{c['BLOCK_SIZE_N']}", part, c, gated))
    # the opt-in split-K (the moe_splitk fast path) of the shared expert's 16-column tiles: 3 splits each
    for part, c, gated in zip(("gate_up", "down"), _split(default_config(1, 1, 1, 1024, 768, torch.bfloat16, True)),
                              (True, False)):
        out.append((f"decode-fill n{c['BLOCK_SIZE_N']} split3", part, dict(c, SPLIT_K=3), gated))
    return out


for _dt in ("bf16", "fp16"):
    for _tier, _part, _c, _gated in _static_tiles():
        for _tma in (False, True):
            _block = (_c["BLOCK_SIZE_N"], _c["BLOCK_SIZE_K"]) if _tma else None
            _consts = dict(UPCAST=False, DOT_PRECISION="tf32", GATED=_gated, MUL_ROUTED_WEIGHT=not _gated,
                           A_PER_TOKEN=_gated, USE_TMA=_tma, SPLIT_K=_c["SPLIT_K"], **{k: _c[k] for k in _KEYS[:4]})
            if _tma:
                _consts["stride_bn"] = 1
            static_case(
                f"moe_gemm_kernel[{_dt},E128 N768/384/192,{_tier},{_part},{'tma' if _tma else 'ptr'}]",
                moe_gemm_kernel, _gemm_signature(_dt, _dt if _gated else "fp32", _block, _c["SPLIT_K"] > 1), _consts,
                num_warps=_c["num_warps"], num_stages=_c["num_stages"],
                aligned=("N", "K", "stride_am", "stride_be", "stride_cm") + (() if _tma else ("stride_bn",)))
    for _H, _add, _ids in itertools.product((2048, 1024), (False, True), ("i32", "i64")):  # i64: transformers' ids
        static_case(f"moe_combine_kernel[{_dt},H{_H},add={_add},{_ids}]", moe_combine_kernel,
                    {"y_ptr": f"*{_dt}", "ids_ptr": f"*{_ids}", "add_ptr": f"*{_dt}", "out_ptr": f"*{_dt}",
                     "H": "i32", "top_k": "i32", "num_experts": "i32", "stride_add": "i32", "stride_out": "i32",
                     "HAS_ADD": "constexpr", "BLOCK_H": "constexpr"},
                    {"HAS_ADD": _add, "BLOCK_H": 1024})
