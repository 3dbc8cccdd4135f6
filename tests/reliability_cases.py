"""The bad-argument sweep of issue 17: every public entry point, one argument replaced by a generated bad value.

Shared by ``tests/test_reliability_sweep.py`` (hypothesis draws from :func:`cases`) and by the before/after count
(``python tests/reliability_cases.py``, which runs every case once and prints the counts per outcome). A case's
outcome (:func:`run_case`) is one of:

- ``named``: TypeError/ValueError whose message names the replaced argument (what the issue asks);
- ``related``: TypeError/ValueError naming another argument the replaced one must agree with (a consistency
  error: e.g. an empty ``q`` makes "k must have shape [0, *, 8]"; which of the two is wrong is the caller's call);
- ``ok``: the call ran, and the reference and Triton backends agree (where the op has both);
- ``unnamed``: TypeError/ValueError that does not name the argument;
- ``other``: another exception type (IndexError, RuntimeError, AttributeError, ...);
- ``disagree``: the call ran but the backends differ;
- ``oob``: the call wrote outside a tensor it or the case allocated (guard bytes around every tensor allocated while
  the case runs: :func:`omni_fast.testing.guarded_allocations`), so the sweep is also an out-of-bounds-write fuzzer.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

GOOD_OUTCOMES = ("named", "related", "ok")


def _t(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(*shape, generator=g).to(dtype)
    return torch.randint(0, 3, shape, generator=g).to(dtype)


def _update_conv_states(backend, states, inputs):
    """``ops.update_conv_states`` on copies of the states, returned (an in-place op: both backends start equal)."""
    from omni_fast import ops

    if isinstance(states, list):
        states = [s.clone() if isinstance(s, torch.Tensor) else s for s in states]
    ops.update_conv_states(states, inputs, backend=backend)
    return states


def _under_backend(fn: Callable) -> Callable:
    """A peer-signature function (no ``backend`` argument) called with ``backend=`` under :func:`use_backend`."""
    def call(backend, **kw):
        from omni_fast import use_backend

        with use_backend(backend):
            return fn(**kw)
    return call


def _vllm_topk_softmax(backend, **kw):
    """vLLM's out-parameter ``topk_softmax``; returns the three filled tensors to compare the backends."""
    from omni_fast import ops

    _under_backend(ops.topk_softmax)(backend, **kw)
    return kw["topk_weights"], kw["topk_ids"], kw["token_expert_indices"]


def _fp8_channel_moe(backend, hidden_states, w13_scale, w2_scale, topk_weights, topk_ids):
    """ops.moe_experts on fp8_channel experts built from the swept scales (fixed e4m3 weights)."""
    from omni_fast import ops

    w13, w2 = _t(4, 32, 16, seed=1).to(torch.float8_e4m3fn), _t(4, 16, 16, seed=2).to(torch.float8_e4m3fn)
    experts = ops.QuantizedExperts.fp8_channel(w13, w2, w13_scale, w2_scale)
    return ops.moe_experts(hidden_states, experts, None, topk_weights, topk_ids, backend=backend)


def _vllm_quant(kind: str):
    """compat.vllm.fused_experts with a quant_config (use_fp8_w8a8 or use_int4_w4a16) of the given tensors."""
    from types import SimpleNamespace

    def call(backend, hidden_states, w1, w2, topk_weights, topk_ids, **q):
        from omni_fast.compat import vllm

        cfg = SimpleNamespace(use_fp8_w8a8=kind == "fp8", use_int4_w4a16=kind == "int4", per_act_token_quant=False,
                              **{n: q.get(n) for n in ("w1_scale", "w2_scale", "w1_zp", "w2_zp", "a1_scale",
                                                        "a2_scale", "block_shape")})
        return _under_backend(vllm.fused_experts)(backend, hidden_states=hidden_states, w1=w1, w2=w2,
                                                   topk_weights=topk_weights, topk_ids=topk_ids, quant_config=cfg)
    return call


def _vllm_builder(name: str):
    """compat.vllm.fused_experts with ``quant_config=<name>(**builder args)`` (vLLM v0.11's quant_config builders):
    a bad builder argument is named by the builder or, for layouts, by fused_experts."""
    def call(backend, hidden_states, w1, w2, topk_weights, topk_ids, **q):
        from omni_fast.compat import vllm

        cfg = getattr(vllm, name)(**q)
        return _under_backend(vllm.fused_experts)(backend, hidden_states=hidden_states, w1=w1, w2=w2,
                                                   topk_weights=topk_weights, topk_ids=topk_ids, quant_config=cfg)
    return call


