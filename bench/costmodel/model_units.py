"""Whole-model units of the cost model: thinker / talker decode steps, the MTP frame and Code2Wav streaming pushes.

Launches are counted on tiny configs with the real layer counts and structure (48 thinker layers, 20 talker
layers, 5 MTP layers with 16 code groups, Code2Wav's 8 pre-transformer layers, 2 upsamplers and 4 decoder blocks);
widths do not change how many kernels run. Bytes are not traced here (a real-width step needs tens of GB of
weights on the CPU); the model uses the analytic minimum (weights read once, KV cache read once).
"""

from __future__ import annotations

import math
import types

import torch

from .units import Unit

THINKER = dict(H=2048, L=48, nq=32, nk=4, d=128, E=128, k=8, I=768, Is=0, V=152064)
TALKER = dict(H=1024, L=20, nq=16, nk=2, d=128, E=128, k=6, I=384, Is=768, V=3072)
CACHE = 4096  # KV tokens each decode step attends to (the "cache 4k")


def step_min(p: dict, B: int, cache: int = CACHE) -> tuple[float, float]:
    """(bytes, FLOPs) of one decode step at bf16: weights (attention, router, the experts B tokens touch in
    expectation, shared expert, head) + the KV cache read once."""
    H, L, nq, nk, d, E, k, I, Is, V = (p[x] for x in ("H", "L", "nq", "nk", "d", "E", "k", "I", "Is", "V"))
    attn = (nq + 2 * nk) * d * H + nq * d * H
    touched = E * (1 - (1 - k / E) ** B)
    read = L * (attn + E * H + touched * 3 * I * H + 3 * Is * H + (H if Is else 0)) + V * H
    active = L * (attn + E * H + k * 3 * I * H + 3 * Is * H) + V * H
    kv = L * 2 * nk * d * cache * B
    return 2.0 * (read + kv), 2.0 * B * active + 4.0 * B * L * nq * d * cache


def _step_call(part: str, B: int, layers: int | None = None, fused: bool = False):
    """One tiny decode step (the real layer count unless ``layers``: tests compare counts on fewer); ``fused``:
    issue 16's phase-fused step (``MoeTextDecoder(fused=True)``, opt-in: three launches per layer)."""
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3

    from omni_fast.bench.cases.decode import _prefill
    from omni_fast.models import MoeTextDecoder
    from omni_fast.models.presets import tiny_qwen3_omni_config
    from omni_fast.testing import randomize_

    cfg = tiny_qwen3_omni_config(layers=layers or THINKER["L"])
    if part == "thinker":
        text, cls = cfg.thinker_config.text_config, q3.Qwen3OmniMoeThinkerTextModel
    else:
        text, cls = cfg.talker_config.text_config, q3.Qwen3OmniMoeTalkerModel
        text.num_hidden_layers = layers or TALKER["L"]
    torch.manual_seed(0)
    m = cls._from_config(text, dtype=torch.float32).eval()
    head = torch.nn.Linear(text.hidden_size, text.vocab_size, bias=False)
    randomize_(m, head)
    cache, mask, nxt = _prefill(m, B, 6)
    dec = MoeTextDecoder.from_transformers(m, head, backend="triton", fused=fused)
    # a cache of the real capacity (CACHE tokens): split-KV decode attention (as on an H100) depends on it
    dec.load_prefill(cache, mask, max_new_tokens=CACHE, use_graph=False)
    x = torch.randn(B, text.hidden_size)

    def step():
        dec.step(x, nxt[0])
        dec.rewind(1)

    return step


def _mtp_call(B: int, layers: int = 5, groups: int = 16, persistent: bool = False):
    """The tiny MTP frame (the real 5 layers and 16 code groups unless given: tests compare counts on fewer);
    ``persistent``: issue 16's one-launch frame (``CodePredictor(persistent=True)``, opt-in)."""
    from omni_fast.bench.cases.mtp import _build
    from omni_fast.models import CodePredictor

    kw = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, num_code_groups=groups)
    m, emb = _build("cpu", torch.float32, kw)
    cp = CodePredictor.from_transformers(m, emb, persistent=persistent)
    h, c0 = torch.randn(B, 64), torch.randint(0, 64, (B,))
    seed = torch.tensor([1234])
    return lambda: cp.predict_frame(h, c0, top_k=50, top_p=0.8, seed=seed, use_graph=True, backend="triton",
                                    fused=True)


