"""Qwen2.5-Omni ``Qwen2_5OmniToken2WavModel.forward`` -> :func:`omni_fast.models.dit_solve.synthesize`: the DiT's
whole ODE solve AND the BigVGAN vocoder replayed as ONE CUDA graph per length bucket (on the CPU: the same function
run eagerly on the bucket's buffers, as ``synthesize`` does).

:func:`omni_fast.patch` swaps it in (with the Token2Wav pieces of :mod:`omni_fast.integrations.token2wav`) when the
opt-in fast path ``token2wav`` is on. The swapped forward keeps transformers' signature, defaults (``num_steps=10,
guidance_scale=0.5, sway_coefficient=-1.0``, extra keywords ignored), noise (the same ``torch.randn`` call: a seed
gives transformers' noise) and return value (the clamped waveform ``.squeeze().cpu()``: ``[n * repeats * 240]`` for
one row, ``[B, ...]`` for several). A call the graph does not cover (:func:`refusal`) runs transformers' forward,
which reaches the swapped DiT ``sample`` graph and the BigVGAN pieces.

Length buckets: ``dit_solve.CODE_BUCKETS`` (rounded up to whole attention blocks), or what
:func:`set_code_buckets` set on the patched module (smaller buckets pad less; each bucket is one graph).
"""

from __future__ import annotations

import numbers

import torch

from ..backend import pinned_backend
from ..validation import records_grad
from .patch_parts import count_line

CLASS = "Qwen2_5OmniToken2WavModel"
BUCKETS_ATTR = "_omni_fast_code_buckets"  # on the patched Token2Wav: its bucket policy (unpatch removes it)
FALLBACK_ATTR = "_omni_fast_token2wav_fallback"  # the last call's refusal (None: it ran on synthesize)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def set_code_buckets(token2wav, buckets) -> None:
    """The length buckets (codec tokens per solve, any positive ints) the patched ``token2wav`` (a
    ``Qwen2_5OmniToken2WavModel`` whose forward :func:`omni_fast.patch` swapped) and its DiT's patched ``sample``
    round a call up to; a call longer than the largest takes the next power of two. Every bucket is rounded up to whole attention blocks. Raises
    ValueError on an unpatched module (the setting belongs to the patch: ``unpatch`` drops it)."""
    if not patched(token2wav):
        raise ValueError(f"token2wav must be a {CLASS} whose forward omni_fast.patch swapped (token2wav fast path "
                         f"on), got {type(token2wav).__name__}")
    if isinstance(buckets, (str, bytes)) or not hasattr(buckets, "__iter__"):
        raise TypeError(f"buckets must be an iterable of positive ints, got {buckets!r}")
    buckets = tuple(buckets)
    if not buckets or any(isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1 for b in buckets):
        raise ValueError(f"buckets must be a non-empty iterable of positive ints, got {buckets!r}")
    token2wav.__dict__[BUCKETS_ATTR] = tuple(sorted(int(b) for b in buckets))
    # the DiT's own (patched) sample too: the pipeline calls it directly (then the vocoder on the real length)
    token2wav.code2wav_dit_model.__dict__[BUCKETS_ATTR] = token2wav.__dict__[BUCKETS_ATTR]


def code_buckets(token2wav) -> tuple[int, ...]:
    """The buckets the patched forward uses now (default ``dit_solve.CODE_BUCKETS``)."""
    from ..models import dit_solve

    return token2wav.__dict__.get(BUCKETS_ATTR, dit_solve.CODE_BUCKETS)


def supported(token2wav) -> bool:
    """Whether the module's vocoder is one the padded BigVGAN covers (transformers' own: yes)."""
    from ..models import bigvgan_padded

    vocoder = getattr(token2wav, "code2wav_bigvgan_model", None)
    return getattr(token2wav, "code2wav_dit_model", None) is not None and vocoder is not None \
        and bigvgan_padded.supported(vocoder)


def _params(module) -> torch.Tensor:
    return next(module.parameters())