def _builder_entries() -> dict[str, tuple[Callable, Callable[[], dict], bool]]:
    """The fp8 / int4 quant_config builders of compat.vllm (run through fused_experts, compared across backends)."""
    i32 = torch.int32
    routing = lambda: dict(topk_weights=torch.rand(3, 2), topk_ids=torch.tensor([[0, 3], [1, 2], [3, 1]], dtype=i32))
    return {
        "compat.vllm.fp8_w8a8_moe_quant_config": (_vllm_builder("fp8_w8a8_moe_quant_config"), lambda: dict(
            hidden_states=_t(3, 16), w1=_t(4, 32, 16, seed=1).to(torch.float8_e4m3fn),
            w2=_t(4, 16, 16, seed=2).to(torch.float8_e4m3fn), **routing(), w1_scale=torch.rand(4, 32) / 100 + 1e-3,
            w2_scale=torch.rand(4, 16) / 100 + 1e-3, a1_scale=torch.tensor([0.01]), a2_scale=None,
            per_act_token_quant=True, per_out_ch_quant=True, block_shape=None), True),
        "compat.vllm.int4_w4a16_moe_quant_config": (_vllm_builder("int4_w4a16_moe_quant_config"), lambda: dict(
            hidden_states=_t(3, 32), w1=torch.randint(0, 256, (4, 32, 16), dtype=torch.uint8),
            w2=torch.randint(0, 256, (4, 32, 8), dtype=torch.uint8), **routing(), w1_scale=torch.rand(4, 32, 2) / 100,
            w2_scale=torch.rand(4, 32, 1) / 100, w1_zp=torch.randint(0, 256, (4, 16, 2), dtype=torch.uint8),
            w2_zp=torch.randint(0, 256, (4, 16, 1), dtype=torch.uint8), block_shape=[0, 16]), True),
    }


def _vllm_flash_attn_entries() -> dict[str, tuple[Callable, Callable[[], dict], bool]]:
    """vLLM's FlashAttention fork (omni_fast.compat.vllm_flash_attn), called the way vLLM's backend calls it.

    Not swept: the arguments whose every non-None value is a NotImplementedError by design (``q_v``, ``cp_*``;
    ``s_aux`` under FA2) and the sparse stubs (NotImplementedError whatever the arguments)."""
    from omni_fast.compat import vllm_flash_attn as vfa

    i32 = torch.int32
    return {
        # paged k/v through block_table + seqused_k, out= the output buffer (FA3: num_splits is a hint)
        "compat.vllm_flash_attn.flash_attn_varlen_func": (_under_backend(vfa.flash_attn_varlen_func), lambda: dict(
            q=_t(4, 2, 8), k=_t(3, 4, 1, 8, seed=1), v=_t(3, 4, 1, 8, seed=2), out=torch.empty(4, 2, 8),
            cu_seqlens_q=torch.tensor([0, 1, 4], dtype=i32), max_seqlen_q=3,
            seqused_k=torch.tensor([2, 5], dtype=i32), max_seqlen_k=5, softmax_scale=None, causal=True,
            window_size=None, block_table=torch.tensor([[2, 0], [1, 0]], dtype=i32), softcap=0.0,
            scheduler_metadata=None, q_descale=torch.ones(2, 1), num_splits=0, fa_version=3,
            return_softmax_lse=True, s_aux=_t(2, seed=3), output_scale=None, dynamic_causal=None), True),
        # packed k/v with cu_seqlens_k (vLLM's encoder attention), FA2
        "compat.vllm_flash_attn.flash_attn_varlen_func[packed]": (
            _under_backend(vfa.flash_attn_varlen_func), lambda: dict(
                q=_t(4, 2, 8), k=_t(5, 1, 8, seed=1), v=_t(5, 1, 8, seed=2), max_seqlen_q=3,
                cu_seqlens_q=torch.tensor([0, 1, 4], dtype=i32), max_seqlen_k=3,
                cu_seqlens_k=torch.tensor([0, 2, 5], dtype=i32), dropout_p=0.0, causal=False, window_size=(1, 1),
                alibi_slopes=torch.rand(2), fa_version=2), True),
        "compat.vllm_flash_attn.flash_attn_with_kvcache": (_under_backend(vfa.flash_attn_with_kvcache), lambda: dict(
            q=_t(2, 1, 2, 8), k_cache=_t(2, 5, 1, 8, seed=1), v_cache=_t(2, 5, 1, 8, seed=2),
            k=_t(2, 1, 1, 8, seed=3), v=_t(2, 1, 1, 8, seed=4), cache_seqlens=torch.tensor([1, 3], dtype=i32),
            causal=True, num_splits=0, return_softmax_lse=True, out=torch.empty(2, 1, 2, 8), fa_version=2), True),
        "compat.vllm_flash_attn.get_scheduler_metadata": (lambda backend, **kw: vfa.get_scheduler_metadata(**kw),
                                                          lambda: dict(
            batch_size=2, max_seqlen_q=3, max_seqlen_k=9, num_heads_q=4, num_heads_kv=2, headdim=16,
            cache_seqlens=torch.tensor([5, 9], dtype=i32), page_size=16, causal=True, window_size=(-1, -1),
            num_splits=0), False),
        "compat.vllm_flash_attn.is_fa_version_supported": (
            lambda backend, **kw: vfa.is_fa_version_supported(**kw), lambda: dict(fa_version=3, device=None), False),
        "compat.vllm_flash_attn.fa_version_unsupported_reason": (
            lambda backend, **kw: vfa.fa_version_unsupported_reason(**kw), lambda: dict(fa_version=2), False),
    }


