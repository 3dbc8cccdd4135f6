"""Code2Wav weights: the state-dict contract (names and shapes the config implies) and the fused layouts the
streaming pre-transformer reads (q/k/v and gate/up rows concatenated, views left in the state dict)."""

from __future__ import annotations

from typing import Mapping

import torch

from ..reference.code2wav import Code2WavConfig


def _fuse_layer(cfg: Code2WavConfig, sd: dict, prefix: str) -> dict:
    """One pre-transformer layer's weights for :meth:`Code2WavStream._pre_transformer`: q/k/v rows concatenated
    (``[(Hq + 2 Hk) D, H]``) and gate/up rows (``[2 I, H]``, the layout ``silu_mul`` reads); the per-projection
    entries of ``sd`` are replaced by views of the fused tensors (no second copy); ``o`` / ``down`` carry the layer
    scales (see below). ``next_norm`` is the next
    layer's input norm, or the final norm after the last layer (the residual add and the norm run fused)."""
    a, mlp = prefix + "self_attn.", prefix + "mlp."
    names = [a + "q_proj", a + "k_proj", a + "v_proj"]
    w = {"qkv": _fuse(sd, [n + ".weight" for n in names]),
         "qkv_bias": _fuse(sd, [n + ".bias" for n in names]) if cfg.attention_bias else None,
         "gate_up": _fuse(sd, [mlp + "gate_proj.weight", mlp + "up_proj.weight"]),
         "post_norm": sd[prefix + "post_attention_layernorm.weight"]}
    # The layer scales (per output channel) folded into o_proj / down_proj once: scale * (W x + b) = (scale W) x +
    # scale b, so the residual add takes the GEMM's output as it is (no elementwise launch per sub-layer). A copy of
    # these two weights (the only ones of the pre-transformer not shared with the state dict); the rounding of
    # scale * W is one rounding of the weight dtype, the order of the reference's own rounding of scale * o.
    attn_scale, mlp_scale = sd[prefix + "self_attn_layer_scale.scale"], sd[prefix + "mlp_layer_scale.scale"]
    o_bias = sd.get(a + "o_proj.bias") if cfg.attention_bias else None
    w["o"] = sd[a + "o_proj.weight"] * attn_scale[:, None]
    w["o_bias"] = o_bias * attn_scale if o_bias is not None else None
    w["down"] = sd[mlp + "down_proj.weight"] * mlp_scale[:, None]
    i = int(prefix.split(".")[-2])
    w["next_norm"] = sd[f"pre_transformer.layers.{i + 1}.input_layernorm.weight" if i + 1 < cfg.num_hidden_layers
                        else "pre_transformer.norm.weight"]
    return w


def _fold_gamma(sd: dict, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A ConvNeXt block's ``(gamma * pwconv2.weight, gamma * pwconv2.bias)`` (gamma per output channel), made once:
    the fold of the layer scales above (one rounding of the weight dtype), so the block's pointwise MLP ends in its
    GEMM and the residual add, without an elementwise gamma launch. Copies; ``sd`` keeps the originals."""
    gamma = sd[prefix + "gamma"]
    return sd[prefix + "pwconv2.weight"] * gamma[:, None], sd[prefix + "pwconv2.bias"] * gamma


def _fuse(sd: dict, names: list[str]) -> torch.Tensor:
    fused = torch.cat([sd[n] for n in names], 0)
    for n, part in zip(names, fused.split([sd[n].shape[0] for n in names], 0)):
        sd[n] = part
    return fused


# --- state dict checks -----------------------------------------------------------------------------------------------


def _expected_shapes(cfg: Code2WavConfig) -> dict[str, tuple[int, ...]]:
    H, D = cfg.hidden_size, cfg.head_dim
    hq, hk, inter = cfg.num_attention_heads * D, cfg.num_key_value_heads * D, cfg.intermediate_size
    s: dict[str, tuple[int, ...]] = {"code_embedding.weight": (cfg.codebook_size * cfg.num_quantizers, H),
                                     "pre_transformer.norm.weight": (H,)}
    for i in range(cfg.num_hidden_layers):
        p = f"pre_transformer.layers.{i}."
        s.update({p + "self_attn.q_proj.weight": (hq, H), p + "self_attn.k_proj.weight": (hk, H),
                  p + "self_attn.v_proj.weight": (hk, H), p + "self_attn.o_proj.weight": (H, hq),
                  p + "mlp.gate_proj.weight": (inter, H), p + "mlp.up_proj.weight": (inter, H),
                  p + "mlp.down_proj.weight": (H, inter), p + "input_layernorm.weight": (H,),
                  p + "post_attention_layernorm.weight": (H,), p + "self_attn_layer_scale.scale": (H,),
                  p + "mlp_layer_scale.scale": (H,)})
        if cfg.attention_bias:
            s.update({p + "self_attn.q_proj.bias": (hq,), p + "self_attn.k_proj.bias": (hk,),
                      p + "self_attn.v_proj.bias": (hk,), p + "self_attn.o_proj.bias": (H,)})
    for i, f in enumerate(cfg.upsampling_ratios):
        p = f"upsample.{i}."
        s.update({p + "0.conv.weight": (H, H, f), p + "0.conv.bias": (H,), p + "1.dwconv.conv.weight": (H, 1, 7),
                  p + "1.dwconv.conv.bias": (H,), p + "1.norm.weight": (H,), p + "1.norm.bias": (H,),
                  p + "1.pwconv1.weight": (4 * H, H), p + "1.pwconv1.bias": (4 * H,),
                  p + "1.pwconv2.weight": (H, 4 * H), p + "1.pwconv2.bias": (H,), p + "1.gamma": (H,)})
    dim = cfg.decoder_dim
    s.update({"decoder.0.conv.weight": (dim, H, 7), "decoder.0.conv.bias": (dim,)})
    for i, r in enumerate(cfg.upsample_rates):
        p = f"decoder.{i + 1}.block."
        out = dim // 2
        s.update({p + "0.alpha": (dim,), p + "0.beta": (dim,), p + "1.conv.weight": (dim, out, 2 * r),
                  p + "1.conv.bias": (out,)})
        for j in range(3):
            u = f"{p}{j + 2}."
            s.update({u + "act1.alpha": (out,), u + "act1.beta": (out,), u + "act2.alpha": (out,),
                      u + "act2.beta": (out,), u + "conv1.conv.weight": (out, out, 7), u + "conv1.conv.bias": (out,),
                      u + "conv2.conv.weight": (out, out, 1), u + "conv2.conv.bias": (out,)})
        dim = out
    n = len(cfg.upsample_rates)
    s.update({f"decoder.{n + 1}.alpha": (dim,), f"decoder.{n + 1}.beta": (dim,),
              f"decoder.{n + 2}.conv.weight": (1, dim, 7), f"decoder.{n + 2}.conv.bias": (1,)})
    return s


def _check_state_dict(cfg: Code2WavConfig, sd: Mapping[str, torch.Tensor]) -> None:
    expected = _expected_shapes(cfg)
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(f"state dict is missing {len(missing)} Code2Wav weights, e.g. {missing[:3]}")
    dtype = sd["code_embedding.weight"].dtype
    device = sd["code_embedding.weight"].device
    for k, shape in expected.items():
        t = sd[k]
        if tuple(t.shape) != shape:
            raise ValueError(f"state dict weight {k} has shape {list(t.shape)}, the config expects {list(shape)}")
        if t.dtype != dtype or t.device != device:
            raise ValueError(f"state dict weight {k} is {t.dtype} on {t.device}; all weights must share "
                             f"{dtype} on {device}")
