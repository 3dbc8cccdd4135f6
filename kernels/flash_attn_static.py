"""sm_90a static compile cases of :mod:`omni_fast.kernels.flash_attn` (``python -m omni_fast.bench.static_check``):
the launches :func:`omni_fast.kernels.flash_attn.attn_fwd` / :func:`~omni_fast.kernels.flash_attn.combine` make at
the real model shapes. Imported by :mod:`omni_fast.kernels.flash_attn`, which registers them."""

from __future__ import annotations

import triton

from .flash_attn import attn_fwd_kernel, combine_kernel, gpu_block_sizes, head_tiles
from .launch import static_case


def static_signature(dt: str, split: bool = False) -> dict[str, str]:
    """The sm_90a static-case signature of :func:`attn_fwd_kernel` for operands of Triton type ``dt`` (``bf16``,
    ``fp16``, ``fp32``); split-KV partial outputs are fp32."""
    o = "fp32" if split else dt
    s = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "o_ptr": f"*{o}", "lse_ptr": "*fp32",
         "cu_q_ptr": "*i32", "cu_k_ptr": "*i32", "seqused_k_ptr": "*i32", "bt_ptr": "*i32", "km_ptr": "*u8",
         "cbi_ptr": "*i32", "lp_ptr": "*i32", "alibi_ptr": "*fp32", "sink_ptr": f"*{dt}", "cos_ptr": f"*{dt}",
         "sin_ptr": f"*{dt}"}
    for name in ("stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_kh", "stride_vb", "stride_vt",
                 "stride_vh", "stride_ot", "stride_oh", "stride_lh", "stride_os", "stride_ls", "stride_bt",
                 "stride_km", "stride_ab", "stride_cos", "stride_sin", "seqlen_q", "k_extra", "page_size",
                 "win_left", "win_right"):
        s[name] = "i32"
    s["qk_scale"] = s["softcap_log2"] = "fp32"
    s.update(split_len="i32", num_seqs="i32", search_steps="i32", total_q="i32", kv_limit="i32", num_blocks="i32",
             rot_len="i32", empty_lse="fp32", alibi_lse_shift="i32")
    for name in ("HEAD_DIM", "GROUP", "NUM_SPLITS", "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_D2", "VARLEN_Q", "VARLEN_K",
                 "PAGED", "PACKED_GRID", "KEY_MASK", "SEQUSED", "CACHE_IDX", "LEFTPAD", "SOFTCAP", "ALIBI", "SINK",
                 "ROT_DIM", "ROT_INTERLEAVED", "ROT_CAUSAL", "UPCAST", "PREC", "ALIGN", "ALIGN_BYTES"):
        s[name] = "constexpr"
    return s