def _quant_entries() -> dict[str, tuple[Callable, Callable[[], dict], bool]]:
    """The quantized-experts entries of :func:`_entries`."""
    from omni_fast import ops

    i32 = torch.int32
    return {
        # the quantized-experts container's constructor (validation only: no backend involved)
        "QuantizedExperts": (lambda backend, **kw: ops.QuantizedExperts(**kw), lambda: dict(
            format="int4_w4a16", w13=torch.randint(0, 2**31 - 1, (2, 32, 2), dtype=i32),
            w2=torch.randint(0, 2**31 - 1, (2, 16, 2), dtype=i32), w13_scale=torch.rand(2, 32, 1),
            w2_scale=torch.rand(2, 16, 1), w13_zero=None, w2_zero=None, block=None, group_size=16, symmetric=True),
            False),
        "QuantizedExperts.fp8_block": (lambda backend, **kw: ops.QuantizedExperts.fp8_block(**kw), lambda: dict(
            w13=_t(2, 32, 16).to(torch.float8_e4m3fn), w2=_t(2, 16, 16, seed=1).to(torch.float8_e4m3fn),
            w13_scale=torch.rand(2, 2, 1), w2_scale=torch.rand(2, 1, 1), block=(16, 16)), False),
        "QuantizedExperts.fp8_channel": (lambda backend, **kw: ops.QuantizedExperts.fp8_channel(**kw), lambda: dict(
            w13=_t(2, 32, 16).to(torch.float8_e4m3fn), w2=_t(2, 16, 16, seed=1).to(torch.float8_e4m3fn),
            w13_scale=torch.rand(2, 32, 1), w2_scale=torch.rand(2, 16, 1), w13_input_scale=torch.rand(2) / 100,
            w2_input_scale=torch.rand(2) / 100), False),
        # the quantized experts through moe_experts (fp8_channel, dynamic activations), compared across backends
        "moe_experts[fp8_channel]": (_fp8_channel_moe, lambda: dict(
            hidden_states=_t(3, 16), w13_scale=torch.rand(4, 32, 1) / 100 + 1e-3,
            w2_scale=torch.rand(4, 16, 1) / 100 + 1e-3, topk_weights=torch.rand(3, 2),
            topk_ids=torch.tensor([[0, 3], [1, 2], [3, 1]], dtype=i32)), True),
        # vLLM's quantized fused_experts, the quant_config's tensors as arguments
        "compat.vllm.fused_experts[fp8]": (_vllm_quant("fp8"), lambda: dict(
            hidden_states=_t(3, 16), w1=_t(4, 32, 16, seed=1).to(torch.float8_e4m3fn),
            w2=_t(4, 16, 16, seed=2).to(torch.float8_e4m3fn), topk_weights=torch.rand(3, 2),
            topk_ids=torch.tensor([[0, 3], [1, 2], [3, 1]], dtype=i32), w1_scale=torch.rand(4, 32) / 100 + 1e-3,
            w2_scale=torch.rand(4) / 100 + 1e-3, a1_scale=torch.tensor([0.01]), a2_scale=None,
            block_shape=None), True),
        "compat.vllm.fused_experts[int4]": (_vllm_quant("int4"), lambda: dict(
            hidden_states=_t(3, 32), w1=torch.randint(0, 256, (4, 32, 16), dtype=torch.uint8),
            w2=torch.randint(0, 256, (4, 32, 8), dtype=torch.uint8), topk_weights=torch.rand(3, 2),
            topk_ids=torch.tensor([[0, 3], [1, 2], [3, 1]], dtype=i32), w1_scale=torch.rand(4, 32, 2) / 100,
            w2_scale=torch.rand(4, 32, 1) / 100, w1_zp=torch.randint(0, 256, (4, 16, 2), dtype=torch.uint8),
            w2_zp=torch.randint(0, 256, (4, 16, 1), dtype=torch.uint8), block_shape=[0, 16]), True),
    }


