"""Shared helpers of the Code2Wav tests (tests/test_code2wav*.py): tiny transformers configs and models with
random weights, the conv / transposed-conv kernel checkers, streaming drivers (chunks, resets)."""

import pytest
import torch

import omni_fast
import omni_fast.models  # noqa: F401  (not imported by omni_fast itself)
from omni_fast.reference import code2wav as ref
from omni_fast.testing import DEVICE, assert_matches_reference

transformers = pytest.importorskip("transformers")

from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3  # noqa: E402
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeCode2WavConfig  # noqa: E402


# Tiny configs with different upsample layouts (the real one is ratios (2, 2), rates (8, 5, 4, 3)).
LAYOUTS = [
    dict(upsampling_ratios=[2], upsample_rates=[2, 3]),
    dict(upsampling_ratios=[2, 2], upsample_rates=[3]),
    dict(upsampling_ratios=[3], upsample_rates=[4, 2]),
]


def _hf_config(layout=0, **over):
    kw = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, num_hidden_layers=2,
              codebook_size=16, num_quantizers=4, decoder_dim=32, sliding_window=5, rms_norm_eps=1e-5)
    kw.update(LAYOUTS[layout])
    kw.update(over)
    return Qwen3OmniMoeCode2WavConfig(**kw)


def _randomize(module: torch.nn.Module, scale=0.3):
    """Random weights everywhere (transformers initialises SnakeBeta/LayerScale/gamma to trivial values)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("alpha", "beta")):
                p.uniform_(-0.5, 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("gamma", "layer_scale.scale")):
                p.uniform_(0.2, 0.8)
            else:
                fan = p.shape[1] * (p.shape[2] if p.dim() == 3 else 1) if p.dim() > 1 else 4
                p.normal_(0, scale * (3.0 / fan) ** 0.5 * (2 if p.dim() > 1 else 1))
    return module


def _hf_model(layout=0, dtype=torch.float32, **over):
    m = _randomize(q3.Qwen3OmniMoeCode2Wav(_hf_config(layout, **over)).eval())
    with torch.no_grad():  # keep the waveform mostly inside the final clamp's [-1, 1]
        m.decoder[-1].conv.weight.mul_(0.05)
    return m.to(dtype)


def _snake_params(C, dtype):
    return (torch.randn(C, device=DEVICE) * 0.4).to(dtype), (torch.randn(C, device=DEVICE) * 0.4).to(dtype)


def _dbl(v):
    if v is None or isinstance(v, int):
        return v
    if isinstance(v, tuple):
        return tuple(t.double() for t in v)
    return v.double()


def _check_conv(B, c_in, c_out, T, k, d=1, s=1, groups=1, snake=False, residual=False, state=False,
                dtype=torch.float32, packed=True):
    x = torch.randn(B, c_in, T, device=DEVICE).to(dtype)
    w = (torch.randn(c_out, c_in // groups, k, device=DEVICE) * (1.0 / (c_in // groups * k)) ** 0.5).to(dtype)
    if packed and groups == 1:
        w = omni_fast.models.code2wav.pack_conv1d_weight(w)
    b = torch.randn(c_out, device=DEVICE).to(dtype)
    kw = dict(stride=s, dilation=d, groups=groups)
    kw["snake"] = _snake_params(c_in, dtype) if snake else None
    kw["residual"] = torch.randn(B, c_out, -(-T // s), device=DEVICE).to(dtype) if residual else None
    kw["state"] = torch.randn(B, c_in, (k - 1) * d, device=DEVICE).to(dtype) if state else None
    y, st = omni_fast.ops.causal_conv1d(x, w, b, backend="triton", **kw)
    exact, st_exact = ref.causal_conv1d(x.double(), w.double(), b.double(), **{a: _dbl(v) for a, v in kw.items()})
    same, _ = ref.causal_conv1d(x, w, b, **kw)
    assert_matches_reference(y, exact, same, name="y")
    assert st.shape == st_exact.shape and torch.equal(st.double(), st_exact)


def _check_convt(B, c_in, c_out, T, s, m=2, snake=False, state=False, dtype=torch.float32):
    x = torch.randn(B, c_in, T, device=DEVICE).to(dtype)
    w = (torch.randn(c_in, c_out, m * s, device=DEVICE) * (1.0 / c_in) ** 0.5).to(dtype)
    w = omni_fast.models.code2wav.pack_conv_transpose1d_weight(w)
    b = torch.randn(c_out, device=DEVICE).to(dtype)
    kw = dict(stride=s, snake=_snake_params(c_in, dtype) if snake else None,
              state=torch.randn(B, c_in, m - 1, device=DEVICE).to(dtype) if state else None)
    y, st = omni_fast.ops.causal_conv_transpose1d(x, w, b, backend="triton", **kw)
    exact, st_exact = ref.causal_conv_transpose1d(x.double(), w.double(), b.double(),
                                                  **{a: _dbl(v) if a != "stride" else v for a, v in kw.items()})
    same, _ = ref.causal_conv_transpose1d(x, w, b, **kw)
    assert_matches_reference(y, exact, same, name="y")
    assert st.shape == st_exact.shape and torch.equal(st.double(), st_exact)


def _models(layout=0, **over):
    hf = _hf_model(layout, **over)
    return hf, omni_fast.models.Code2Wav.from_transformers(hf, backend="reference")


def _pre_transformer_reference(hf, emb, dtype):
    """transformers' pre-transformer, computed by ``reference.code2wav`` in ``dtype`` (one shot, explicit mask)."""
    cfg = ref.Code2WavConfig.from_transformers(hf.config)
    sd = {k: v.to(dtype) for k, v in hf.state_dict().items()}
    h = emb.to(dtype)
    pos = torch.arange(h.shape[1], device=h.device)
    cos, sin = ref.rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, dtype)
    mask = ref.sliding_window_mask(pos, pos, cfg.sliding_window, dtype)
    for i in range(cfg.num_hidden_layers):
        h, _ = ref.pre_transformer_layer(cfg, sd, f"pre_transformer.layers.{i}.", h, cos, sin, mask)
    return ref._rms_norm(h, sd["pre_transformer.norm.weight"], cfg.rms_norm_eps)


