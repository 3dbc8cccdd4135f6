"""Qwen2.5-Omni Token2Wav benchmark cases (``python -m omni_fast.bench token2wav``): the real DiT / BigVGAN configs
with random fp32 weights (transformers runs Token2Wav in fp32), transformers side by side with omni-fast.

- ``dit step``: one DiT forward (the CFG batch, 2B rows) at a mel length: transformers' ``forward`` (its ``[S, S]``
  mask through SDPA, the speaker encoder re-run on the reference mel) vs omni-fast's step
  (:func:`omni_fast.models.dit_solve._dit_forward` on the step invariants, block attention in one launch per layer);
- ``dit solve``: the whole ODE solve (10 time points, 36 DiT forwards; smoke: 2 points): transformers' ``sample`` vs
  :func:`omni_fast.models.dit_solve.sample` (one CUDA-graph replay on CUDA);
- ``bigvgan``: the vocoder on a mel: transformers vs its AMP blocks / anti-aliased activations on omni-fast ops.

``flops``: the useful multiply-adds x 2 (the DiT's matmuls per token and its block-local attention; BigVGAN's
convolutions); ``bytes``: the weights read once plus the activations in and out (fp32).
"""

from __future__ import annotations

import functools
import types

import torch

from omni_fast.bench.case import Case

SAMPLE_RATE = 24000  # BigVGAN output
HOP = 240  # samples per mel frame (the upsample rates' product)
STEPS = 10  # transformers' default num_steps
# per preset: (batch, codec tokens) of the DiT cases, mel frames of the BigVGAN case
# (smoke: 2 time points, one RK4 step, and 2 mel frames keep the interpreter run short)
PRESETS = {"quick": dict(tiny=False, steps=STEPS, dit=((1, 250),), vocoder=(500,)),
           "full": dict(tiny=False, steps=STEPS, dit=((1, 100), (1, 250), (4, 250)), vocoder=(200, 500, 1000)),
           "smoke": dict(tiny=True, steps=2, dit=((1, 3),), vocoder=(2,))}


def _configs(tiny: bool):
    from omni_fast.models.presets import tiny_qwen2_5_omni_config
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import (Qwen2_5OmniBigVGANConfig,
                                                                             Qwen2_5OmniDiTConfig)

    if tiny:  # the tiny DiT of the presets; a 2-stage BigVGAN with one AMP block (the interpreter run stays short)
        t2w = tiny_qwen2_5_omni_config().token2wav_config
        return t2w.dit_config, Qwen2_5OmniBigVGANConfig(
            mel_dim=t2w.bigvgan_config.mel_dim, upsample_initial_channel=16, resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3, 5]], upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4])
    return Qwen2_5OmniDiTConfig(), Qwen2_5OmniBigVGANConfig()