def _entries() -> dict[str, tuple[Callable, Callable[[], dict], bool]]:
    """name -> (function(**kwargs), fresh good kwargs, whether to compare backends)."""
    from omni_fast import ops

    i32 = torch.int32
    entries = {
        "mrope": (ops.mrope, lambda: dict(q=_t(3, 2, 8), k=_t(3, 1, 8, seed=1), positions=torch.arange(3),
                                          mrope_section=(4, 0, 0), interleaved=True, theta=1e4,
                                          attention_scaling=1.0, inplace=False), True),
        "qk_norm_mrope": (ops.qk_norm_mrope, lambda: dict(
            q=_t(3, 2, 8), k=_t(3, 1, 8, seed=1), q_weight=torch.ones(8), k_weight=torch.ones(8),
            positions=torch.arange(3), eps=1e-6, mrope_section=(4, 0, 0), inplace=False), True),
        "flash_attn_varlen": (ops.flash_attn_varlen, lambda: dict(
            q=_t(4, 2, 8), k=_t(4, 1, 8, seed=1), v=_t(4, 1, 8, seed=2),
            cu_seqlens_q=torch.tensor([0, 1, 4], dtype=i32), cu_seqlens_k=torch.tensor([0, 1, 4], dtype=i32),
            max_seqlen_q=3, max_seqlen_k=3, softmax_scale=None, causal=True, window_size=(-1, -1)), True),
        "flash_attn_with_kvcache": (ops.flash_attn_with_kvcache, lambda: dict(
            q=_t(2, 1, 2, 8), k_cache=_t(2, 5, 1, 8, seed=1), v_cache=_t(2, 5, 1, 8, seed=2),
            cache_seqlens=torch.tensor([1, 3], dtype=i32), k=_t(2, 1, 1, 8, seed=3), v=_t(2, 1, 1, 8, seed=4),
            causal=True, window_size=(-1, -1), softmax_scale=None, num_splits=0), True),
        "route_topk": (ops.route_topk, lambda: dict(router_logits=_t(3, 6), top_k=2, renormalize=True), True),
        "align_moe_blocks": (ops.align_moe_blocks, lambda: dict(
            topk_ids=torch.tensor([[0, 1], [2, 1]], dtype=i32), block_size=4, num_experts=4, expert_map=None),
            False),  # the order inside an expert's run is unspecified
        "moe_experts": (ops.moe_experts, lambda: dict(
            hidden_states=_t(2, 8), w13=_t(4, 8, 8, seed=1) * 0.1, w2=_t(4, 8, 4, seed=2) * 0.1,
            topk_weights=torch.rand(2, 2), topk_ids=torch.tensor([[0, 1], [2, 3]], dtype=i32), activation="silu",
            expert_map=None, out=None), True),
        # vLLM's forms (the same objects as omni_fast.compat.vllm's): no backend argument, run under use_backend
        "topk_softmax": (_vllm_topk_softmax, lambda: dict(
            topk_weights=torch.empty(3, 2), topk_ids=torch.empty(3, 2, dtype=i32),
            token_expert_indices=torch.empty(3, 2, dtype=i32), gating_output=_t(3, 6), renormalize=False,
            e_score_correction_bias=None, is_padding=None), True),
        "moe_align_block_size": (_under_backend(ops.moe_align_block_size), lambda: dict(
            topk_ids=torch.tensor([[0, 1], [2, 1]], dtype=i32), block_size=4, num_experts=4, expert_map=None,
            pad_sorted_ids=False, ignore_invalid_experts=False, return_scatter_idx=False),
            False),  # the order inside a run is unspecified
        "moe_block": (ops.moe_block, lambda: dict(
            hidden_states=_t(2, 8), gate_weight=_t(4, 8, seed=3), w13=_t(4, 8, 8, seed=1) * 0.1,
            w2=_t(4, 8, 4, seed=2) * 0.1, top_k=2, renormalize=True, out=None), True),
        "rvq_embed": (ops.rvq_embed, lambda: dict(
            codes=torch.tensor([[0, 1, 2], [3, 0, 1]]), tables=_t(12, 4), reduce="sum", offsets=[0, 4, 8]), True),
        "sample": (ops.sample, lambda: dict(
            logits=_t(2, 10), temperature=0.7, top_k=5, top_p=0.9, suppress_ranges=[(0, 2)],
            repetition_penalty=1.1, prev_ids=torch.tensor([[1, 3], [4, -1]]), seed=3, offset=0, greedy=False), True),
        "snake_beta": (ops.snake_beta, lambda: dict(x=_t(1, 4, 6), alpha=_t(4, seed=1), beta=_t(4, seed=2)), True),
        "causal_conv1d": (ops.causal_conv1d, lambda: dict(x=_t(1, 4, 6), weight=_t(4, 4, 3, seed=1), bias=None,
                                                          stride=1, dilation=1, groups=1), True),
        "causal_conv_transpose1d": (ops.causal_conv_transpose1d, lambda: dict(
            x=_t(1, 4, 5), weight=_t(4, 3, 4, seed=1), bias=_t(3, seed=2), stride=2,
            snake=(_t(4, seed=3) * 0.1, _t(4, seed=4) * 0.1), state=_t(1, 4, 1, seed=5)), True),
        "update_conv_states": (_update_conv_states, lambda: dict(
            states=[_t(2, 3, 4), _t(2, 5, 1, seed=1)], inputs=[_t(2, 3, 2, seed=2), _t(2, 5, 6, seed=3)]), True),
        # Qwen2.5-Omni Token2Wav ops (BigVGAN activation and convs, the DiT's block attention)
        "anti_aliased_snake": (ops.anti_aliased_snake, lambda: dict(
            x=_t(1, 3, 9), alpha=_t(3, seed=1) * 0.1, beta=_t(3, seed=2) * 0.1, up_filter=torch.rand(12),
            down_filter=torch.rand(12), ratio=2, seq_lens=None), True),
        "padded_conv1d": (ops.padded_conv1d, lambda: dict(
            x=_t(1, 4, 7), weight=_t(5, 4, 3, seed=1), bias=_t(5, seed=2), padding=1, stride=1, dilation=1,
            groups=1, residual=None), True),
        "block_attention": (ops.block_attention, lambda: dict(
            q=_t(1, 6, 2, 8), k=_t(1, 6, 1, 8, seed=1), v=_t(1, 6, 1, 8, seed=2), block_size=2, look_backward=1,
            look_ahead=0, softmax_scale=None, plan=None), True),
        "block_attention_plan": (lambda backend, **kw: ops.block_attention_plan(**kw), lambda: dict(
            batch=2, seq_len=6, block_size=2, look_backward=1, look_ahead=0,
            seq_lens=torch.tensor([6, 3], dtype=i32)), False),
        "ada_layer_norm": (ops.ada_layer_norm, lambda: dict(
            x=_t(2, 5, 7), shift=_t(2, 7, seed=1), scale=_t(2, 7, seed=2), eps=1e-6), True),
        "gated_ada_layer_norm": (ops.gated_ada_layer_norm, lambda: dict(
            x=_t(2, 5, 7), delta=_t(2, 5, 7, seed=3), gate=_t(2, 7, seed=4), shift=_t(2, 7, seed=1),
            scale=_t(2, 7, seed=2), eps=1e-6), True),
        "dit_qkv_rope": (ops.dit_qkv_rope, lambda: dict(
            qkv=_t(2, 5, 24), cos=_t(1, 5, 4, seed=1), sin=_t(1, 5, 4, seed=2), heads=2), True),
        **_quant_entries(),
        **_builder_entries(),
        **_vllm_flash_attn_entries(),
    }
    return entries