def _pre_transformer_streamed(model, emb, sizes):
    """The model's pre-transformer over ``emb`` [B, T, H] pushed in chunks of ``sizes`` frames (one stream)."""
    s = model.stream(emb.shape[0])
    out, i = [], 0
    for n in sizes:
        out.append(s._pre_transformer(emb[:, i:i + n].clone()))  # it overwrites its input (the residual stream)
        s.state.pos += n
        s.state.frames += n
        i += n
    return torch.cat(out, 1)


# one shot, then chunks shorter than, equal to and longer than the window (72), from both ends
ONE_SHOT, UP, DOWN = [153], [1, 7, 72, 73], [73, 72, 7, 1]

def _stream(model, codes, sizes):
    s = model.stream(codes.shape[0], cuda_graphs=False)  # eager (on CUDA graphs are the default)
    out, i = [], 0
    for n in sizes:
        w = s.push(codes[..., i:i + n])
        assert w.shape[-1] == model.num_samples(i + n) - model.num_samples(i)  # every final sample, no more
        out.append(w)
        i += n
    out.append(s.finish())
    return torch.cat(out, -1)


def _run_with_resets(model, codes, schedule, stream=None):
    """Push ``codes [B, G, T]`` in chunks; ``schedule`` = [(frames, rows reset before the push)]. Returns the
    streamed wav [B, 1, n] and, per row, the (first frame, first sample) of each utterance it decoded."""
    B = codes.shape[0]
    s = stream or model.stream(B, cuda_graphs=False)
    outs, starts, i, n = [], [[(0, 0)] for _ in range(B)], 0, 0
    for frames, rows in schedule:
        if rows:
            s.reset(rows)
            for r in rows:
                starts[r].append((i, n + s.lead_samples))
        w = s.push(codes[..., i:i + frames])
        assert w.shape[-1] == model.num_samples(i + frames) - model.num_samples(i)  # the same for every row
        for r in rows:  # a reset row's first push starts with its lead, zeros
            assert not w[r, :, :s.lead_samples].any()
        outs.append(w)
        i += frames
        n += w.shape[-1]
    return torch.cat(outs, -1), starts


def _check_utterances(model, codes, wav, starts, **tol):
    T = codes.shape[-1]
    for b, utts in enumerate(starts):
        for u, (f0, s0) in enumerate(utts):
            f1 = utts[u + 1][0] if u + 1 < len(utts) else T
            alone = model(codes[b:b + 1, :, f0:f1])
            got = wav[b:b + 1, :, s0:s0 + alone.shape[-1]]
            torch.testing.assert_close(got, alone, **tol, msg=lambda m: f"row {b} utterance {u}: {m}")