def refusal(token2wav, code, conditioning, reference_mel, num_steps, guidance_scale, sway_coefficient) -> str | None:
    """Why this call runs transformers' forward instead of :func:`synthesize` (None: it does not). Cheap host-side
    checks only (no device sync)."""
    dit, vocoder = token2wav.code2wav_dit_model, token2wav.code2wav_bigvgan_model
    tensors = dict(code=code, conditioning=conditioning, reference_mel=reference_mel)
    if not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        return "code / conditioning / reference_mel not all tensors"
    weights = _params(dit)
    if records_grad(weights, _params(vocoder), conditioning, reference_mel):
        return "autograd is recording (the graph is inference-only)"
    if code.dtype not in (torch.int64, torch.int32) or code.dim() != 2 or code.shape[1] == 0:
        return f"code is not a non-empty [B, n] int tensor (shape {tuple(code.shape)}, {code.dtype})"
    B = code.shape[0]
    if conditioning.shape != (B, dit.config.enc_emb_dim) or reference_mel.dim() != 3 \
            or reference_mel.shape[0] != B or reference_mel.shape[2] != dit.mel_dim:
        return "conditioning / reference_mel shapes do not match code's batch and the DiT's sizes"
    dtype = reference_mel.dtype
    if dtype not in _FLOATS or {conditioning.dtype, weights.dtype, _params(vocoder).dtype} != {dtype}:
        return "dtypes differ (inputs, DiT, vocoder) or are not fp32/fp16/bf16"
    devices = {t.device for t in tensors.values()} | {weights.device, _params(vocoder).device}
    if len(devices) != 1:  # (weights on meta: offloaded by device_map; the other weights: dit_solve.WeightsElsewhere)
        return f"tensors on several devices ({sorted(map(str, devices))})"
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 2:
        return f"num_steps={num_steps!r} (the graph needs an int >= 2)"
    reals = [guidance_scale] + ([] if sway_coefficient is None else [sway_coefficient])
    if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in reals):
        return "guidance_scale / sway_coefficient not Python numbers"
    if code.shape[1] * dit.repeats > dit.config.max_position_embeddings:
        return "mel length beyond max_position_embeddings (transformers raises its error)"
    if not supported(token2wav):
        return "BigVGAN variant not covered by the padded vocoder"
    return None


def token2wav_forward(self, code, conditioning, reference_mel, num_steps=10, guidance_scale=0.5,
                      sway_coefficient=-1.0, **kwargs):
    """transformers' ``Qwen2_5OmniToken2WavModel.forward`` on :func:`omni_fast.models.dit_solve.synthesize`:
    code int ``[B, n]``, conditioning ``[B, enc_emb_dim]``, reference_mel ``[B, T_ref, mel_dim]`` -> the waveform
    ``[B, n * repeats * prod(upsample_rates)]`` clamped to [-1, 1], ``.squeeze().cpu()`` as transformers returns it.
    A call :func:`refusal` names a reason for runs transformers' forward (the reason kept in ``FALLBACK_ATTR``)."""
    waveform = graphed_waveform(self, code, conditioning, reference_mel, num_steps, guidance_scale, sway_coefficient)
    if waveform is None:
        return self._omni_fast_forward(code, conditioning, reference_mel, num_steps=num_steps,
                                       guidance_scale=guidance_scale, sway_coefficient=sway_coefficient, **kwargs)
    return waveform.squeeze().cpu()


def patched(token2wav) -> bool:
    """Whether :func:`omni_fast.patch` swapped this ``Qwen2_5OmniToken2WavModel``'s forward (fast path on)."""
    return type(token2wav).__name__ == CLASS and "_omni_fast_forward" in getattr(token2wav, "__dict__", {})


def graphed_waveform(token2wav, code, conditioning, reference_mel, num_steps=10, guidance_scale=0.5,
                     sway_coefficient=-1.0) -> torch.Tensor | None:
    """The patched forward's graph on a patched ``token2wav``: the clamped waveform ``[B, n * repeats *
    prod(upsample_rates)]`` ON THE DEVICE (no ``.cpu()``), or None where :func:`refusal` names a reason, or where
    the weights are not all on one device (``dit_solve.WeightsElsewhere``: offloaded by device_map, or split; found
    in the walk over the weights the graph cache takes anyway, which the refusal's cheap checks skip) (the reason
    kept in ``FALLBACK_ATTR``; the caller runs the pieces)."""
    reason = refusal(token2wav, code, conditioning, reference_mel, num_steps, guidance_scale, sway_coefficient)
    token2wav.__dict__[FALLBACK_ATTR] = reason
    if reason is not None:
        return None
    from ..models import dit_solve

    try:
        with torch.no_grad():
            return dit_solve.synthesize(token2wav.code2wav_dit_model, token2wav.code2wav_bigvgan_model, conditioning,
                                        reference_mel, code, int(num_steps), guidance_scale, sway_coefficient,
                                        buckets=code_buckets(token2wav), backend=pinned_backend(token2wav))
    except dit_solve.WeightsElsewhere as e:  # (offloaded or split weights, found before anything ran or was drawn)
        token2wav.__dict__[FALLBACK_ATTR] = str(e)
        return None


def patch_forward(module, wanted: bool, backend, bucket: dict, left: dict, part: str, swap_forward, pin,
                  label) -> None:
    """What :func:`omni_fast.patch` does to a ``Qwen2_5OmniToken2WavModel`` (``label``: the Token2Wav pieces'
    opt-in rule); adds its report line to ``bucket`` (swapped) or ``left``."""
    swap, what = label("-> one CUDA graph per length bucket (omni_fast.models.dit_solve.synthesize; other calls: "
                       "transformers' forward on the pieces)", supported(module))
    if wanted and swap:
        swap_forward(module, token2wav_forward)
        pin(module, backend)
    count_line(bucket, left, swap, (part, f"{CLASS}.forward: DiT ODE solve + BigVGAN vocoder {what}"))