def _model_entries() -> dict[str, tuple[Callable, Callable[[], dict], bool]]:
    from omni_fast.models import CodePredictor, TalkerStep

    torch.manual_seed(0)
    cp = CodePredictor(dict(vocab_size=12, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_code_groups=3),
                       codec_vocab_size=10)
    with torch.no_grad():
        for p in cp.parameters():
            p.normal_(0, 0.3)

    def frame(**kw):
        return cp.predict_frame(kw.pop("talker_hidden"), kw.pop("c0"), use_graph=False, **kw)

    def step(**kw):
        s = TalkerStep(cp, kw.pop("trailing_text_hidden"), kw.pop("tts_pad_embed"))
        return s(kw.pop("talker_hidden"), kw.pop("c0"), kw.pop("generation_step"), **kw)

    return {
        "predict_frame": (frame, lambda: dict(talker_hidden=_t(2, 16), c0=torch.tensor([1, 2]), do_sample=True,
                                              top_k=4, top_p=0.8, temperature=1.0, seed=5), True),
        "TalkerStep": (step, lambda: dict(trailing_text_hidden=_t(2, 3, 16), tts_pad_embed=_t(1, 1, 16, seed=1),
                                          talker_hidden=_t(2, 16, seed=2), c0=torch.tensor([1, 2]),
                                          generation_step=1, do_sample=False, seed=5), True),
    }


