"""Code2Wav benchmark cases (``python -m omni_fast.bench code2wav``): the real config with random bf16 weights.

- streaming latency per chunk at batch 1, chunks of 1, 10 and 25 frames (and chunk 10 at batch 32: streamed serving
  throughput): transformers' module re-decoding 25 frames
  of left context per chunk (what serving stacks do), torch.compile of the reference doing the same, and omni-fast's
  stateful stream (no recomputed context);
- throughput at batch 8, 32 and 64 (10 s of audio per stream, one-shot);
- one-shot decode of 30 s at batch 1, including transformers' ``chunked_decode`` (chunk 300, left context 25);
- the pre-transformer alone per push (8 layers, window 72, caches full): omni-fast's stream stage (attention,
  RoPE, norms on omni-fast ops) vs transformers' ``pre_transformer`` re-encoding 25 frames of left context.

Every case declares ``units`` (codes = batch x frames per call, and their audio seconds; the pre-transformer cases
codes only), so the report gives ms per code = time / (batch * frames), RTF = time / audio seconds and audio seconds
per second next to % of roofline. ``flops`` counts the useful multiply-adds of the
new frames only (re-decoded context is waste), ``bytes`` the weights read once plus codes in and audio out.
"""

from __future__ import annotations

import functools

import torch

from omni_fast.bench.case import Case, Unavailable
from omni_fast.bench.cases._compile import compiled

FRAME_RATE = 12.5  # codes per second
LEFT_CONTEXT = 25  # frames serving stacks re-decode per chunk
# Per preset: the model (real config in bf16, or the tiny one of the CPU check in fp32), frames pushed before a
# streaming / pre-transformer case (more than the sliding window, so the KV caches are full, as mid-utterance),
# streaming and pre-transformer (chunk, batch) pairs (batch 32: serving throughput while streaming) and one-shot
# (batch, seconds, chunked?) decodes.
PRESETS = {
    "quick": dict(tiny=False, warm=80, stream=((10, 1),), pre=((10, 1),),
                  oneshot=((8, 10.0, False), (1, 30.0, True))),
    "full": dict(tiny=False, warm=80, stream=((1, 1), (10, 1), (25, 1), (10, 32)),
                 pre=((1, 1), (10, 1), (25, 1), (10, 32)),
                 oneshot=((8, 10.0, False), (32, 10.0, False), (64, 10.0, False), (1, 30.0, True))),
    "smoke": dict(tiny=True, warm=8, stream=((2, 1),), pre=((2, 1),), oneshot=((2, 0.8, False), (1, 2.4, True))),
}


def _hf_config(tiny: bool = False):
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeCode2WavConfig

    if tiny:
        return Qwen3OmniMoeCode2WavConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                                          intermediate_size=48, num_hidden_layers=1, codebook_size=16,
                                          num_quantizers=4, decoder_dim=32, sliding_window=5,
                                          upsampling_ratios=[2], upsample_rates=[2, 3])
    return Qwen3OmniMoeCode2WavConfig()  # the checkpoint's code2wav config is the class default


