"""Code2Wav (Qwen3-Omni's vocoder) as plain PyTorch functions, step by step as transformers computes it.

Ops (shapes ``[B, C, T]``, channels first, as ``nn.Conv1d``):

- :func:`snake_beta`: ``x + 1 / (exp(beta) + 1e-9) * sin(x * exp(alpha))**2`` with per-channel log-space
  ``alpha``/``beta`` ``[C]``; the same ops in the same dtype as ``Qwen3OmniMoeSnakeBeta``.
- :func:`causal_conv1d`: ``Qwen3OmniMoeCausalConvNet``: left zero padding ``(k-1)*d + 1 - stride``, extra right
  zero padding up to whole output frames; optionally SnakeBeta on the input first and a residual added to the output
  (one decoder residual unit is ``causal_conv1d(causal_conv1d(x, w1, snake=a1), w2, snake=a2, residual=x)``).
- :func:`causal_conv_transpose1d`: ``Qwen3OmniMoeCausalTransConvNet``: ``ConvTranspose1d`` then ``k - stride``
  samples trimmed at both ends; optionally SnakeBeta on the input first.

Streaming state. Both convolutions are causal, so they continue exactly from a left context:

- ``causal_conv1d`` with ``stride=1`` needs the last ``ctx = (k-1)*dilation`` input samples. ``state`` is that
  context ``[B, C_in, ctx]`` of RAW inputs (before the SnakeBeta): the op applies the SnakeBeta to
  ``cat(state, x)`` (recomputing it on ``ctx`` samples is cheap and exact, and it keeps one state per layer whether
  or not an activation is fused). ``state=None`` is the start of a stream: zero padding, which equals a zero state
  because ``snake_beta(0) == 0`` exactly. ``new_state`` is the last ``ctx`` samples of ``cat(state, x)``.
- ``causal_conv_transpose1d`` with ``k = m * stride``: output block ``q`` (``stride`` samples) depends on inputs
  ``q .. q+m-1`` only, so the layer is a "valid" convolution of ``m`` taps followed by a pixel shuffle, and the
  trimmed output of ``L`` inputs is ``(L - m + 1) * stride`` samples. ``state`` holds the last ``m - 1`` raw inputs
  ``[B, C_in, m-1]``; with a state every input yields ``stride`` new samples. ``state=None`` is the start of a
  stream (transformers' one-shot semantics: no padding). With ``k = 2*stride`` the state is one sample.

Because every layer is causal and nothing ever depends on the end of the input, the one-shot decode of ``T``
frames is a prefix of the decode of any longer sequence: streaming yields every sample as soon as its inputs exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Mapping

import torch
import torch.nn.functional as F

SNAKE_EPS = 1e-9


# --- ops -------------------------------------------------------------------------------------------------------


def snake_beta(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """SnakeBeta on x ``[B, C, T]`` with log-space alpha/beta ``[C]``, the exact ops of ``Qwen3OmniMoeSnakeBeta``."""
    a = torch.exp(alpha.unsqueeze(0).unsqueeze(-1))
    b = torch.exp(beta.unsqueeze(0).unsqueeze(-1))
    return x + (1.0 / (b + SNAKE_EPS)) * torch.pow(torch.sin(x * a), 2)


def conv1d_context(kernel_size: int, dilation: int = 1, stride: int = 1) -> int:
    """Left context (= left zero padding) of a causal conv: ``(k-1)*dilation + 1 - stride``."""
    return (kernel_size - 1) * dilation + 1 - stride


def conv_transpose1d_context(kernel_size: int, stride: int) -> int:
    """Input samples a causal transposed conv with ``k = m*stride`` carries between chunks: ``m - 1``."""
    return kernel_size // stride - 1


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    snake: tuple[torch.Tensor, torch.Tensor] | None = None,
    residual: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Qwen3OmniMoeCausalConvNet`` (+ optional input SnakeBeta and output residual); returns ``(y, new_state)``.

    x ``[B, C_in, T]``; weight ``[C_out, C_in/groups, k]``; bias ``[C_out]``; snake ``(alpha, beta)`` ``[C_in]``;
    residual ``[B, C_out, T_out]``; state ``[B, C_in, (k-1)*dilation]`` (stride 1 only, see the module docstring).
    y ``[B, C_out, T_out]`` with ``T_out = ceil(T / stride)``; new_state ``[B, C_in, ctx]`` (raw inputs).
    """
    k = weight.shape[-1]
    ctx = conv1d_context(k, dilation, stride)
    if state is None and x.shape[-1] == 0:
        y = x.new_empty(x.shape[0], weight.shape[0], 0)
        full = F.pad(x, (ctx, 0))
    elif state is None:
        h = snake_beta(x, *snake) if snake is not None else x
        length = h.shape[-1]
        eff = (k - 1) * dilation + 1
        n_frames = (length - eff + ctx) / stride + 1
        extra = (math.ceil(n_frames) - 1) * stride + (eff - ctx) - length
        y = F.conv1d(F.pad(h, (ctx, extra), mode="constant", value=0), weight, bias, stride=stride,
                     dilation=dilation, groups=groups).contiguous()
        full = F.pad(x, (ctx, 0)) if ctx > 0 else x
    else:
        if stride != 1:
            raise ValueError("causal_conv1d: a streaming state needs stride=1")
        full = torch.cat((state, x), dim=-1)
        if x.shape[-1] == 0:  # an empty chunk: nothing out, the state carries over
            y = x.new_empty(x.shape[0], weight.shape[0], 0)
        else:
            h = snake_beta(full, *snake) if snake is not None else full
            y = F.conv1d(h, weight, bias, dilation=dilation, groups=groups).contiguous()
    if residual is not None:
        y = y + residual
    new_state = (full[..., full.shape[-1] - ctx:].clone(memory_format=torch.contiguous_format) if ctx > 0
                 else x.new_empty(x.shape[0], x.shape[1], 0))
    return y, new_state


