"""Qwen2.5-Omni Token2Wav DiT forward with few launches per layer (the body of the captured ODE solve).

transformers' ``DiTDecoderLayer`` issues ~79 device launches per layer in fp32 eager mode: three q/k/v GEMMs, ~20
small ops for the first-head RoPE (slicing, ``cat``, ``neg``, products), the ``[S, S]`` mask, the AdaLN modulation
GEMM (the same ``silu(time embedding)`` in every layer), LayerNorm and three elementwise ops per modulation, two per
gated residual. Here one layer is 9 launches, each computing what transformers computes:

1. ``gated_ada_layer_norm``: the previous layer's MLP residual ``h + gate_mlp * ff`` and this layer's
   ``attn_norm`` modulation, one Triton kernel (the first layer: ``ada_layer_norm``, no residual);
2. one q/k/v GEMM on the three projections concatenated (:func:`fuse_weights`);
3. ``dit_qkv_rope``: q/k/v split into the attention's layout, RoPE on the first head of q and k, one kernel;
4. ``block_attention`` with a :class:`~omni_fast.ops.dit.BlockPlan` built once per solve for each block rule;
5. the output projection (``to_out``);
6. ``gated_ada_layer_norm``: ``h + gate_msa * attn``, then ``ff_norm`` and its modulation;
7-9. the MLP as transformers has it (GEMM + bias, GELU(tanh), GEMM + bias).

The AdaLN modulations of all layers and of ``norm_out`` are ONE GEMM per forward (their weights concatenated),
read by the kernels in place through strided views.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

_FUSED = "_omni_fast_dit_fused"  # on the DiT module: the FusedWeights its parameters are views of


class FusedWeights(NamedTuple):
    """Concatenated weights whose slices ARE the DiT's parameters (no second copy): per layer q | k | v
    (``[3 * inner, C]`` + bias), and every AdaLN modulation linear, layers then ``norm_out`` (``[n * 6C + 2C, C]``
    + bias)."""

    qkv: list[tuple[torch.Tensor, torch.Tensor]]
    mod_weight: torch.Tensor
    mod_bias: torch.Tensor


def _groups(dit) -> list[list[torch.nn.Linear]]:
    """The linears each fused tensor concatenates: one group per layer's q/k/v, then all modulations."""
    blocks = list(dit.transformer_blocks)
    return [[b.attn.to_q, b.attn.to_k, b.attn.to_v] for b in blocks] + \
        [[b.attn_norm.linear for b in blocks] + [dit.norm_out.linear]]


