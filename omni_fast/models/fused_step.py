"""The phase-fused decode step of :class:`~omni_fast.models.text_decoder.MoeTextDecoder` (``fused=True``).

Three Triton launches per layer (:mod:`omni_fast.kernels.talker_fused`: qkv + q/k norm + TM-RoPE + KV append;
attention + o projection + residual; RMSNorm + router + top-k + experts + shared expert + combine + residual), plus
per step: the residual copy of the input, the final RMSNorm, the head (a batch-invariant GEMV) and the
cache-length increment. Static
shapes, no host sync: the step is captured in a CUDA graph like the ops path. Design: docs/persistent.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .text_decoder import MoeTextDecoder, _State


def unsupported(dec: "MoeTextDecoder") -> str | None:
    """Why the fused step cannot run this decoder (None: it can)."""
    c = dec.config
    if c.head_dim < 16 or c.head_dim & (c.head_dim - 1):
        return f"head_dim must be a power of two >= 16 (got {c.head_dim})"
    if c.num_heads % c.num_kv_heads:
        return "num_heads must be a multiple of num_kv_heads"
    for i, layer in enumerate(dec.layers):
        if not layer.moe:
            return f"layer {i} is dense (mlp_only_layers): the fused step needs MoE layers"
        if layer.top_k > 16:
            return f"layer {i} routes to {layer.top_k} experts (the fused step supports top_k <= 16)"
        if layer.w2 is None:
            return f"layer {i} has quantized experts: the fused step needs float experts"
        if any(t is not None for t in (layer.q_bias, layer.k_bias, layer.v_bias, layer.o_bias)):
            return f"layer {i} has attention biases"
    return None


class FusedWorkspace:
    """Scratch buffers of one batch bucket (shared by every layer: the layers run one after another)."""

    def __init__(self, dec: "MoeTextDecoder", bucket: int, capacity: int):
        from ..kernels.talker_fused import attn_splits, moe_scratch_shapes

        c, dev, dt = dec.config, dec.device, dec.dtype
        nq, nk, d, H = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
        lay = dec.layers[0]
        E, two_i, _ = lay.w13.shape
        shared_inter = lay.shared_w13.shape[0] // 2 if lay.shared_w13 is not None else 0
        self.qkv = torch.empty(bucket, (nq + 2 * nk) * d, device=dev, dtype=dt)
        S = attn_splits(capacity)[0]  # split-KV: fp32 partials of B x n_q x S x H (32 MB at B = 64 on the talker)
        self.o = torch.empty(bucket, S, nq, d, device=dev, dtype=dt)
        self.attn_part = torch.empty(bucket, nq, S, H, device=dev, dtype=torch.float32)
        self.attn_lse = torch.empty(bucket, nq, S, device=dev, dtype=torch.float32)
        lg, act, part = moe_scratch_shapes(bucket, H, E, lay.top_k, two_i // 2, shared_inter)
        self.logits = torch.empty(lg, device=dev, dtype=dt)
        self.act = torch.empty(act, device=dev, dtype=dt)
        self.moe_part = torch.empty(part, device=dev, dtype=torch.float32)
        # per-row arrival counters of the two reducing phases; each phase's last program resets its row to 0
        self.counters = torch.zeros(2, bucket, device=dev, dtype=torch.int32)
        # per (16-row tile, head) counters of the qkv phase (its last 16-column tile finishes the head)
        self.head_counters = torch.zeros(-(-bucket // 16) * (nq + 2 * nk), device=dev, dtype=torch.int32)


def fused_body(dec: "MoeTextDecoder", st: "_State", ws: FusedWorkspace) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of the bucket's rows (what the CUDA graph captures). Returns ``(logits, hidden)``."""
    from ..kernels import talker_fused as tf
    from ..kernels.mtp_gemv import norm_linear
    from ..kernels.mtp_layers import add_rms_norm_

    c = dec.config
    resid = st.x.clone()  # the residual stream, updated in place by phases 2 and 3
    for i, (layer, (kc, vc)) in enumerate(zip(dec.layers, st.caches)):
        tf.qkv_phase(resid, layer.input_norm, layer.q, layer.k, layer.v, ws.qkv, kc, vc, st.cache_seqlens, st.pos,
                     dec.inv_freq, layer.q_norm, layer.k_norm, ws.head_counters, c.rms_norm_eps, c.mrope_section,
                     c.interleaved, c.attention_scaling)
        tf.attn_phase(ws.qkv, kc, vc, st.cache_seqlens, ws.o, layer.o, ws.attn_part, ws.attn_lse, resid,
                      ws.counters[0],
                      c.head_dim ** -0.5)
        tf.moe_phase(resid, layer.post_norm, layer.router, layer.w13, layer.w2, layer.shared_w13, layer.shared_w2,
                     layer.shared_gate, layer.top_k, layer.renormalize, ws.logits, ws.act, ws.moe_part,
                     ws.counters[1], c.rms_norm_eps)
        if i + 1 in st.recorded:  # transformers' hidden_states[i + 1]: the residual after layer i
            st.recorded[i + 1].copy_(resid)
    st.cache_seqlens.add_(1)  # every layer appended this token
    x = add_rms_norm_(resid, None, dec.norm, c.rms_norm_eps)
    # the head as the batch-invariant GEMV (cuBLAS / torch's mm may pick a different reduction per batch size)
    return (None if dec.head is None else norm_linear(x, None, dec.head, 0.0, False)), x  # headless: the caller's