def _code2wav_call(B: int, frames: int, layers: int = 8, warm: int = 30, moves: bool = False):
    """A tiny Code2Wav stream warmed up with ``warm`` frames, then the push of ``frames`` (the real 8 layers unless
    given: tests compare counts on fewer). ``moves``: the stream made with the fast path code2wav_state_moves."""
    from omni_fast import fast_paths
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeCode2WavConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeCode2Wav

    from omni_fast.models import Code2Wav

    # the real structure (8 layers, window 72, ratios 2x2, rates 8,5,4,3, 16 quantizers), tiny widths
    cfg = Qwen3OmniMoeCode2WavConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                                     intermediate_size=48, num_hidden_layers=layers, codebook_size=16,
                                     num_quantizers=16,
                                     decoder_dim=32, sliding_window=72)
    torch.manual_seed(0)
    model = Code2Wav.from_transformers(Qwen3OmniMoeCode2Wav(cfg).eval())
    g = torch.Generator().manual_seed(1)
    warm = torch.randint(0, 16, (B, 16, warm), generator=g)
    nxt = torch.randint(0, 16, (B, 16, frames), generator=g)
    with fast_paths.enable("code2wav_state_moves", moves):  # (read when the stream is made)
        stream = model.stream(B)
    stream.push(warm)
    return lambda: stream.push(nxt)


def _code2wav_min(B: int, frames: int) -> tuple[float, float]:
    from omni_fast.bench.cases.code2wav import _flops_per_frame, _real_weight_bytes
    from omni_fast.reference.code2wav import Code2WavConfig

    cfg = Code2WavConfig()
    return _real_weight_bytes(False) + B * frames * (16 * 8 + 1920 * 2), _flops_per_frame(cfg) * B * frames


def model_units() -> list[Unit]:
    """The whole-model units: the MTP frame (graph and persistent, B 1 / 64), thinker / talker decode steps (plain
    and phase-fused, B 1 / 8) and Code2Wav streaming pushes (B 1 / 32, 1 / 4 frames, plain and state moves)."""
    from omni_fast.bench.cases.mtp import _step_params

    out = []
    for B in (1, 64):
        steps_bytes = 2.0 * 15 * _step_params({})  # 15 steps, each reads the 5 layers + one lm_head
        out.append(Unit(f"mtp-frame-B{B}", "mtp", "graph", launch=lambda B=B: _mtp_call(min(B, 3)), warmup=True,
                        cheap_count=True, min_bytes=steps_bytes, flops=B * steps_bytes, params=dict(B=B)))
        out.append(Unit(f"mtp-frame-persistent-B{B}", "mtp", "graph", warmup=True, cheap_count=True,
                        launch=lambda B=B: _mtp_call(min(B, 3), persistent=True),
                        min_bytes=steps_bytes, flops=B * steps_bytes, params=dict(B=B, persistent=True)))
    for part, p in (("thinker", THINKER), ("talker", TALKER)):
        for B in (1, 8):
            nbytes, flops = step_min(p, B)
            out.append(Unit(f"{part}-step-B{B}", "step", "graph", launch=lambda part=part, B=B: _step_call(part, B),
                            cheap_count=True, min_bytes=nbytes, flops=flops,
                            params=dict(B=B, layers=p["L"], cache=CACHE)))
            # issue 16's phase-fused step (opt-in fast path fused_step), the thinker's too (its stretch goal: the
            # same kernels without the shared expert)
            out.append(Unit(f"{part}-step-fused-B{B}", "step", "graph", cheap_count=True,
                            launch=lambda part=part, B=B: _step_call(part, B, fused=True), min_bytes=nbytes,
                            flops=flops, params=dict(B=B, layers=p["L"], cache=CACHE, fused=True)))
    for B in (1, 32):
        for frames in (1, 4):
            nbytes, flops = _code2wav_min(B, frames)
            # streaming replays CUDA graphs by default on CUDA (Code2WavStream, cuda_graphs=None)
            out.append(Unit(f"code2wav-push-B{B}-F{frames}", "code2wav", "graph",
                            launch=lambda B=B, f=frames: _code2wav_call(min(B, 2), f), cheap_count=True,
                            min_bytes=nbytes, flops=flops, params=dict(B=B, frames=frames)))
            # the opt-in fast path code2wav_state_moves (conv states moved 8 per launch)
            out.append(Unit(f"code2wav-push-moves-B{B}-F{frames}", "code2wav", "graph",
                            launch=lambda B=B, f=frames: _code2wav_call(min(B, 2), f, moves=True), cheap_count=True,
                            min_bytes=nbytes, flops=flops, params=dict(B=B, frames=frames, moves=True)))
    return out


