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

import torch

from .. import fast_paths
from .._device import offloaded
from ..backend import pinned_backend
from ..validation import records_grad
from .patch_parts import count_line
from . import token2wav_synth

# New fast paths are opt-in until a GPU run passes their gpu-marked tests (project rule): patch() swaps these pieces
# in only when the "token2wav" fast path is on (omni_fast.fast_paths; OMNI_FAST_TOKEN2WAV=1); otherwise it lists
# them under "left as is".
OPT_IN = "opt-in until GPU-tested: OMNI_FAST_TOKEN2WAV=1 or omni_fast.fast_paths.enable('token2wav')"


def label(done: str, supported: bool) -> tuple[bool, str]:
    """(swap it?, the report's words) for a Token2Wav piece whose replacement is ``done``."""
    if not supported:
        return False, "(unsupported variant)"
    return (True, done) if fast_paths.enabled("token2wav") else (False, f"({OPT_IN})")


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
    if records_grad(hidden_states, act.alpha) \
            or hidden_states.dtype not in (torch.float32, torch.float16, torch.bfloat16) \
            or act.alpha.dtype != hidden_states.dtype \
            or offloaded(act.alpha, act.beta, self.upsample.filter, self.downsample.filter):
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
    if records_grad(hidden_states, self.convs1[0].weight) \
            or hidden_states.dtype not in (torch.float32, torch.float16, torch.bfloat16) \
            or self.convs1[0].weight.dtype != hidden_states.dtype \
            or offloaded(*(t for c in (*self.convs1, *self.convs2) for t in (c.weight, c.bias))):
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
    """Record on a patched ``DiTAttention`` the block mask :func:`dit_attention_forward` passes to
    :func:`omni_fast.ops.block_attention` (block size in frames, blocks visible behind and ahead)."""
    attention.__dict__[DIT_BLOCK_ATTR] = (int(block_size), int(look_backward), int(look_ahead))


def dit_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None):
    """transformers' ``DiTAttention.forward`` (projections, RoPE on the first head only, output projection) with the
    masked SDPA replaced by :func:`omni_fast.ops.block_attention` (the mask argument is the same rule)."""
    if records_grad(hidden_states, self.to_q.weight) \
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


ADA_NORMS = ("Qwen2_5_OmniAdaLayerNormZero", "Qwen2_5_OmniAdaLayerNormZero_Final")


def ada_norm_forward(self, hidden_states, emb=None):
    """transformers' AdaLN (zero / final): the timestep projection as it is, then LayerNorm + shift / scale in one
    :func:`omni_fast.ops.ada_layer_norm` launch. Returns what transformers' forward returns."""
    if records_grad(hidden_states, self.linear.weight) \
            or hidden_states.dtype not in (torch.float32, torch.float16, torch.bfloat16) or hidden_states.dim() != 3:
        return self._omni_fast_forward(hidden_states, emb)
    from .. import ops

    mod = self.linear(self.silu(emb))
    final = type(self).__name__.endswith("_Final")
    parts = mod.chunk(2 if final else 6, dim=1)
    scale, shift = (parts[0], parts[1]) if final else (parts[1], parts[0])
    out = ops.ada_layer_norm(hidden_states.contiguous(), shift.contiguous(), scale.contiguous(),
                             eps=self.norm.eps, backend=pinned_backend(self))
    return out if final else (out, parts[2], parts[3], parts[4], parts[5])


def dit_sample(self, conditioning_vector, reference_mel_spectrogram, quantized_code, num_steps=10,
               guidance_scale=0.5, sway_coefficient=-1.0):
    """transformers' ``Qwen2_5OmniToken2WavDiTModel.sample`` as :func:`omni_fast.models.dit_solve.sample`: the whole
    ODE solve replayed as one CUDA graph per length bucket (the same noise and steps for a given seed). A float
    dtype other than fp16/bf16/fp32, or a DiT whose weights are not all on one device (offloaded by device_map: on
    meta; or split; :class:`~omni_fast.models.dit_solve.WeightsElsewhere`) runs transformers' own sample. Buckets: ``dit_solve.CODE_BUCKETS``, or what
    :func:`omni_fast.integrations.token2wav_synth.set_code_buckets` set."""
    if reference_mel_spectrogram.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return self._omni_fast_sample(conditioning_vector, reference_mel_spectrogram, quantized_code, num_steps,
                                      guidance_scale, sway_coefficient)
    from ..models import dit_solve

    try:
        with torch.no_grad():  # (transformers' sample is @torch.no_grad too)
            return dit_solve.sample(self, conditioning_vector, reference_mel_spectrogram, quantized_code, num_steps,
                                    guidance_scale, sway_coefficient, backend=pinned_backend(self),
                                    buckets=self.__dict__.get(token2wav_synth.BUCKETS_ATTR, dit_solve.CODE_BUCKETS))
    except dit_solve.WeightsElsewhere:  # (raised before the noise draw: transformers' sample draws the same noise)
        return self._omni_fast_sample(conditioning_vector, reference_mel_spectrogram, quantized_code, num_steps,
                                      guidance_scale, sway_coefficient)


def patch_piece(module, cls: str, wanted: bool, backend, bucket: dict, left: dict, part: str, swap_forward,
                pin, swap_sample=None) -> None:
    """What :func:`omni_fast.patch` does to one Token2Wav module (``swap_forward(module, fn)`` / ``pin(module,
    backend)`` / ``swap_sample(module, fn)``: patch's own helpers); adds the report line to ``bucket`` (swapped)
    or ``left``."""
    if cls == token2wav_synth.CLASS:  # its whole forward -> dit_solve.synthesize
        token2wav_synth.patch_forward(module, wanted, backend, bucket, left, part, swap_forward, pin, label)
        return
    if cls == "Qwen2_5OmniToken2WavDiTModel" and swap_sample is not None:
        swap, what = label("-> one CUDA graph per length bucket (omni_fast.models.dit_solve)", True)
        if wanted and swap:
            swap_sample(module, dit_sample)
            pin(module, backend)
        count_line(bucket, left, swap, (part, f"{cls}.sample: the whole RK4 ODE solve {what}"))
    if cls == "Qwen2_5OmniToken2WavDiTModel":
        swap, what = label("-> one omni_fast.ops.block_attention launch per layer (paged varlen flash "
                           "attention)", True)
        for layer in module.transformer_blocks:
            if wanted and swap:
                set_dit_block(layer.attn, module.block_size, layer.look_backward_block, layer.look_ahead_block)
                swap_forward(layer.attn, dit_attention_forward)
                pin(layer.attn, backend)
        key, n = (part, f"DiTAttention: block-masked SDPA {what}"), len(module.transformer_blocks)
    else:
        fn, what, ok = {
            AMP_BLOCK: (amp_block_forward, "same-padded convs (+ residual) -> omni_fast.ops.padded_conv1d on the "
                        "Code2Wav conv kernels", amp_block_supported(module)),
            AA_ACTIVATION: (aa_activation_forward, "BigVGAN upsample FIR + SnakeBeta + low-pass FIR -> one "
                            "omni_fast.ops.anti_aliased_snake launch", aa_activation_supported(module)),
        }.get(cls, (ada_norm_forward, "LayerNorm + shift/scale modulation -> one omni_fast.ops.ada_layer_norm "
                    "launch", True))
        done, rest = what.split(" -> ")
        swap, how = label("-> " + rest, ok)
        if wanted and swap:
            swap_forward(module, fn)
            pin(module, backend)
        key, n = (part, f"{cls}: {done} {how}"), 1
    count_line(bucket, left, swap, key, n)
