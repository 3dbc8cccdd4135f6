"""Qwen2.5-Omni Token2Wav pieces :func:`omni_fast.patch` swaps in (bound to transformers' modules).

- ``Qwen2_5OmniAntiAliasedActivation1d`` (BigVGAN's upsample FIR -> SnakeBeta -> low-pass FIR + decimate, four
  launches and two double-rate intermediates in transformers) -> one :func:`omni_fast.ops.anti_aliased_snake`.
- ``Qwen2_5OmniAMPBlock`` (BigVGAN's residual units) -> its same-padded convs on the Code2Wav conv kernels
  (:func:`omni_fast.ops.padded_conv1d`), the residual add fused into the second conv of each pair.
- ``DiTAttention`` (the DiT's block-masked attention, an ``[S, S]`` boolean mask through SDPA in transformers) -> one
  :func:`omni_fast.ops.block_attention` launch per layer (the block rule from the layer's look-back / look-ahead
  and the DiT's ``block_size``, set by :func:`set_dit_block`).

Anything the op does not cover (another activation than SnakeBeta, different up/down ratios, autograd, an
unsupported dtype) runs transformers' own forward, so a patched model computes what it did before.
"""

from __future__ import annotations

import os

import torch

from ..backend import pinned_backend

# New fast paths are opt-in until a GPU run passes their gpu-marked tests (project rule): patch() swaps these pieces
# in only when ENABLED (or OMNI_FAST_TOKEN2WAV=1 at import); otherwise it lists them under "left as is".
ENABLED = os.environ.get("OMNI_FAST_TOKEN2WAV", "") == "1"
OPT_IN = "opt-in until GPU-tested: omni_fast.integrations.token2wav.ENABLED = True"


def label(done: str, supported: bool) -> tuple[bool, str]:
    """(swap it?, the report's words) for a Token2Wav piece whose replacement is ``done``."""
    if not supported:
        return False, "(unsupported variant)"
    return (True, done) if ENABLED else (False, f"({OPT_IN})")


AA_ACTIVATION = "Qwen2_5OmniAntiAliasedActivation1d"
AMP_BLOCK = "Qwen2_5OmniAMPBlock"


def aa_activation_supported(module) -> bool:
    """Whether the fused op reproduces ``module`` (a ``Qwen2_5OmniAntiAliasedActivation1d``)."""
    act, up, down = getattr(module, "act", None), getattr(module, "upsample", None), getattr(module, "downsample", None)
    if type(act).__name__ != "Qwen2_5OmniSnakeBeta" or up is None or down is None:
        return False
    ratio, k_up = int(up.ratio), int(up.filter.numel())
    return int(down.stride) == ratio and k_up % ratio == 0 and (k_up - ratio) // 2 >= ratio - 1


def aa_activation_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """``[B, C, T]`` -> ``[B, C, T]``: the whole anti-aliased SnakeBeta in one fused launch (fp32 inside)."""
    act = self.act
    if (torch.is_grad_enabled() and (hidden_states.requires_grad or act.alpha.requires_grad)) \
            or hidden_states.dtype not in (torch.float32, torch.float16, torch.bfloat16) \
            or act.alpha.dtype != hidden_states.dtype:
        return self._omni_fast_forward(hidden_states)
    from .. import ops

    # (the FIRs are non-persistent buffers: a model cast to bf16 casts them too; the op takes them in fp32)
    return ops.anti_aliased_snake(hidden_states, act.alpha.detach(), act.beta.detach(),
                                  self.upsample.filter.float(), self.downsample.filter.float(),
                                  ratio=int(self.upsample.ratio), backend=pinned_backend(self))


def amp_block_supported(module) -> bool:
    """Whether every conv of the AMP block is a plain ``nn.Conv1d`` with symmetric integer padding."""
    convs = list(getattr(module, "convs1", [])) + list(getattr(module, "convs2", []))
    return bool(convs) and all(type(c) is torch.nn.Conv1d and isinstance(c.padding, tuple)
                               and c.padding_mode == "zeros" for c in convs)


def amp_block_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """transformers' AMP block loop with each conv one :func:`omni_fast.ops.padded_conv1d` launch (the second of each pair
    adds the residual). The activations are the modules themselves (patched separately)."""
    if (torch.is_grad_enabled() and (hidden_states.requires_grad or self.convs1[0].weight.requires_grad)) \
            or hidden_states.dtype not in (torch.float32, torch.float16, torch.bfloat16) \
            or self.convs1[0].weight.dtype != hidden_states.dtype:
        return self._omni_fast_forward(hidden_states)
    from .. import ops

    backend = pinned_backend(self)
    acts1, acts2 = self.activations[::2], self.activations[1::2]
    for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, acts1, acts2):
        h = ops.padded_conv1d(act1(hidden_states), conv1.weight, conv1.bias, padding=conv1.padding[0],
                       dilation=conv1.dilation[0], backend=backend)
        hidden_states = ops.padded_conv1d(act2(h), conv2.weight, conv2.bias, padding=conv2.padding[0],
                                   dilation=conv2.dilation[0], residual=hidden_states, backend=backend)
    return hidden_states


DIT_BLOCK_ATTR = "_omni_fast_dit_block"  # (block_size, look_backward, look_ahead) on a patched DiTAttention


def set_dit_block(attention, block_size: int, look_backward: int, look_ahead: int) -> None:
    attention.__dict__[DIT_BLOCK_ATTR] = (int(block_size), int(look_backward), int(look_ahead))


def dit_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None):
    """transformers' ``DiTAttention.forward`` (projections, RoPE on the first head only, output projection) with the
    masked SDPA replaced by :func:`omni_fast.ops.block_attention` (the mask argument is the same rule)."""
    if torch.is_grad_enabled() and (hidden_states.requires_grad or self.to_q.weight.requires_grad) \
            or hidden_states.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return self._omni_fast_forward(hidden_states, position_embeddings, attention_mask)
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import apply_rotary_pos_emb, deinterleave_head_dim

    from .. import ops

    B = hidden_states.shape[0]
    q, k, v = (lin(hidden_states).view(B, -1, self.heads, self.inner_dim // self.heads)
               for lin in (self.to_q, self.to_k, self.to_v))
    cos, sin = position_embeddings
    # only the first head gets RoPE (the checkpoint's training quirk), in the interleaved layout
    q0, k0 = apply_rotary_pos_emb(deinterleave_head_dim(q[:, :, :1].transpose(1, 2)),
                                  deinterleave_head_dim(k[:, :, :1].transpose(1, 2)), cos, sin)
    q = torch.cat([q0.transpose(1, 2), q[:, :, 1:]], dim=2).contiguous()
    k = torch.cat([k0.transpose(1, 2), k[:, :, 1:]], dim=2).contiguous()
    bs, lb, la = self.__dict__[DIT_BLOCK_ATTR]
    out = ops.block_attention(q, k, v.contiguous(), block_size=bs, look_backward=lb, look_ahead=la,
                              backend=pinned_backend(self))
    return self.to_out[1](self.to_out[0](out.reshape(B, -1, self.inner_dim)))