def bad_values(good):
    """Generated bad (or unusual) replacements for an argument whose good value is ``good``."""
    vals = [None, "x", 1.5, math.nan, math.inf, True, -1, 0, 2**40, 2**64, -(2**63) - 1, np.int64(2),
            np.float32(1.0), torch.tensor(2), torch.tensor(1.5), [1, 2], object()]
    if isinstance(good, torch.Tensor):
        vals += [good.to(torch.float64), good.to(torch.int64) if good.is_floating_point() else good.float(),
                 good.to(torch.bool), good.reshape(-1), good[None], good[:0]]
        if good.dim() >= 1 and good.shape[0] > 0:
            vals.append(good[:1].expand(*good.shape))  # internally overlapping
    return vals


def cases() -> list[tuple[str, str, int]]:
    """(entry name, argument name, index into bad_values(good)) for every case."""
    out = []
    for name, (_, make, _) in {**_entries(), **_model_entries()}.items():
        for arg, good in make().items():
            out += [(name, arg, i) for i in range(len(bad_values(good)))]
    return out


def _clone(kw: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) and v.is_contiguous() else v) for k, v in kw.items()}


def run_case(name: str, arg: str, index: int) -> tuple[str, str]:
    """(outcome, detail) of one case (see the module docstring)."""
    from omni_fast.testing import guarded_allocations

    with guarded_allocations() as guards:
        outcome = _run_case(name, arg, index)
    bad = guards.violations()
    return ("oob", "; ".join(bad)[:300]) if bad else outcome


def _run_case(name: str, arg: str, index: int) -> tuple[str, str]:
    entries = {**_entries(), **_model_entries()}
    fn, make, compare = entries[name]
    kw = make()
    kw[arg] = bad_values(kw[arg])[index]
    results = {}
    for backend in (("reference", "triton") if compare else ("reference",)):
        try:
            with torch.no_grad():
                results[backend] = fn(**_clone(kw), backend=backend)
        except (TypeError, ValueError) as e:
            msg = str(e)
            outcome = "named" if arg in msg else "related" if any(a in msg for a in kw) else "unnamed"
            return outcome, f"{type(e).__name__}: {msg[:160]}"
        except Exception as e:  # noqa: BLE001 - the sweep classifies every failure
            return "other", f"{type(e).__name__}: {str(e)[:160]}"
    random_seed = arg == "seed" and kw[arg] is None  # a fresh seed per call, by design
    if len(results) == 2 and not random_seed and not _same(results["reference"], results["triton"]):
        return "disagree", "reference and triton differ"
    return "ok", ""


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point():
            return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-4, equal_nan=True))
        return bool(torch.equal(a, b))
    return a == b


def main() -> None:
    import collections
    import sys

    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    bad, every = [], {}
    for name, arg, i in cases():
        outcome, detail = run_case(name, arg, i)
        every[f"{name}|{arg}|{i}"] = outcome
        counts[name][outcome] += 1
        if outcome not in GOOD_OUTCOMES:
            bad.append(f"{name}({arg}=bad[{i}]): {outcome}: {detail}")
    total = collections.Counter()
    for name, c in counts.items():
        total.update(c)
        print(f"{name:26s} " + " ".join(f"{k}={v}" for k, v in sorted(c.items())))
    print("TOTAL", dict(total))
    if "-v" in sys.argv:
        print("\n".join(bad))
    if "--json" in sys.argv:  # every case's outcome, to compare two trees
        import json

        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(every, f)


if __name__ == "__main__":
    main()
