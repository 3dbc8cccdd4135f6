"""sm_90a static compile cases of :mod:`.code2wav` (the real Code2Wav shapes, bf16 and fp16), for
``python -m omni_fast.bench.static_check code2wav``; a module of their own to keep the kernel module short."""

from __future__ import annotations

import triton

from .code2wav import (_DW_BLOCK, _DW_WARPS, _GEMM_CONFIGS, _MAX_SPLIT_K, _REDUCE_BLOCKS_T, _SMALL_GEMM, _reduce_block,
                       conv_gemm_kernel, dwconv_kernel, snake_kernel, splitk_reduce_kernel)
from .launch import static_case


_GEMM_SIG_NAMES = ["x_ptr", "state_ptr", "w_ptr", "bias_ptr", "alpha_ptr", "beta_ptr", "res_ptr", "out_ptr",
                   "t_in", "ctx", "n_cols", "n_cols_bucket", "n_rows_g", "ci_g", "co_g", "n_groups", "dil",
                   "conv_stride", "w_off0",
                   "stride_xb", "stride_xc", "stride_xt", "stride_sb", "stride_sc", "stride_st",
                   "stride_wn", "stride_wc", "stride_wk",
                   "stride_rb", "stride_rc", "stride_rt", "stride_ob", "stride_oc", "stride_ot", "stride_ok"]
_GEMM_CONSTEXPRS = ["KSIZE", "PHASES", "HAS_STATE", "HAS_BIAS", "SNAKE", "RESIDUAL", "UPCAST", "IEEE", "BLOCK_N",
                    "BLOCK_T", "BLOCK_K", "SPLIT_K", "CLAMP"]
_DW_SIG_NAMES = ["x_ptr", "state_ptr", "w_ptr", "bias_ptr", "alpha_ptr", "beta_ptr", "res_ptr", "out_ptr",
                 "t_in", "ctx", "n_cols", "n_ch", "dil", "conv_stride",
                 "stride_xb", "stride_xc", "stride_xt", "stride_sb", "stride_sc", "stride_st", "stride_wc",
                 "stride_wk", "stride_rb", "stride_rc", "stride_rt", "stride_ob", "stride_oc", "stride_ot"]
_DW_CONSTEXPRS = ["KSIZE", "HAS_STATE", "HAS_BIAS", "SNAKE", "RESIDUAL", "BLOCK_C", "BLOCK_T", "CLAMP"]


def _signature(names, constexprs, dt):
    sig = {n: (f"*{dt}" if n.endswith("_ptr") else "i32") for n in names}
    sig.update({n: "constexpr" for n in constexprs})
    return sig


# The JIT specialises integer arguments at run time: a value of 1 becomes a constexpr, a multiple of 16 gets a
# divisibility hint. Code2Wav launches contiguous activations and packed weights with channel counts that are
# multiples of 16, so the cases declare the same (ones / aligned below); without them every load would be a
# scalar with its own 64-bit address and the compile would not be the one that runs. Each kernel also keeps one
# case with no integer specialisation ("any strides": unpacked weights, odd channel counts), which must not spill
# either.
_GEMM_ONES = ("stride_wc", "stride_xt", "stride_st", "stride_ot", "stride_rt", "conv_stride", "n_groups")
_GEMM_ALIGNED = ("ci_g", "n_rows_g", "co_g", "stride_wn", "stride_wk", "w_off0", "stride_xb", "stride_sb",
                 "stride_rb", "stride_ob")


def _specialise(sig: dict, constexprs: dict, ones) -> tuple[dict, dict]:
    sig, constexprs = dict(sig), dict(constexprs)
    for name in ones:
        sig[name] = "constexpr"
        constexprs[name] = 1
    return sig, constexprs


def _tile_tag(cfg: triton.Config) -> str:
    kw = cfg.kwargs
    return f"{kw['BLOCK_N']}x{kw['BLOCK_T']}x{kw['BLOCK_K']}w{cfg.num_warps}s{cfg.num_stages}"