def all_units() -> list[Unit]:
    """Every unit the cost model reports, in report order (MoE, quantized MoE, attention, small ops, whole-model,
    Token2Wav)."""
    from .units import attention_units, moe_units, quant_moe_units, small_units

    return (moe_units() + quant_moe_units() + attention_units() + small_units() + model_units()
            + token2wav_units())


# --- Qwen2.5-Omni Token2Wav (issue 19) -----------------------------------------------------------------------------

DIT_CODES = 250  # codec tokens of one solve (500 mel frames, 5 s of audio): the bench's quick case
AMP = dict(C=768, T=2500, k=3)  # BigVGAN's first AMP block (after the first x5 upsampler) on 500 mel frames


def _dit_step_call():
    """One DiT forward of the graph-captured solve (CFG batch 2 rows), tiny widths, the real 22 layers and their
    look-ahead / look-back pattern; 7 codes -> 14 mel frames, padded as the solve's bucket is to whole attention
    blocks (16 frames = two blocks of 8, lens 14). The step invariants (code embeddings, RoPE, the fused weights,
    the attention plans) are built once per solve, outside the counted call."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniDiTConfig

    from omni_fast.models import dit_solve

    real = Qwen2_5OmniDiTConfig()
    cfg = Qwen2_5OmniDiTConfig(hidden_size=32, num_hidden_layers=real.num_hidden_layers, num_attention_heads=2,
                               head_dim=16, emb_dim=16, enc_emb_dim=16, enc_dim=16, enc_channels=[16, 16, 16, 16, 48],
                               enc_attention_channels=8, enc_se_channels=8, num_embeds=300, block_size=8,
                               look_ahead_layers=real.look_ahead_layers, look_backward_layers=real.look_backward_layers)
    torch.manual_seed(0)
    dit = q25.Qwen2_5OmniToken2WavDiTModel._from_config(cfg, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    codes = dit_solve._page_aligned(7, dit)
    code = torch.randint(0, 300, (1, codes), generator=g)
    x = torch.randn(1, codes * cfg.repeats, cfg.mel_dim, generator=g)
    with torch.no_grad():
        spk = torch.randn(2, cfg.enc_dim, generator=g)
        static = dit_solve._invariants(dit, code, torch.randn(1, cfg.enc_emb_dim, generator=g), spk,
                                       torch.tensor([14], dtype=torch.int32), 0.5)
    t = torch.tensor(0.3)

    def call():
        with torch.no_grad():
            return dit_solve._dit_forward(dit, x, t, static, None)
    return call


def _amp_block_call():
    """One BigVGAN AMP block (3 dilations x (activation, conv, activation, conv + residual)) with the omni-fast
    swaps (integrations.token2wav), tiny channels."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25

    from omni_fast.bench.cases.token2wav import _swap_bigvgan

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.block = q25.Qwen2_5OmniAMPBlock(8, AMP["k"], (1, 3, 5)).eval()
    _swap_bigvgan(holder)
    x = torch.randn(1, 8, 20, generator=torch.Generator().manual_seed(1))

    def call():
        with torch.no_grad():
            return holder.block(x)
    return call


VOCODER_FRAMES = 500  # BigVGAN on the DiT unit's mel (250 codes, 5 s of audio)