@functools.lru_cache(maxsize=2)
def _models(device_str: str, tiny: bool):
    """(DiT, BigVGAN, BigVGAN with the omni-fast swaps), random fp32 weights on the device."""
    import copy

    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25

    dit_cfg, voc_cfg = _configs(tiny)
    torch.manual_seed(0)
    dit = q25.Qwen2_5OmniToken2WavDiTModel._from_config(dit_cfg, dtype=torch.float32, attn_implementation="sdpa")
    voc = q25.Qwen2_5OmniToken2WavBigVGANModel._from_config(voc_cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in [*dit.named_parameters(), *voc.named_parameters()]:
            if "norm" not in name:
                p.normal_(0, 0.05 if p.dim() < 2 else 1.0 / max(p[0].numel(), 1) ** 0.5)
    dit, voc = dit.eval().to(device_str), voc.eval().to(device_str)
    fast = copy.deepcopy(voc)
    _swap_bigvgan(fast)
    return dit, voc, fast


def _swap_bigvgan(voc) -> None:
    """What ``omni_fast.patch`` swaps into a BigVGAN (integrations.token2wav), on a bare vocoder module."""
    from omni_fast.integrations import token2wav as t2w

    for m in voc.modules():
        fn = {t2w.AA_ACTIVATION: t2w.aa_activation_forward, t2w.AMP_BLOCK: t2w.amp_block_forward}.get(type(m).__name__)
        if fn is not None:
            m.__dict__["_omni_fast_forward"] = types.MethodType(type(m).forward, m)
            object.__setattr__(m, "forward", types.MethodType(fn, m))


def _dit_inputs(dit, batch, codes, device):
    g = torch.Generator().manual_seed(1)
    code = torch.randint(0, dit.config.num_embeds, (batch, codes), generator=g).to(device)
    cond = torch.randn(batch, dit.config.enc_emb_dim, generator=g).to(device)
    ref = torch.randn(batch, 300 if codes > 50 else 9, dit.mel_dim, generator=g).to(device)
    return code, cond, ref


def _dit_step_case(batch: int, codes: int, tiny: bool) -> Case:
    def setup(device):
        from omni_fast.models import dit_solve

        dit, _, _ = _models(str(device), tiny)
        code, cond, ref = _dit_inputs(dit, batch, codes, device)
        L = codes * dit.repeats
        x = torch.randn(batch, L, dit.mel_dim, device=device)
        t = torch.tensor(0.3, device=device)
        with torch.no_grad():
            spk = dit.input_embed.spk_encoder(torch.cat([ref, torch.zeros_like(ref)]))
            lens = torch.full((batch,), L, dtype=torch.int32, device=device)
            static = dit_solve._invariants(dit, code, cond, spk, lens, 0.5)
        cond_rep = cond.unsqueeze(1).repeat(1, L, 1)

        def hf():
            with torch.no_grad():
                return dit(hidden_states=x, condition_vector=ref, speaker_embedding=cond_rep, quantized_code=code,
                           time_step=t, apply_cfg=True)

        def omni():
            with torch.no_grad():
                return dit_solve._dit_forward(dit, x, t, static, None)

        return {"transformers": hf, "omni_fast": omni}

    cfg = _configs(tiny)[0]
    rows, L = 2 * batch, codes * cfg.repeats
    flops, weight_bytes = _dit_costs(cfg, rows, L)
    return Case(op="token2wav", name=f"dit step B={batch} codes={codes}",
                params=dict(mode="dit_step", batch=batch, codes=codes, mel_frames=L), setup=setup, flops=flops,
                bytes=weight_bytes + 4.0 * rows * L * (cfg.mel_dim * 2), bound="auto", tags=("dit",),
                units={"code": batch * codes})


def _dit_solve_case(batch: int, codes: int, tiny: bool, steps: int = STEPS) -> Case:
    def setup(device):
        from omni_fast.models import dit_solve

        dit, _, _ = _models(str(device), tiny)
        code, cond, ref = _dit_inputs(dit, batch, codes, device)
        def omni():
            with torch.no_grad():  # (transformers' sample is @torch.no_grad)
                return dit_solve.sample(dit, cond, ref, code, num_steps=steps)

        return {"transformers": lambda: dit.sample(cond, ref, code, num_steps=steps), "omni_fast": omni}

    cfg = _configs(tiny)[0]
    L = codes * cfg.repeats
    flops, weight_bytes = _dit_costs(cfg, 2 * batch, L)
    evals = 4 * (steps - 1)
    return Case(op="token2wav", name=f"dit solve B={batch} codes={codes} steps={steps}",
                params=dict(mode="dit_solve", batch=batch, codes=codes, mel_frames=L, steps=steps), setup=setup,
                flops=flops * evals, bytes=weight_bytes * evals, bound="auto", tags=("dit",),
                units={"code": batch * codes, "audio_s": batch * L * HOP / SAMPLE_RATE})


def _dit_costs(cfg, rows: int, L: int) -> tuple[float, float]:
    """(FLOPs, fp32 weight bytes) of one DiT forward over ``rows`` sequences of ``L`` frames (transformer blocks,
    input / output projections, the block-local attention: at most 3 blocks of keys per query)."""
    dim, inner = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    ff = int(dim * cfg.ff_mult)
    per_layer = 4 * dim * inner + 2 * dim * ff
    io = (cfg.mel_dim + cfg.enc_dim + cfg.enc_emb_dim + cfg.emb_dim) * dim + dim * cfg.mel_dim
    keys = min(L, 3 * cfg.block_size)
    macs = rows * L * (cfg.num_hidden_layers * (per_layer + 2 * keys * inner) + io)
    weights = cfg.num_hidden_layers * (per_layer + 6 * dim * dim) + io + 2 * dim * dim
    return 2.0 * macs, 4.0 * weights


def _bigvgan_macs(cfg, frames: int) -> tuple[float, float]:
    """(MACs, weight count) of BigVGAN on ``frames`` mel frames: conv_pre, each transposed conv, the AMP blocks'
    conv pairs (3 kernels x 3 dilations x 2 convs per stage), conv_post."""
    C, T = cfg.upsample_initial_channel, frames
    macs = weights = cfg.mel_dim * C * 7
    macs *= T
    for r, k in zip(cfg.upsample_rates, cfg.upsample_kernel_sizes):
        w = C * (C // 2) * k
        macs, weights = macs + T * w, weights + w
        C, T = C // 2, T * r
        amp = sum(2 * len(d) * C * C * ks for ks, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        macs, weights = macs + T * amp, weights + amp
    return macs + T * C * 7, weights + C * 7


def _bigvgan_case(frames: int, tiny: bool) -> Case:
    def setup(device):
        _, voc, fast = _models(str(device), tiny)
        g = torch.Generator().manual_seed(2)
        mel = torch.randn(1, voc.config.mel_dim, frames, generator=g).to(device)

        def run(m):
            def call():
                with torch.no_grad():
                    return m(mel)
            return call

        return {"transformers": run(voc), "omni_fast": run(fast)}

    cfg = _configs(tiny)[1]
    macs, weights = _bigvgan_macs(cfg, frames)
    hop = 1
    for r in cfg.upsample_rates:
        hop *= r
    return Case(op="token2wav", name=f"bigvgan frames={frames}", params=dict(mode="bigvgan", frames=frames),
                setup=setup, flops=2.0 * macs, bytes=4.0 * (weights + frames * cfg.mel_dim + frames * hop),
                bound="compute", tags=("bigvgan",), units={"audio_s": frames * hop / SAMPLE_RATE})


def cases(preset: str = "quick") -> list[Case]:
    """The DiT step, DiT solve and BigVGAN benchmark cases (module doc) at ``preset``'s sizes (fp32, real configs;
    smoke: tiny)."""
    p = PRESETS[preset]
    out = [_dit_step_case(b, n, p["tiny"]) for b, n in p["dit"]]
    out += [_dit_solve_case(b, n, p["tiny"], p["steps"]) for b, n in p["dit"]]
    out += [_bigvgan_case(f, p["tiny"]) for f in p["vocoder"]]
    return out