def static_constexprs(dt: str, d: int, group: int, rows: int, varlen: bool, paged: bool, splits: int = 1, *,
                      packed: bool = False, key_mask: bool = False, **features) -> tuple[dict, int, int]:
    """(constexprs, num_warps, num_stages) of the launch :func:`attn_fwd` makes for these shapes on a GPU.

    ``features`` overrides the FlashAttention-feature constexprs (SOFTCAP, ALIBI, LEFTPAD, CACHE_IDX, ROT_DIM, ...)
    and the head-dim tiles (BLOCK_D / BLOCK_D2, see :func:`head_tiles`)."""
    elem = 4 if dt == "fp32" else 2
    bm, bn, warps, stages = gpu_block_sizes(rows, d, elem)
    return ({"HEAD_DIM": d, "GROUP": group, "NUM_SPLITS": splits, "BLOCK_M": bm, "BLOCK_N": bn,
             "BLOCK_D": max(16, triton.next_power_of_2(d)), "BLOCK_D2": 0, "VARLEN_Q": varlen, "VARLEN_K": varlen,
             "PAGED": paged, "PACKED_GRID": packed, "KEY_MASK": key_mask, "SEQUSED": not varlen, "CACHE_IDX": False,
             "LEFTPAD": False, "SOFTCAP": False, "ALIBI": False, "SINK": False, "ROT_DIM": 0, "ROT_INTERLEAVED": False,
             "ROT_CAUSAL": False, "UPCAST": False,
             "PREC": "ieee" if dt == "fp32" else "tf32", "ALIGN": 16 // elem, "ALIGN_BYTES": 16, **features},
            warps, stages)


def _register_static_cases() -> None:
    # (name, head_dim, group, rows, varlen, paged, splits); the patched encoders launch the packed grid, a padded
    # batch through transformers' 2-D attention mask the key mask
    shapes = [
        ("audio d64 h20 varlen packed", 64, 1, 1024, True, False, 1),
        ("vision d72 h16 varlen packed", 72, 1, 1024, True, False, 1),
        ("thinker 32/4 d128 prefill", 128, 8, 1024, True, False, 1),
        ("thinker 32/4 d128 decode", 128, 8, 8, False, False, 1),
        ("thinker 32/4 d128 decode split", 128, 8, 8, False, False, 8),
        ("thinker 32/4 d128 chunked paged", 128, 8, 4096, False, True, 1),
        ("talker 16/2 d128 decode paged", 128, 8, 8, False, True, 1),
        ("mtp 16/8 d128 decode", 128, 2, 2, False, False, 1),
        ("code2wav d64 h16 window72", 64, 1, 1024, True, False, 1),
        # Code2Wav's pre-transformer runs on the KV-cache path (one launch per layer and push); one case per block
        # config its chunk sizes pick: 1..16 frames, 17..64 (the largest graph bucket), longer (one-shot decodes)
        ("code2wav d64 h16 window72 kvcache t1", 64, 1, 1, False, False, 1),
        ("code2wav d64 h16 window72 kvcache t64", 64, 1, 64, False, False, 1),
        ("code2wav d64 h16 window72 kvcache one-shot", 64, 1, 1024, False, False, 1),
        ("thinker 32/4 d128 padded prefill key mask", 128, 8, 4096, False, False, 1),
        ("thinker 32/4 d128 padded decode key mask", 128, 8, 8, False, False, 1),
    ]
    # Head dims over 128 (no Qwen-Omni model uses them; MAX_HEAD_DIM is 256) in bf16 and fp32; fp32 also at the
    # thinker's d 128 (fp32 has its own small tiles, see gpu_block_sizes)
    extra = [(dt, "d256 h8 varlen prefill", 256, 1, 1024, True, False, 1) for dt in ("bf16", "fp32")]
    extra += [(dt, "d256 8/1 decode", 256, 8, 8, False, False, 1) for dt in ("bf16", "fp32")]
    extra += [("bf16", "d160 h8 varlen prefill", 160, 1, 1024, True, False, 1),
              ("bf16", "d160 8/1 decode", 160, 8, 8, False, False, 1)]
    extra += [("fp32", "thinker 32/4 d128 prefill", 128, 8, 1024, True, False, 1)]
    for dt, name, d, group, rows, varlen, paged, splits in extra:
        constexprs, warps, stages = static_constexprs(dt, d, group, rows, varlen, paged, splits)
        static_case(f"attn_fwd_kernel[{dt},{name}]", attn_fwd_kernel, static_signature(dt, splits > 1),
                    constexprs, num_warps=warps, num_stages=stages)
    # split head dims (opt-in fast path split_head_dim, head_tiles): the encoders' d 72 (Qwen3-Omni vision) / d 80
    # (Qwen2.5-Omni vision) as 64 + 16, d 96 as 64 + 32, d 160 as 128 + 32
    split = [(dt, f"d{d} h16 varlen packed split-d", d, 1, 1024, True, False, 1)
             for dt in ("bf16", "fp16") for d in (72, 80, 96)]
    split += [("bf16", "d160 h8 varlen prefill split-d", 160, 1, 1024, True, False, 1)]
    for dt, name, d, group, rows, varlen, paged, splits in split:
        bd, bd2 = head_tiles(d, True)
        constexprs, warps, stages = static_constexprs(dt, d, group, rows, varlen, paged, splits, packed=True,
                                                      BLOCK_D=bd, BLOCK_D2=bd2)
        static_case(f"attn_fwd_kernel[{dt},{name}]", attn_fwd_kernel, static_signature(dt, splits > 1),
                    constexprs, num_warps=warps, num_stages=stages)
    # omni_fast.compat.flash_attn features (FlashAttention-2 callers): every score modifier and rotary at once
    compat = [("kvcache decode rotary+alibi+softcap+leftpad+batch_idx", 128, 8, 8, False, False,
               dict(SOFTCAP=True, ALIBI=True, LEFTPAD=True, CACHE_IDX=True, ROT_DIM=128, ROT_CAUSAL=True)),
              ("kvcache prefill rotary interleaved+softcap", 128, 8, 1024, False, False,
               dict(SOFTCAP=True, ROT_DIM=64, ROT_INTERLEAVED=True, ROT_CAUSAL=True)),
              ("varlen paged seqused softcap+alibi", 128, 8, 1024, True, True,
               dict(SEQUSED=True, SOFTCAP=True, ALIBI=True)),
              # omni_fast.compat.vllm_flash_attn: vLLM's FA3 call with attention sinks (s_aux)
              ("varlen paged seqused sinks", 128, 8, 1024, True, True, dict(SEQUSED=True, SINK=True)),
              ("varlen paged seqused sinks decode", 128, 8, 8, True, True, dict(SEQUSED=True, SINK=True))]
    for name, d, group, rows, varlen, paged, feats in compat:
        constexprs, warps, stages = static_constexprs("bf16", d, group, rows, varlen, paged, **feats)
        static_case(f"attn_fwd_kernel[bf16,{name}]", attn_fwd_kernel, static_signature("bf16"),
                    constexprs, num_warps=warps, num_stages=stages)
    for dt in ("bf16", "fp16"):
        for name, d, group, rows, varlen, paged, splits in shapes:
            constexprs, warps, stages = static_constexprs(dt, d, group, rows, varlen, paged, splits,
                                                          packed=name.endswith("packed"),
                                                          key_mask=name.endswith("key mask"))
            static_case(f"attn_fwd_kernel[{dt},{name}]", attn_fwd_kernel, static_signature(dt, splits > 1),
                        constexprs, num_warps=warps, num_stages=stages)
        # split-KV combines as launched: thinker decode at B=1 (33 splits, 32-wide D slices) and the widest tile
        # (MAX_SPLITS = 64 partials, 64-wide D slices: COMBINE_MAX_TILE)
        for name, splits, block_d in (("d128 33 splits slice32", 33, 32), ("d128 64 splits", 64, 64)):
            static_case(
                f"combine_kernel[{dt},{name}]", combine_kernel,
                {"part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "o_ptr": f"*{dt}", "lse_ptr": "*fp32",
                 **{n: "i32" for n in ("stride_pos", "stride_pot", "stride_poh", "stride_pls", "stride_plh",
                                       "stride_ot", "stride_oh", "stride_lh")}, "empty_lse": "fp32",
                 "HEAD_DIM": "constexpr", "NUM_SPLITS": "constexpr", "SPLITS_P2": "constexpr",
                 "BLOCK_D": "constexpr"},
                {"HEAD_DIM": 128, "NUM_SPLITS": splits, "SPLITS_P2": triton.next_power_of_2(splits),
                 "BLOCK_D": block_d})


_register_static_cases()


__all__ = ["static_constexprs", "static_signature"]