def _vocoder_call(padded: bool):
    """The whole BigVGAN (the real 6 upsamplers x 3 AMP blocks x 3 dilations, tiny channels, x2 upsamplers) with
    the omni-fast swaps: eager on the real mel (1 frame; the pipeline's Token2Wav), or
    :func:`omni_fast.models.bigvgan_padded.vocode` on a 2-frame bucket holding 1 real frame (the routed forward's
    graph, ``dit_solve.synthesize``)."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniBigVGANConfig

    from omni_fast.bench.cases.token2wav import _swap_bigvgan
    from omni_fast.models import bigvgan_padded

    cfg = Qwen2_5OmniBigVGANConfig(upsample_initial_channel=64, upsample_rates=[2] * 6, upsample_kernel_sizes=[4] * 6)
    torch.manual_seed(0)
    voc = q25.Qwen2_5OmniToken2WavBigVGANModel._from_config(cfg, dtype=torch.float32).eval()
    _swap_bigvgan(voc)
    mel = torch.randn(1, cfg.mel_dim, 1 + padded, generator=torch.Generator().manual_seed(1))
    lens = torch.tensor([1], dtype=torch.int32)

    def call():
        with torch.no_grad():
            return bigvgan_padded.vocode(voc, mel, lens) if padded else voc(mel)
    return call


def _vocoder_units() -> list[Unit]:
    """BigVGAN after the DiT solve, ``VOCODER_FRAMES`` real mel frames: eager on exactly those (the pipeline's
    Token2Wav: 20 us of host per Triton launch, hidden behind the GPU once the mel is long enough), and inside the
    solve's graph on its padded bucket (the routed forward: 250 codes -> the 264-code bucket, 528 frames)."""
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import (Qwen2_5OmniBigVGANConfig,
                                                                             Qwen2_5OmniDiTConfig)

    from omni_fast.bench.cases.token2wav import _bigvgan_macs
    from omni_fast.models import dit_solve

    cfg, dit = Qwen2_5OmniBigVGANConfig(), Qwen2_5OmniDiTConfig()
    hop = math.prod(cfg.upsample_rates)
    L = VOCODER_FRAMES
    S = dit.repeats * dit_solve._page_aligned(dit_solve.bucket_for(L // dit.repeats),
                                              types.SimpleNamespace(block_size=dit.block_size, repeats=dit.repeats))
    out = []
    for name, mode, frames in ((f"bigvgan-T{L}", "eager", L), (f"bigvgan-padded-T{L}-S{S}", "graph", S)):
        macs, weights = _bigvgan_macs(cfg, frames)
        out.append(Unit(name, "token2wav", mode, launch=lambda p=mode == "graph": _vocoder_call(p), cheap_count=True,
                        min_bytes=4.0 * (weights + frames * cfg.mel_dim + frames * hop), flops=2.0 * macs,
                        math="fp32", params=dict(frames=L, computed_frames=frames)))
    return out


def token2wav_units() -> list[Unit]:
    """Qwen2.5-Omni Token2Wav units (fp32, as transformers runs it): a DiT step (IEEE fp32 and the ``dit_tf32``
    fast path), one BigVGAN AMP block, and the vocoder eager / in a graph on a padded bucket."""
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniDiTConfig

    from omni_fast.bench.cases.token2wav import _dit_costs

    cfg = Qwen2_5OmniDiTConfig()
    L = DIT_CODES * cfg.repeats
    flops, weights = _dit_costs(cfg, 2, L)
    C, T, k = AMP["C"], AMP["T"], AMP["k"]
    amp_w = 6 * (C * C * k + C)  # 6 convs (fp32)
    dit = dict(launch=_dit_step_call, cheap_count=True, min_bytes=weights + 4.0 * 2 * L * cfg.mel_dim * 2,
               flops=flops, params=dict(codes=DIT_CODES, mel_frames=L, rows=2, layers=cfg.num_hidden_layers))
    # transformers' fp32 (IEEE: the FMA units), and the opt-in fast path dit_tf32 (cuBLAS GEMMs as TF32)
    return [Unit(f"dit-step-T{L}", "token2wav", "graph", math="fp32", **dit),
            Unit(f"dit-step-tf32-T{L}", "token2wav", "graph", math="tf32", **dit),
            Unit(f"bigvgan-amp-block-C{C}-T{T}", "token2wav", "eager", launch=_amp_block_call, cheap_count=True,
                 min_bytes=4.0 * (amp_w + 2 * C * T), flops=2.0 * 6 * C * C * k * T, math="fp32",
                 params=dict(AMP))] + _vocoder_units()