def _register_reduce_cases(dt: str):
    """The split-K reduction (:func:`.code2wav.splitk_reduce_kernel`) for each of its time tiles, any strides, and
    the output conv's clamped reduction."""
    reduce_names = ["ws_ptr", "bias_ptr", "res_ptr", "out_ptr", "n_ch", "n_t", "stride_wsk", "stride_wsb",
                    "stride_wsc", "stride_wst", "stride_rb", "stride_rc", "stride_rt", "stride_ob", "stride_oc",
                    "stride_ot"]
    reduce_sig = _signature(reduce_names, ["SPLIT_K", "HAS_BIAS", "RESIDUAL", "BLOCK_C", "BLOCK_T", "CLAMP"], dt)
    reduce_sig["ws_ptr"] = "*fp32"
    for bt in _REDUCE_BLOCKS_T:
        bc, bt = _reduce_block(bt)
        flags = dict(SPLIT_K=_MAX_SPLIT_K, HAS_BIAS=True, RESIDUAL=True, BLOCK_C=bc, BLOCK_T=bt, CLAMP=None)
        sig, cx = _specialise(reduce_sig, flags, ("stride_wst", "stride_rt", "stride_ot"))
        static_case(f"code2wav.splitk_reduce[{dt},{bc}x{bt}]", splitk_reduce_kernel, sig, cx,
                    aligned=("n_ch", "stride_wsk", "stride_wsb", "stride_rb", "stride_ob"))
    static_case(f"code2wav.splitk_reduce[{dt},any strides]", splitk_reduce_kernel, reduce_sig,
                dict(SPLIT_K=_MAX_SPLIT_K, HAS_BIAS=True, RESIDUAL=True, BLOCK_C=8, BLOCK_T=128, CLAMP=None))
    # the output conv's reduction (a one-sample-row conv split over its 96 input channels), clamped
    bc, bt = _reduce_block(16)
    sig, cx = _specialise(reduce_sig, dict(SPLIT_K=_MAX_SPLIT_K, HAS_BIAS=True, RESIDUAL=False, BLOCK_C=bc,
                                           BLOCK_T=bt, CLAMP=1.0), ("stride_wst", "stride_rt", "stride_ot"))
    static_case(f"code2wav.splitk_reduce[{dt},{bc}x{bt},clamp]", splitk_reduce_kernel, sig, cx,
                aligned=("stride_wsk", "stride_wsb"))