def _is_view_chain(lins: list[torch.nn.Linear], weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether the linears' weights / biases are consecutive slices of ``weight`` / ``bias`` now."""
    w_at, b_at = weight.data_ptr(), bias.data_ptr()
    for lin in lins:
        w, b = lin.weight, lin.bias
        if b is None or w.data_ptr() != w_at or b.data_ptr() != b_at or w.dtype != weight.dtype \
                or w.device != weight.device or not w.is_contiguous():
            return False
        w_at += w.numel() * w.element_size()
        b_at += b.numel() * b.element_size()
    return True


def _fuse(lins: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the linears' weights / biases and rebind each parameter to its slice (values unchanged; the old
    storage is freed once nothing else holds it)."""
    weight = torch.cat([lin.weight.detach() for lin in lins])
    bias = torch.cat([lin.bias.detach() for lin in lins])
    w_at = b_at = 0
    for lin in lins:
        n = lin.weight.shape[0]
        lin.weight.data = weight[w_at:w_at + n]
        lin.bias.data = bias[b_at:b_at + n]
        w_at, b_at = w_at + n, b_at + n
    return weight, bias


def fusable(dit) -> bool:
    """Whether every linear to fuse has a bias and all share one dtype / device (transformers' DiT: yes)."""
    lins = [lin for group in _groups(dit) for lin in group]
    w0 = lins[0].weight
    return all(lin.bias is not None and lin.weight.dtype == w0.dtype and lin.weight.device == w0.device
               and lin.bias.dtype == w0.dtype for lin in lins)


def fused_now(dit) -> FusedWeights | None:
    """The :class:`FusedWeights` :func:`fuse_weights` last built for the DiT (None before its first call)."""
    return dit.__dict__.get(_FUSED)


@torch.no_grad()
def fuse_weights(dit) -> FusedWeights:
    """The DiT's :class:`FusedWeights`, built on first use and whenever the parameters stopped being their slices
    (``.to()``, reassigned parameters). Idempotent and launch-free once built: call it before a CUDA-graph capture.
    An in-place update of a parameter (``load_state_dict``, ``copy_``) writes into the shared storage, so the
    fused tensors follow it."""
    groups = _groups(dit)
    have = dit.__dict__.get(_FUSED)
    if have is not None and all(_is_view_chain(g, w, b) for g, (w, b) in zip(groups, [*have.qkv, (
            have.mod_weight, have.mod_bias)])):
        return have
    fused = [_fuse(g) for g in groups]
    have = dit.__dict__[_FUSED] = FusedWeights(fused[:-1], *fused[-1])
    return have


def attention_plans(dit, rows: int, seq_len: int, lens: torch.Tensor) -> dict:
    """``{(look_backward, look_ahead): BlockPlan}`` for the DiT's layers (the real DiT: 3 rules for 22 layers), on
    ``lens``' device (no host sync)."""
    from .. import ops

    plans = {}
    for layer in dit.transformer_blocks:
        rule = (int(layer.look_backward_block), int(layer.look_ahead_block))
        if rule not in plans:
            plans[rule] = ops.block_attention_plan(rows, seq_len, block_size=dit.block_size, look_backward=rule[0],
                                                   look_ahead=rule[1], seq_lens=lens)
    return plans


def _attention(layer, norm, qkv_weights, rope, lens, plan, block_size, backend):
    """``DiTAttention`` on the fused q/k/v projection: GEMM, split + first-head RoPE, block attention, output
    projection. norm ``[rows, S, C]`` -> ``[rows, S, C]``."""
    from .. import ops

    attn = layer.attn
    rows = norm.shape[0]
    qkv = F.linear(norm, *qkv_weights)
    q, k, v = ops.dit_qkv_rope(qkv, rope[0], rope[1], heads=attn.heads, backend=backend)
    out = ops.block_attention(q, k, v, block_size=block_size, look_backward=int(layer.look_backward_block),
                              look_ahead=int(layer.look_ahead_block), seq_lens=lens, plan=plan, backend=backend)
    return attn.to_out[1](attn.to_out[0](out.reshape(rows, -1, attn.inner_dim)))


def layers_forward(dit, h, time_embedding, static, backend):
    """Every ``DiTDecoderLayer`` then ``norm_out`` (modulated) on h ``[rows, S, C]`` with the time embedding
    ``[rows, C]``; returns the input of ``proj_out``. ``static``: ``fused`` (:func:`fuse_weights`), ``rope`` (cos,
    sin ``[1 or rows, S, D]``), ``lens`` (int32 ``[rows]``), ``plans`` (:func:`attention_plans`)."""
    from .. import ops

    fused = static["fused"]
    C = h.shape[-1]
    # all modulations at once: transformers' per-layer ``linear(silu(emb))``, the same emb in every layer
    mod = F.linear(F.silu(time_embedding), fused.mod_weight, fused.mod_bias)
    delta = gate = None
    for i, layer in enumerate(dit.transformer_blocks):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:, 6 * C * i:6 * C * (i + 1)].chunk(6, 1)
        eps = layer.attn_norm.norm.eps
        if delta is None:
            norm = ops.ada_layer_norm(h, shift_msa, scale_msa, eps=eps, backend=backend)
        else:  # the previous layer's ``h + gate_mlp * ff`` fused with this layer's attn_norm
            h, norm = ops.gated_ada_layer_norm(h, delta, gate, shift_msa, scale_msa, eps=eps, backend=backend)
        rule = (int(layer.look_backward_block), int(layer.look_ahead_block))
        attn = _attention(layer, norm, fused.qkv[i], static["rope"], static["lens"], static["plans"][rule],
                          dit.block_size, backend)
        h, norm = ops.gated_ada_layer_norm(h, attn, gate_msa, shift_mlp, scale_mlp, eps=layer.ff_norm.eps,
                                           backend=backend)
        delta, gate = layer.ff(norm), gate_mlp
    scale, shift = mod[:, 6 * C * len(dit.transformer_blocks):].chunk(2, 1)  # norm_out: (scale, shift) order
    return ops.gated_ada_layer_norm(h, delta, gate, shift, scale, eps=dit.norm_out.norm.eps, backend=backend)[1]