def causal_conv_transpose1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int,
    snake: tuple[torch.Tensor, torch.Tensor] | None = None,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Qwen3OmniMoeCausalTransConvNet`` (+ optional input SnakeBeta); returns ``(y, new_state)``.

    x ``[B, C_in, L]``; weight ``[C_in, C_out, k]`` with ``k = m * stride``; bias ``[C_out]``; snake ``[C_in]``
    pairs; state ``[B, C_in, m-1]`` raw inputs. y ``[B, C_out, (L' - m + 1) * stride]`` where ``L' = L`` without a
    state and ``L + m - 1`` with one; new_state = the last ``m - 1`` raw inputs of ``cat(state, x)``
    (``L' >= m - 1`` is required to form it).
    """
    k = weight.shape[-1]
    ctx = conv_transpose1d_context(k, stride)
    full = x if state is None else torch.cat((state, x), dim=-1)
    if full.shape[-1] == 0:
        y = x.new_empty(x.shape[0], weight.shape[1], 0)
    else:
        h = snake_beta(full, *snake) if snake is not None else full
        y = F.conv_transpose1d(h, weight, bias, stride=stride)
        pad = k - stride
        y = y[..., pad: y.shape[-1] - pad].contiguous()
    if full.shape[-1] < ctx:
        raise ValueError(f"causal_conv_transpose1d: needs at least {ctx} input samples to form a state, "
                         f"got {full.shape[-1]}")
    new_state = full[..., full.shape[-1] - ctx:].clone(memory_format=torch.contiguous_format)
    return y, new_state


# --- the model -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Code2WavConfig:
    """The hyper-parameters Code2Wav needs (a subset of transformers' ``Qwen3OmniMoeCode2WavConfig``)."""

    codebook_size: int = 2048
    num_quantizers: int = 16
    hidden_size: int = 1024
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 64
    intermediate_size: int = 3072
    num_hidden_layers: int = 8
    sliding_window: int = 72
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    attention_bias: bool = False
    upsample_rates: tuple[int, ...] = (8, 5, 4, 3)
    upsampling_ratios: tuple[int, ...] = (2, 2)
    decoder_dim: int = 1536

    @classmethod
    def from_transformers(cls, config) -> "Code2WavConfig":
        """From a ``Qwen3OmniMoeCode2WavConfig`` (default RoPE and SiLU only, as the checkpoint uses)."""
        # transformers >= 5 keeps RoPE settings in rope_parameters; older releases in rope_theta / rope_scaling
        rope = dict(getattr(config, "rope_parameters", None) or {})
        scaling = dict(getattr(config, "rope_scaling", None) or {})
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type != "default":
            raise ValueError(f"Code2Wav: only default RoPE is supported, got {rope_type!r}")
        theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"Code2Wav: only hidden_act='silu' is supported, got {config.hidden_act!r}")
        heads = config.num_attention_heads
        return cls(
            codebook_size=config.codebook_size, num_quantizers=config.num_quantizers, hidden_size=config.hidden_size,
            num_attention_heads=heads, num_key_value_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
            sliding_window=config.sliding_window, rms_norm_eps=config.rms_norm_eps,
            rope_theta=theta, attention_bias=bool(config.attention_bias),
            upsample_rates=tuple(config.upsample_rates), upsampling_ratios=tuple(config.upsampling_ratios),
            decoder_dim=config.decoder_dim,
        )

    @classmethod
    def coerce(cls, config) -> "Code2WavConfig":
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            names = {f.name for f in fields(cls)}
            return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in names})
        return cls.from_transformers(config)

    @property
    def total_upsample(self) -> int:
        return int(math.prod(self.upsample_rates) * math.prod(self.upsampling_ratios))

    def num_samples(self, frames: int) -> int:
        """Samples of the one-shot decode of ``frames`` frames: each k=2r transposed conv yields ``(L - 1) * r``."""
        n = frames
        for f in self.upsampling_ratios:
            n = n * f  # k == stride: no trim
        for r in self.upsample_rates:
            n = max(n - 1, 0) * r  # k = 2r: (L - 1) * r
        return n


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin ``[T, D]`` in ``dtype``, as ``Qwen3OmniMoeRotaryEmbedding`` (fp32 angles, cast at the end)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = positions[:, None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def sliding_window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[Tq, Tk]``: key j visible to query i iff ``q_i - window < k_j <= q_i``."""
    q = q_pos[:, None]
    k = k_pos[None, :]
    allowed = (k <= q) & (k > q - window)
    return torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device).masked_fill(~allowed,
                                                                                    torch.finfo(dtype).min)


def attention(q, k, v, mask, scaling):
    """Eager attention (transformers' ``eager_attention_forward``): q ``[B, H, Tq, D]``, k/v ``[B, Hk, Tk, D]``."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    w = torch.matmul(q, k.transpose(2, 3)) * scaling + mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v)


def pre_transformer_layer(cfg: Code2WavConfig, sd: Mapping[str, torch.Tensor], prefix: str, h: torch.Tensor,
                          cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                          past_kv: tuple[torch.Tensor, torch.Tensor] | None = None):
    """One pre-transformer layer on h ``[B, T, H]``; returns ``(h, (k, v))`` with k/v ``[B, Hk, Tpast+T, D]``."""
    B, T, _ = h.shape
    D = cfg.head_dim
    lin = lambda name, x: F.linear(x, sd[prefix + name + ".weight"], sd.get(prefix + name + ".bias"))  # noqa: E731
    x = _rms_norm(h, sd[prefix + "input_layernorm.weight"], cfg.rms_norm_eps)
    q = lin("self_attn.q_proj", x).view(B, T, -1, D).transpose(1, 2)
    k = lin("self_attn.k_proj", x).view(B, T, -1, D).transpose(1, 2)
    v = lin("self_attn.v_proj", x).view(B, T, -1, D).transpose(1, 2)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    if past_kv is not None:
        k = torch.cat((past_kv[0], k), dim=2)
        v = torch.cat((past_kv[1], v), dim=2)
    o = attention(q, k, v, mask, D ** -0.5).transpose(1, 2).reshape(B, T, -1)
    h = h + sd[prefix + "self_attn_layer_scale.scale"] * lin("self_attn.o_proj", o)
    x = _rms_norm(h, sd[prefix + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    x = lin("mlp.down_proj", F.silu(lin("mlp.gate_proj", x)) * lin("mlp.up_proj", x))
    h = h + sd[prefix + "mlp_layer_scale.scale"] * x
    return h, (k, v)


def codebook_offsets(cfg: Code2WavConfig, device=None) -> torch.Tensor:
    """int64 ``[1, G, 1]``: codebook ``g``'s first row in the shared embedding table (``g * codebook_size``)."""
    return torch.arange(cfg.num_quantizers, device=device).view(1, -1, 1) * cfg.codebook_size


def embed_codes(cfg: Code2WavConfig, table: torch.Tensor, codes: torch.Tensor,
                offsets: torch.Tensor | None = None) -> torch.Tensor:
    """codes ``[B, G, T]`` -> mean of the G offset embeddings ``[B, T, H]``. ``offsets``: :func:`codebook_offsets`
    made once by the caller (a stream: no arange per push)."""
    offsets = codebook_offsets(cfg, codes.device) if offsets is None else offsets
    return F.embedding(codes + offsets, table).mean(1)


def convnext_pointwise(sd: Mapping[str, torch.Tensor], prefix: str, x: torch.Tensor, dw: torch.Tensor,
                       pwconv2: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The ConvNeXt block after its depthwise conv: LayerNorm, MLP (GELU), gamma, + input. ``[B, C, T]``.
    ``pwconv2``: ``(gamma * weight, gamma * bias)`` folded once by the caller (a stream: no gamma launch)."""
    h = dw.permute(0, 2, 1)
    h = F.layer_norm(h, (h.shape[-1],), sd[prefix + "norm.weight"], sd[prefix + "norm.bias"], 1e-6)
    h = F.linear(h, sd[prefix + "pwconv1.weight"], sd[prefix + "pwconv1.bias"])
    h = F.gelu(h)
    if pwconv2 is not None:
        return x + F.linear(h, *pwconv2).permute(0, 2, 1)
    h = F.linear(h, sd[prefix + "pwconv2.weight"], sd[prefix + "pwconv2.bias"])
    h = sd[prefix + "gamma"] * h
    return x + h.permute(0, 2, 1)


def code2wav_forward(cfg: Code2WavConfig, sd: Mapping[str, torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
    """One-shot decode: codes int ``[B, G, T]`` -> wav ``[B, 1, num_samples(T)]`` in the weights' dtype.

    ``sd`` is a transformers ``Qwen3OmniMoeCode2Wav`` state dict (its parameter names).
    """
    B, G, T = codes.shape
    h = embed_codes(cfg, sd["code_embedding.weight"], codes)
    pos = torch.arange(T, device=codes.device)
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, h.dtype)
    mask = sliding_window_mask(pos, pos, cfg.sliding_window, h.dtype)
    for i in range(cfg.num_hidden_layers):
        h, _ = pre_transformer_layer(cfg, sd, f"pre_transformer.layers.{i}.", h, cos, sin, mask)
    h = _rms_norm(h, sd["pre_transformer.norm.weight"], cfg.rms_norm_eps)
    x = h.permute(0, 2, 1)
    for i, f in enumerate(cfg.upsampling_ratios):
        p = f"upsample.{i}."
        x, _ = causal_conv_transpose1d(x, sd[p + "0.conv.weight"], sd[p + "0.conv.bias"], stride=f)
        dw, _ = causal_conv1d(x, sd[p + "1.dwconv.conv.weight"], sd[p + "1.dwconv.conv.bias"], groups=x.shape[1])
        x = convnext_pointwise(sd, p + "1.", x, dw)
    x, _ = causal_conv1d(x, sd["decoder.0.conv.weight"], sd["decoder.0.conv.bias"])
    for i, r in enumerate(cfg.upsample_rates):
        p = f"decoder.{i + 1}.block."
        x, _ = causal_conv_transpose1d(x, sd[p + "1.conv.weight"], sd[p + "1.conv.bias"], stride=r,
                                       snake=(sd[p + "0.alpha"], sd[p + "0.beta"]))
        for j, d in enumerate((1, 3, 9)):
            u = f"{p}{j + 2}."
            y, _ = causal_conv1d(x, sd[u + "conv1.conv.weight"], sd[u + "conv1.conv.bias"], dilation=d,
                                 snake=(sd[u + "act1.alpha"], sd[u + "act1.beta"]))
            x, _ = causal_conv1d(y, sd[u + "conv2.conv.weight"], sd[u + "conv2.conv.bias"],
                                 snake=(sd[u + "act2.alpha"], sd[u + "act2.beta"]), residual=x)
    n = len(cfg.upsample_rates)
    x, _ = causal_conv1d(x, sd[f"decoder.{n + 2}.conv.weight"], sd[f"decoder.{n + 2}.conv.bias"],
                         snake=(sd[f"decoder.{n + 1}.alpha"], sd[f"decoder.{n + 1}.beta"]))
    return x.clamp(min=-1, max=1)


__all__ = [
    "Code2WavConfig", "SNAKE_EPS", "snake_beta", "causal_conv1d", "causal_conv_transpose1d", "conv1d_context",
    "conv_transpose1d_context", "code2wav_forward", "codebook_offsets", "embed_codes", "pre_transformer_layer",
    "convnext_pointwise",
    "rope_cos_sin", "sliding_window_mask", "attention",
]