@functools.lru_cache(maxsize=2)
def _models(device_str: str, tiny: bool = False):
    """(transformers module, omni-fast Code2Wav, reference config, state dict), random weights, bf16 on device."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeCode2Wav

    from omni_fast.models import Code2Wav
    from omni_fast.reference.code2wav import Code2WavConfig

    torch.manual_seed(0)
    dtype = torch.float32 if tiny else torch.bfloat16
    hf = Qwen3OmniMoeCode2Wav(_hf_config(tiny)).eval()
    with torch.no_grad():  # non-trivial SnakeBeta / LayerScale / gamma values
        for name, p in hf.named_parameters():
            if name.endswith(("alpha", "beta")):
                p.uniform_(-0.5, 0.5)
            elif name.endswith(("gamma", "layer_scale.scale")):
                p.uniform_(0.05, 0.2)
            elif tiny and p.dim() > 1:  # fan-in scaled weights: a signal of order 0.1-1 reaches the output
                fan = p.shape[1] * (p.shape[2] if p.dim() == 3 else 1)
                p.normal_(0, 1.2 / fan ** 0.5)
        if tiny:
            hf.decoder[-1].conv.weight.mul_(0.02)
    hf = hf.to(device=device_str, dtype=dtype)
    model = Code2Wav.from_transformers(hf)
    return hf, model, Code2WavConfig.from_transformers(hf.config), dict(hf.state_dict())


def _pre_transformer_macs_per_frame(cfg) -> tuple[float, float]:
    """(weight MACs, attention MACs) of one new frame through the pre-transformer."""
    H, D = cfg.hidden_size, cfg.head_dim
    hq, hk = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    weights = H * (2 * hq + 2 * hk) + 3 * H * cfg.intermediate_size
    return cfg.num_hidden_layers * weights, cfg.num_hidden_layers * 2 * cfg.sliding_window * hq


def _flops_per_frame(cfg) -> float:
    """Useful FLOPs (2 x MACs) to decode one new frame (weights x samples per frame, attention over the window)."""
    H = cfg.hidden_size
    macs = sum(_pre_transformer_macs_per_frame(cfg))
    n = 1.0
    for f in cfg.upsampling_ratios:
        n *= f
        macs += n * (H * H + 7 * H + 8 * H * H)  # transposed conv (k = s: H*H per sample), dwconv, pointwise MLP
    dim = cfg.decoder_dim
    macs += n * dim * H * 7
    for r in cfg.upsample_rates:
        out = dim // 2
        n *= r
        macs += n * 2 * dim * out + n * 3 * (out * out * 7 + out * out)
        dim = out
    macs += n * dim * 7
    return 2.0 * macs


def _units(codes: int) -> dict:
    """``Case.units`` of a call decoding ``codes`` frames in all (batch x frames per stream): ms per code, and the
    audio they make (1920 samples at 24 kHz = 80 ms per code) for the RTF and audio seconds per second."""
    return {"code": codes, "audio_s": codes / FRAME_RATE}


def _streaming_case(chunk: int, batch: int = 1, tiny: bool = False, frames_warm: int = 80) -> Case:
    def setup(device):
        from omni_fast.reference.code2wav import code2wav_forward

        hf, model, cfg, sd = _models(str(device), tiny)
        g = torch.Generator(device="cpu").manual_seed(1)
        warm = torch.randint(0, cfg.codebook_size, (batch, cfg.num_quantizers, frames_warm), generator=g).to(device)
        nxt = torch.randint(0, cfg.codebook_size, (batch, cfg.num_quantizers, chunk), generator=g).to(device)
        with_ctx = torch.cat((warm[..., -LEFT_CONTEXT:], nxt), dim=-1)
        stream = model.stream(batch, cuda_graphs=False)  # eager (graphs are the default on CUDA)
        stream.push(warm)
        providers = {"omni_fast": lambda: stream.push(nxt)}
        if device.type == "cuda":
            graphed = model.stream(batch, cuda_graphs=True, graph_buckets=(chunk,))
            graphed.push(warm[..., :1])  # the first push creates the states; later pushes replay the graph
            graphed.push(warm[..., 1:])
            providers["omni_fast_graphs"] = lambda: graphed.push(nxt)
        else:
            providers["omni_fast_graphs"] = Unavailable("CUDA graphs need CUDA")
        forward = compiled(functools.partial(code2wav_forward, cfg, sd), device, dynamic=None)

        def hf_chunk():
            with torch.no_grad():
                return hf(with_ctx)[..., LEFT_CONTEXT * cfg.total_upsample:]

        def compiled_chunk():
            with torch.no_grad():
                return forward(with_ctx)[..., LEFT_CONTEXT * cfg.total_upsample:]

        return {"transformers": hf_chunk, "compile": compiled_chunk, **providers}

    cfg = _ref_config(tiny)
    return Case(op="code2wav", name=f"stream chunk={chunk} B={batch}",
                params=dict(mode="stream", chunk=chunk, batch=batch, frames=chunk, left_context=LEFT_CONTEXT),
                setup=setup, flops=_flops_per_frame(cfg) * chunk * batch, bytes=_real_weight_bytes(tiny),
                bound="memory" if batch == 1 else "auto", check=_check, tags=("stream",), units=_units(chunk * batch))


def _oneshot_case(batch: int, seconds: float, chunked: bool, tiny: bool = False) -> Case:
    frames = int(round(seconds * FRAME_RATE))

    def setup(device):
        from omni_fast.reference.code2wav import code2wav_forward

        hf, model, cfg, sd = _models(str(device), tiny)
        g = torch.Generator(device="cpu").manual_seed(2)
        codes = torch.randint(0, cfg.codebook_size, (batch, cfg.num_quantizers, frames), generator=g).to(device)
        forward = compiled(functools.partial(code2wav_forward, cfg, sd), device, dynamic=None)

        def run(fn):
            def call():
                with torch.no_grad():
                    return fn(codes)
            return call

        providers = {"transformers": run(hf), "compile": run(forward), "omni_fast": run(model.forward)}
        if chunked:
            providers["transformers_chunked"] = run(hf.chunked_decode)
            providers["omni_fast_chunked"] = run(model.chunked_decode)
        return providers

    cfg = _ref_config(tiny)
    elem = 4.0 if tiny else 2.0
    return Case(op="code2wav", name=f"decode {seconds:g}s B={batch}",
                params=dict(mode="oneshot", batch=batch, frames=frames, audio_seconds=seconds * batch),
                setup=setup, flops=_flops_per_frame(cfg) * frames * batch,
                bytes=_real_weight_bytes(tiny) + batch * frames * (cfg.num_quantizers * 8 + cfg.total_upsample * elem),
                bound="compute", check=_check, tags=("throughput",), units=_units(frames * batch))


def _pre_transformer_case(chunk: int, batch: int, tiny: bool = False, frames_warm: int = 80) -> Case:
    def setup(device):
        hf, model, cfg, _ = _models(str(device), tiny)
        dtype = next(hf.parameters()).dtype
        g = torch.Generator(device="cpu").manual_seed(3)
        warm = torch.randn(batch, frames_warm, cfg.hidden_size, generator=g).to(device, dtype)
        emb = torch.randn(batch, chunk, cfg.hidden_size, generator=g).to(device, dtype)
        with_ctx = torch.cat((warm[:, -LEFT_CONTEXT:], emb), dim=1)
        stream = model.stream(batch, cuda_graphs=False)  # eager (graphs are the default on CUDA)
        with torch.no_grad():  # the stream's pre-transformer stage alone (Code2WavStream._step runs it, then convs)
            stream._pre_transformer(warm)
        stream.state.pos += frames_warm  # later calls all attend to a full window at the same position

        def omni():
            with torch.no_grad():
                return stream._pre_transformer(emb.clone())  # it overwrites its input (the residual stream)

        def hf_chunk():
            with torch.no_grad():
                return hf.pre_transformer(inputs_embeds=with_ctx).last_hidden_state[:, LEFT_CONTEXT:]

        return {"transformers": hf_chunk, "omni_fast": omni}

    cfg = _ref_config(tiny)
    elem = 4.0 if tiny else 2.0
    weight_macs, attn_macs = _pre_transformer_macs_per_frame(cfg)
    kv_bytes = (cfg.num_hidden_layers * batch * 2 * (cfg.sliding_window - 1) * cfg.num_key_value_heads
                * cfg.head_dim * elem)
    return Case(op="code2wav", name=f"pre-transformer chunk={chunk} B={batch}",
                params=dict(mode="pre_transformer", chunk=chunk, batch=batch, frames=chunk,
                            left_context=LEFT_CONTEXT),
                setup=setup, flops=2.0 * (weight_macs + attn_macs) * chunk * batch,
                bytes=elem * weight_macs + kv_bytes, bound="auto", check=_check, tags=("pre_transformer",),
                units={"code": chunk * batch})


@functools.lru_cache(maxsize=2)
def _ref_config(tiny: bool = False):
    from omni_fast.reference.code2wav import Code2WavConfig

    return Code2WavConfig.from_transformers(_hf_config(tiny))


@functools.lru_cache(maxsize=2)
def _real_weight_bytes(tiny: bool = False) -> float:
    """Bytes of every weight but the code embedding (bf16; fp32 for the tiny config), counted from the config
    without building the model."""
    from omni_fast.models.code2wav_weights import _expected_shapes

    cfg = _ref_config(tiny)
    n = 0
    for k, shape in _expected_shapes(cfg).items():
        if k != "code_embedding.weight":
            p = 1
            for s in shape:
                p *= s
            n += p
    return (4.0 if tiny else 2.0) * n


def _check() -> None:
    """CPU / interpreter: omni-fast (triton backend) equals transformers, one-shot and streamed, on a tiny config."""
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("the code2wav check needs a GPU or TRITON_INTERPRET=1")
    hf, _, cfg, _ = _models("cuda" if torch.cuda.is_available() else "cpu", tiny=True)
    from omni_fast.models import Code2Wav

    model = Code2Wav.from_transformers(hf, backend="triton")
    codes = torch.randint(0, cfg.codebook_size, (1, cfg.num_quantizers, 9), device=hf.device)
    with torch.no_grad():
        want = hf(codes)
    assert 0.01 < want.abs().mean() < 0.9, "check signal is degenerate"
    torch.testing.assert_close(model(codes), want, rtol=1e-4, atol=1e-4)
    s = model.stream(1)
    got = torch.cat([s.push(codes[..., :2]), s.push(codes[..., 2:3]), s.push(codes[..., 3:])], dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def cases(preset: str = "quick") -> list[Case]:
    """The benchmark cases of Code2Wav streaming pushes, pre-transformer pushes and one-shot decodes (module doc) at
    ``preset``'s batches / chunks (bf16 real config; smoke: fp32, tiny)."""
    p = PRESETS[preset]
    tiny, warm = p["tiny"], p["warm"]
    out = [_streaming_case(c, b, tiny, warm) for c, b in p["stream"]]
    out += [_pre_transformer_case(c, b, tiny, warm) for c, b in p["pre"]]
    out += [_oneshot_case(b, s, chunked, tiny) for b, s, chunked in p["oneshot"]]
    return out