def _register_static_cases():
    # (name, KSIZE, PHASES, HAS_STATE, SNAKE, RESIDUAL, extra ones, C_out % 16 == 0): decoder.0 (1024->1536 k7),
    # a residual unit's dilated k7 (SnakeBeta in; dilation 3 or 9, so not a constexpr) and k1 (SnakeBeta in,
    # residual out), the output conv (96->1, k7: one output row; the model's final clamp(-1, 1) in its epilogue,
    # CLAMP=1.0, in the split reduction's with split-K), the decoder-block transposed convs (k=2r: 2 taps,
    # r phases, SnakeBeta in) and the upsample transposed conv (k=s=2: 1 tap).
    gemm = [("conv k7 1024->1536", 7, 1, False, False, False, ("dil",), True),
            ("resunit conv k7 snake", 7, 1, True, True, False, (), True),
            ("resunit conv k1 snake+residual", 1, 1, True, True, True, ("dil",), True),
            ("out conv 96->1 k7", 7, 1, True, True, False, ("dil", "n_rows_g", "co_g"), False)]
    gemm += [(f"convT r={r}", 2, r, True, True, False, ("dil",), True) for r in (8, 5, 4, 3)]
    gemm += [("upsample convT k2 s2", 1, 2, True, False, False, ("dil",), True)]
    # pre-activated inputs (kernels/code2wav_preact.py, large batch): no SnakeBeta, no state (cat(state, x) is
    # the activated buffer)
    gemm += [("resunit conv k7 preact", 7, 1, False, False, False, (), True),
             ("resunit conv k1 preact+residual", 1, 1, False, False, True, ("dil",), True),
             ("convT r=8 preact", 2, 8, False, False, False, ("dil",), True)]
    for dt in ("bf16", "fp16"):
        for name, k, ph, st, sn, res, ones, c16 in gemm:
            aligned = [a for a in _GEMM_ALIGNED if a not in ones and (c16 or a not in ("stride_rb", "stride_ob"))]
            clamp = 1.0 if name.startswith("out conv") else None
            flags = dict(KSIZE=k, PHASES=ph, HAS_STATE=st, HAS_BIAS=True, SNAKE=2 if sn else 0, RESIDUAL=res,
                         UPCAST=False, IEEE=False, SPLIT_K=1, CLAMP=clamp)
            base = _signature(_GEMM_SIG_NAMES, _GEMM_CONSTEXPRS, dt)
            # every config the autotuner may pick (bf16; fp16 and the other transposed-conv rates compile to the
            # same code but for the dtype / the PHASES constant, so they get the first config only)
            every = dt == "bf16" and name not in ("convT r=5", "convT r=4", "convT r=3") and "preact" not in name
            for cfg in (_GEMM_CONFIGS if every else _GEMM_CONFIGS[:1]):
                sig, cx = _specialise(base, dict(flags, **cfg.kwargs), _GEMM_ONES + ones)
                static_case(f"code2wav.conv_gemm[{name},{dt},state={st},{_tile_tag(cfg)}]", conv_gemm_kernel, sig,
                            cx, num_warps=cfg.num_warps, num_stages=cfg.num_stages, aligned=aligned)
            # the streaming path: the fixed small tile, split-K partials into an fp32 workspace (whose residual
            # strides are 0); the worst split is _MAX_SPLIT_K
            small = _SMALL_GEMM
            sig = dict(base, res_ptr="*fp32", out_ptr="*fp32")
            sig, cx = _specialise(sig, dict(flags, HAS_STATE=True, HAS_BIAS=False, RESIDUAL=False,
                                            SPLIT_K=_MAX_SPLIT_K, CLAMP=None, **small.kwargs),
                                  [o for o in _GEMM_ONES + ones if o != "stride_rt"])
            static_case(f"code2wav.conv_gemm[{name},{dt},split_k={_MAX_SPLIT_K},{_tile_tag(small)}]",
                        conv_gemm_kernel, sig, cx, num_warps=small.num_warps, num_stages=small.num_stages,
                        aligned=aligned + ["stride_rc", "stride_rt", "stride_ok"])
            if dt == "bf16":  # no integer specialisation at all
                cfg = _GEMM_CONFIGS[0]
                static_case(f"code2wav.conv_gemm[{name},{dt},any strides,{_tile_tag(cfg)}]", conv_gemm_kernel,
                            base, dict(flags, **cfg.kwargs), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        _register_reduce_cases(dt)
        dw_sig = _signature(_DW_SIG_NAMES, _DW_CONSTEXPRS, dt)
        bc, bt = _DW_BLOCK
        for st in (False, True):
            flags = dict(KSIZE=7, HAS_STATE=st, HAS_BIAS=True, SNAKE=False, RESIDUAL=False, BLOCK_C=bc, BLOCK_T=bt,
                         CLAMP=None)
            sig, cx = _specialise(dw_sig, flags, ("stride_xt", "stride_st", "stride_wc", "stride_rt", "stride_ot",
                                                  "dil", "conv_stride"))
            static_case(f"code2wav.dwconv[convnext 1024 k7,{dt},state={st}]", dwconv_kernel, sig, cx,
                        num_warps=_DW_WARPS,
                        aligned=("n_ch", "stride_xb", "stride_sb", "stride_wk", "stride_rb", "stride_ob"))
            static_case(f"code2wav.dwconv[convnext 1024 k7,{dt},state={st},any strides]", dwconv_kernel, dw_sig,
                        flags, num_warps=_DW_WARPS)
            # what Code2WavStream launches: the output channels-last (channels_last_out=True, read by the ConvNeXt
            # LayerNorm without a copy): unit channel strides out (and res, which is out without a residual)
            sig, cx = _specialise(dw_sig, flags, ("stride_xt", "stride_st", "stride_wc", "stride_rc", "stride_oc",
                                                  "dil", "conv_stride"))
            static_case(f"code2wav.dwconv[convnext 1024 k7,{dt},state={st},channels-last out]", dwconv_kernel, sig,
                        cx, num_warps=_DW_WARPS, aligned=("n_ch", "stride_xb", "stride_sb", "stride_wk", "stride_rb",
                                                          "stride_rt", "stride_ob", "stride_ot"))
        snake_sig = _signature(["x_ptr", "state_ptr", "alpha_ptr", "beta_ptr", "out_ptr", "n_ch", "t_in", "ctx",
                                "stride_xb", "stride_xc", "stride_xt", "stride_sb", "stride_sc", "stride_st",
                                "stride_ob", "stride_oc", "stride_ot"], ["BLOCK_C", "BLOCK_T", "MODE", "HAS_STATE"], dt)
        for st in (False, True):  # the standalone op; the pre-activated input of a streaming conv (code2wav_preact)
            sig, cx = _specialise(snake_sig, dict(BLOCK_C=8, BLOCK_T=256, MODE=2, HAS_STATE=st),
                                  ("stride_xt", "stride_st", "stride_ot"))
            static_case(f"code2wav.snake[{dt},state={st}]", snake_kernel, sig, cx,
                        aligned=("n_ch", "stride_xb", "stride_sb", "stride_ob"))


_register_static_cases()
