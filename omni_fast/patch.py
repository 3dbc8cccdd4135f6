"""``omni_fast.patch(model)``: run a transformers Qwen-Omni model on omni-fast kernels.

What is replaced, and how (transformers' own extension points first, module swaps where none exists):

- MoE experts (Thinker, Talker): ``config._experts_implementation = "omni_fast"`` (the ``ExpertsInterface`` entry
  registered by :func:`omni_fast.register_transformers`).
- Attention (every module that dispatches through ``AttentionInterface``): ``config._attn_implementation =
  "omni_fast"``, only when transformers' ``ALL_ATTENTION_FUNCTIONS`` has that entry after
  :func:`omni_fast.register_transformers`; otherwise the attention stays as it was and the report says so.
- q/k RMSNorm + TM-RoPE (Thinker, Talker, code predictor, Code2Wav pre-transformer, Qwen2.5-Omni thinker): the
  rotary-embedding modules are wrapped to also hand their position ids to the attention layers, whose forward is
  swapped for one that calls :func:`omni_fast.ops.qk_norm_mrope` (or :func:`omni_fast.ops.mrope` where a layer has
  no q/k norm) on the projected q/k: cos/sin are computed inside the kernel from the positions. The kernels take
  whole-number positions: transformers builds float ones, so the rotary module checks them once per forward (one
  host sync per forward, none per layer), and ``get_rope_index`` is wrapped to return whole-number results as
  int64, so ``generate``'s decode steps hand integer positions and need no check at all. Fractional positions (a
  video at a fractional ``second_per_grid * position_id_per_seconds``) take transformers' cos/sin, as do float
  positions while tracing for ``torch.compile`` or capturing a CUDA graph (no sync allowed there).
- Audio / vision encoder attention (Qwen3-Omni and Qwen2.5-Omni): transformers passes the window/frame boundaries
  (``cu_seqlens``) to the attention function only under a "flash" implementation name, and otherwise splits the
  clip per window on the host; the attention modules' forward is swapped for one that calls the ``"omni_fast"``
  attention function once with ``cu_seq_lens_q/k``: one :func:`omni_fast.ops.flash_attn_varlen` launch per layer,
  no host sync in omni-fast's code.
- Code2Wav (no extension point): the module's forward runs :class:`omni_fast.models.Code2Wav` (fused conv kernels);
  its ``chunked_decode`` keeps transformers' chunking on top of that forward.
- Decode (no extension point): the text model of the Qwen3-Omni thinker and talker and of the Qwen2.5-Omni talker
  hands transformers' prefill KV to :class:`omni_fast.models.MoeTextDecoder` and runs every later ``generate`` step
  on it, returning the hidden states ``generate`` reads (:mod:`omni_fast.integrations.decode_takeover`; greedy
  text and codes identical to transformers' on the CPU).
- The MTP code predictor's per-frame ``generate`` (no extension point): the talker's
  ``prepare_inputs_for_generation`` calls :meth:`omni_fast.models.CodePredictor.predict_frame` instead
  (:func:`omni_fast.models.install_on_talker`; greedy decoding is identical, sampling uses omni-fast's RNG).

Opt-in fast paths (:mod:`omni_fast.fast_paths`): ``persistent_mtp`` makes the swapped-in MTP frame step one
persistent launch (read per frame); ``fused_step`` gives those decoders the phase-fused step where it applies
(Qwen3-Omni's MoE thinker and talker: 3 launches per layer; Qwen2.5-Omni's dense talker keeps the ops path, and the
report says why); ``token2wav`` swaps the Qwen2.5-Omni Token2Wav pieces in, and its forward for the DiT solve +
BigVGAN in one graph per length bucket (:mod:`omni_fast.integrations.token2wav_synth`). The report names each path.

Backend: ``patch(model, backend=X)`` pins X on every module it swaps (``module._omni_fast_backend``), and every
omni-fast entry point the patched model reaches reads it and passes it as the ops' ``backend=``: the swapped
attention forwards (fused RoPE), the ``"omni_fast"`` attention function (it reads the calling module's pin, so the
encoders' varlen launches and transformers' own attention forwards follow too), the experts function, the Code2Wav
swap and the MTP frame step. An ambient ``use_backend`` block or ``OMNI_FAST_BACKEND`` does not override it;
``backend=None`` (default) leaves every op on the ambient choice.

The kernels are inference-only: with autograd recording, the patched layers run transformers' own forward.

:func:`unpatch` restores every forward and implementation name. The returned :class:`PatchReport` lists what was
replaced and what was left as it is.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from . import ops
# (_MISSING: unpatch's marker; importable here for pickles made when it lived in this module)
from ._bound import (_MISSING, BoundMethod, original_method, remember, swap_attr, swap_forward, swap_sample,
                     unswap_forward)
from .backend import PIN_ATTR, pinned_backend, requested_backend
from .validation import records_grad, values_checkable
from ._device import offloaded
from .integrations.hf_compat import carries_paged_cache, check_transformers_version, pop_cache, with_cache
from .integrations.patch_parts import (count_line, is_qwen25, part_of as _part_of, report_lines,
                                       root_part as _root_part, warn_if_nothing_replaced)
from .integrations.transformers import ATTENTION_NAME, EXPERTS_NAME, register_transformers

PARTS = ("thinker", "talker", "code_predictor", "code2wav", "audio", "vision")

# Rotary modules whose forward(x, position_ids) returns (cos, sin), and their section layout.
_MROPE_ROTARY = {  # class name -> interleaved sections (Qwen3-Omni) or contiguous (Qwen2.5-Omni)
    "Qwen3OmniMoeThinkerTextRotaryEmbedding": True,
    "Qwen3OmniMoeTalkerRotaryEmbedding": True,
    "Qwen2_5OmniRotaryEmbedding": False,
}
_PLAIN_ROTARY = {"Qwen3OmniMoeRotaryEmbedding"}  # 1-D RoPE (code predictor, Code2Wav pre-transformer)
_ROPE_ATTENTION = {  # attention classes: q/k projections, optional q/k norm, rotate-half RoPE, AttentionInterface
    "Qwen3OmniMoeThinkerTextAttention",
    "Qwen3OmniMoeTalkerCodePredictorAttention",
    "Qwen3OmniMoeCode2WavAttention",
    "Qwen2_5OmniAttention",
}
# Text models whose generate decode steps run on models.MoeTextDecoder (integrations.decode_takeover)
_TAKEOVER = {"Qwen2_5OmniTalkerModel", "Qwen3OmniMoeTalkerModel", "Qwen3OmniMoeThinkerTextModel"}
_EXPERTS = {"Qwen3OmniMoeThinkerTextExperts", "Qwen3OmniMoeTalkerTextExperts"}
_TOKEN2WAV = {"Qwen2_5OmniAntiAliasedActivation1d", "Qwen2_5OmniAMPBlock", "Qwen2_5OmniToken2WavDiTModel",
              "Qwen2_5_OmniAdaLayerNormZero", "Qwen2_5_OmniAdaLayerNormZero_Final", "Qwen2_5OmniToken2WavModel"}
# Encoder attention over packed windows/frames (forward(hidden_states [T, C], cu_seqlens, ...)): swapped for one
# varlen launch per layer (transformers passes cu_seqlens to the attention function only under "flash" names).
_ENCODER_ATTENTION = {
    "Qwen3OmniMoeAudioAttention",
    "Qwen3OmniMoeVisionAttention",
    "Qwen2_5OmniAudioAttention",
    "Qwen2_5OmniVisionAttention",
}


@dataclass
class PatchReport:
    """What :func:`patch` replaced and what it left as it was."""

    replaced: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = ["omni-fast patch report", "  replaced:"] + [f"    {r}" for r in (self.replaced or ["(nothing)"])]
        lines += ["  left as is:"] + [f"    {r}" for r in (self.left or ["(nothing)"])]
        return "\n".join(lines)


class RotaryWithPositions(tuple):
    """``(cos, sin)`` as transformers passes them, plus what the fused kernel needs to compute them itself.

    ``position_ids`` are integer (checked once per model forward by :func:`_rotary_forward`), or None when the
    kernel cannot take them (fractional positions): the attention layers then apply transformers' cos/sin.
    """

    def __new__(cls, cos, sin, position_ids, rotary: nn.Module, interleaved: bool | None):
        obj = super().__new__(cls, (cos, sin))
        obj.position_ids, obj.rotary, obj.interleaved = position_ids, rotary, interleaved
        return obj

    def rope_kwargs(self, batch: int, seq: int, head_dim: int) -> tuple[torch.Tensor, dict] | None:
        """Flattened positions (``[3, B*S]`` or ``[B*S]``) and the keyword arguments of :func:`ops.mrope`, or
        None when the positions are not whole numbers. No host sync: called once per attention layer."""
        pos = self.position_ids
        if pos is None:
            return None
        half = head_dim // 2
        if self.interleaved is None or pos.dim() == 2:  # 1-D RoPE: one row for every frequency
            pos = pos.expand(batch, seq).reshape(-1) if pos.dim() == 2 else pos.expand(3, batch, seq)[0].reshape(-1)
            section, interleaved = (half, 0, 0), False
        else:
            pos = pos.expand(3, batch, seq).reshape(3, -1)
            section, interleaved = tuple(self.rotary.mrope_section), self.interleaved
        inv_freq = self.rotary.inv_freq.to(torch.float32).contiguous()
        return pos, dict(mrope_section=section, interleaved=interleaved, inv_freq=inv_freq,
                         attention_scaling=float(self.rotary.attention_scaling))


def _cannot_read_values(t: torch.Tensor) -> bool:
    """Reading ``t``'s values on the host is not allowed now: tracing for ``torch.compile``, or capturing a CUDA
    graph (a sync there invalidates the capture)."""
    return not values_checkable(t, True)


def _whole_positions(pos: torch.Tensor) -> torch.Tensor | None:
    """``pos`` as integers, or None when they are fractional (or cannot be looked at now).

    transformers' ``get_rope_index`` builds float positions, and a video at a fractional ``second_per_grid *
    position_id_per_seconds`` makes them fractional; omni-fast's RoPE kernels take integer positions. Integer
    positions pass as they are (no sync; :func:`_integer_rope_index` makes the ones of ``generate`` integers); float
    ones cost ONE host sync per model forward (this runs in the rotary module, once per forward, not per layer).
    """
    if not pos.is_floating_point():
        return pos
    if _cannot_read_values(pos):
        return None  # transformers' cos/sin: correct, and no sync inside a capture or a traced graph
    as_int = pos.to(torch.int64)
    return as_int if torch.equal(as_int.to(pos.dtype), pos) else None


def _rotary_forward(self, x, position_ids):
    cos, sin = self._omni_fast_forward(x, position_ids)
    return RotaryWithPositions(cos, sin, _whole_positions(position_ids), self,
                               _MROPE_ROTARY.get(type(self).__name__))


def _integer_rope_index(self, *args, **kwargs):
    """transformers' ``get_rope_index`` with whole-number results as int64 (same values).

    transformers returns float positions and deltas; every decode step then adds the cached float deltas, so each
    step's positions would be float and need a host sync to prove them whole. Made integers once here (one sync per
    prefill, in a function that already reads the prompt on the host), the decode steps' positions are int64 and
    the patched model's decode path has no host sync of omni-fast's. Fractional results stay float.
    """
    out = self._omni_fast_get_rope_index(*args, **kwargs)
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        return out
    pos, deltas = out
    if not (pos.is_floating_point() or deltas.is_floating_point()) or _cannot_read_values(pos):
        return out
    whole = [(t == t.trunc()).all() for t in out if t.is_floating_point()]
    return (pos.to(torch.int64), deltas.to(torch.int64)) if bool(torch.stack(whole).all()) else out


def _attention_forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
    """The transformers attention forward with q/k norm + RoPE done by one omni-fast kernel. The KV cache comes as
    ``cache`` (transformers >= 5.24) or ``past_key_values`` (older): it is updated here, never handed on to the
    attention function. transformers' continuous batching (``generate_batch``: a ``PagedAttentionCache``) runs
    transformers' own forward, with the keywords as they came: that cache is written with per-batch indices only
    transformers hands over (5.24+: ``cache.update(..., kwargs=kwargs)``; 5.17: ``read_index`` / ``write_index``
    beside ``past_key_values``)."""
    if carries_paged_cache(kwargs):
        return self._omni_fast_forward(hidden_states, position_embeddings=tuple(position_embeddings),
                                       attention_mask=attention_mask, **kwargs)
    cache = pop_cache(kwargs)
    batch, seq = hidden_states.shape[:2]
    rope_args = (position_embeddings.rope_kwargs(batch, seq, self.head_dim)
                 if isinstance(position_embeddings, RotaryWithPositions) else None)
    norms = [getattr(getattr(self, n, None), "weight", None) for n in ("q_norm", "k_norm")]
    if rope_args is None or records_grad(hidden_states, module=self) or offloaded(*norms):
        # transformers' own forward: for positions the kernel cannot take, with autograd recording (the kernels are
        # inference-only), and for q/k norms offloaded by device_map (weights on meta: their hooks load them only
        # when the norms' forwards run, which the fused kernel skips). Keywords, since the attention classes order
        # their parameters differently.
        return self._omni_fast_forward(hidden_states, position_embeddings=tuple(position_embeddings),
                                       attention_mask=attention_mask, **with_cache(cache, **kwargs))
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    d = self.head_dim
    q = self.q_proj(hidden_states).reshape(batch * seq, -1, d)
    k = self.k_proj(hidden_states).reshape(batch * seq, -1, d)
    v = self.v_proj(hidden_states).view(batch, seq, -1, d).transpose(1, 2)
    positions, rope = rope_args
    # backend pinned by patch(backend=...), else the ambient choice (use_backend block, env, auto)
    backend = pinned_backend(self)
    q_norm, k_norm = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
    if getattr(q_norm, "weight", None) is not None:
        eps = getattr(q_norm, "variance_epsilon", getattr(q_norm, "eps", 1e-6))
        ops.qk_norm_mrope(q, k, q_norm.weight, k_norm.weight, positions, eps=eps, backend=backend, **rope)
    else:
        ops.mrope(q, k, positions, backend=backend, **rope)
    q = q.view(batch, seq, -1, d).transpose(1, 2)
    k = k.view(batch, seq, -1, d).transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx)
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import eager_attention_forward

    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    out, weights = attention(self, q, k, v, attention_mask, dropout=0.0 if not self.training else
                             self.attention_dropout, scaling=self.scaling,
                             sliding_window=getattr(self, "sliding_window", None), **kwargs)
    return self.o_proj(out.reshape(batch, seq, -1).contiguous()), weights


def _encoder_qkv(self, hidden_states: torch.Tensor):
    """q, k, v ``[T, H, D]`` (views of the projections; no copies) of an encoder attention module."""
    T = hidden_states.shape[0]
    if hasattr(self, "qkv"):  # Qwen3-Omni vision: one fused projection
        return self.qkv(hidden_states).reshape(T, 3, self.num_heads, -1).unbind(1)
    if hasattr(self, "q_proj"):  # audio encoders
        return tuple(p(hidden_states).reshape(T, self.num_heads, -1) for p in (self.q_proj, self.k_proj, self.v_proj))
    return tuple(p(hidden_states).reshape(T, self.num_heads, -1) for p in (self.q, self.k, self.v))  # Qwen2.5 vision


def _encoder_attention_forward(self, hidden_states, cu_seqlens=None, *args, **kwargs):
    """Encoder attention over all windows (audio) or frames (vision) of a packed clip as ONE varlen launch.

    transformers hands the attention function the window boundaries only under a "flash" implementation name;
    under any other name it splits q/k/v per window on the host (``cu_seqlens.tolist()``, a sync) and calls it once
    per window. This forward does what transformers' FlashAttention branch does: it calls the ``"omni_fast"``
    attention function once with ``cu_seq_lens_q/k``, which runs :func:`omni_fast.ops.flash_attn_varlen` over the
    whole clip (block-diagonal attention, the model's windows). ``max_seqlen`` when given sizes the launch; without
    it the grid is sized from the token count (no host sync). Runs transformers' own forward instead with autograd
    recording, with an explicit ``attention_mask`` (older transformers), without cu_seqlens or rotary embeddings,
    or when the config's attention implementation is no longer ``"omni_fast"``.
    """
    position_embeddings = kwargs.get("position_embeddings")
    vision = "Vision" in type(self).__name__
    if (args or cu_seqlens is None or kwargs.get("attention_mask") is not None
            or self.config._attn_implementation != ATTENTION_NAME or (vision and position_embeddings is None)
            or records_grad(hidden_states, module=self)):
        return self._omni_fast_forward(hidden_states, cu_seqlens, *args, **kwargs)
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    kwargs = {k: v for k, v in kwargs.items() if k not in ("position_embeddings", "attention_mask")}
    max_seqlen = kwargs.pop("max_seqlen", None)
    q, k, v = _encoder_qkv(self, hidden_states)
    if vision:  # the model's own rotary helper (fp32 math, cast back), as transformers' forward applies it
        cos, sin = position_embeddings
        q, k = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision(q, k, cos, sin)
    attention = ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME]
    # [T, H, D] -> [1, H, T, D] views: the function's layout; it hands the kernel [T, H, D] views again
    out, _ = attention(self, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       attention_mask=None, scaling=self.scaling,
                       dropout=0.0 if not self.training else self.attention_dropout, cu_seq_lens_q=cu_seqlens,
                       cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen, is_causal=False,
                       **kwargs)
    out = out.reshape(hidden_states.shape[0], -1)
    return (self.out_proj if hasattr(self, "out_proj") else self.proj)(out)


def _code2wav_forward(self, codes, **kwargs):
    """Code2Wav forward on :class:`omni_fast.models.Code2Wav` (bound to the transformers module).

    The fast model is built from the module's current weights and rebuilt when they change (``.to()``,
    ``load_state_dict``, a deep copy). Codes outside ``[0, codebook_size)`` (a talker special token that reached the
    vocoder) go to transformers' forward, which embeds them into a neighbouring codebook's rows: omni-fast refuses
    such codes, and the patched model keeps transformers' behaviour. One host sync per call for that check. A
    module whose weights sit on several devices (a ``device_map`` split) runs transformers' forward too.
    """
    from .models import Code2Wav
    from ._cache_memory import record_copy_use
    from .models.cuda_graphs import key_devices, weights_key

    key = weights_key(self)
    unsupported_dtype = next(self.parameters()).dtype not in (torch.float32, torch.float16, torch.bfloat16)
    split = len(key_devices(key)) > 1  # (device_map split the vocoder: transformers' forward and its hooks)
    if unsupported_dtype or split or (codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size)):
        return type(self).forward(self, codes, **kwargs)
    cached = self.__dict__.get("_omni_fast_code2wav")
    if cached is None or cached[0] != key:
        cached = (key, Code2Wav.from_transformers(self, backend=pinned_backend(self)))
        self.__dict__["_omni_fast_code2wav"] = cached
    record_copy_use(cached[1], cached[1].device)  # (a hot swap may drop it while this stream still reads it)
    return cached[1](codes)


# patch / unpatch rewrite the attributes of a whole module tree: one at a time (re-entrant: patch unpatches first)
_LOCK = threading.RLock()
_MEMBER = "_omni_fast_member"  # set on every module of a patched tree (the root also has _omni_fast_patched)


def _check_module(model, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers Qwen-Omni model or part), got "
                        f"{type(model).__name__}")
    if model.__dict__.get(_MEMBER, False) and not model.__dict__.get("_omni_fast_patched", False):
        raise ValueError(f"cannot {what} this {type(model).__name__}: it is part of a model patched as a whole; "
                         f"unpatch that model (omni_fast.unpatch(model)), or patch the whole model with "
                         f"parts=... instead")


def patch(model: nn.Module, *, backend: str | None = None, parts: Iterable[str] | None = None) -> PatchReport:
    """Swap omni-fast kernels into a transformers Qwen3-Omni / Qwen2.5-Omni model (or one of its parts).

    ``parts`` limits the patch to some of ``PARTS`` (all when None; a Qwen2.5-Omni model also takes ``"token2wav"``,
    its name of the part ``"code2wav"``); ``backend`` pins the backend of the swapped-in
    ops (default: auto). Idempotent: a patched model is unpatched first. Returns a :class:`PatchReport`.
    A part of a model patched as a whole cannot be patched or unpatched on its own (ValueError: unpatch the model,
    or use ``parts``); patching a model whose parts were patched on their own unpatches those first. Thread-safe
    (one lock around patch / unpatch); a patched model pickles (``torch.save``) and loads back patched.
    """
    _check_module(model, "patch")
    if parts is not None and (isinstance(parts, (str, bytes)) or not hasattr(parts, "__iter__")):
        raise TypeError(f"parts must be an iterable of names from {PARTS}, got {parts!r}")
    if parts is not None:
        parts = tuple(parts)  # read once (a generator), each entry a name: not a crash hashing or sorting them
        for entry in parts:
            if not isinstance(entry, str):
                raise TypeError(f"parts must be an iterable of names from {PARTS}, got entry {entry!r} "
                                f"({type(entry).__name__})")
    check_transformers_version()  # an older transformers: one clear error here, not a failure deep in a forward
    with _LOCK:
        return _patch(model, backend, parts)


def _patch(model: nn.Module, backend: str | None, parts: Iterable[str] | None) -> PatchReport:
    wanted = set(PARTS if parts is None else parts)
    if "token2wav" in wanted and is_qwen25(model):  # Qwen2.5-Omni's name of its waveform part "code2wav"
        wanted = (wanted - {"token2wav"}) | {"code2wav"}
    unknown = wanted - set(PARTS)
    if unknown:
        hint = ("; Qwen3-Omni's waveform part is 'code2wav' ('token2wav' names Qwen2.5-Omni's)"
                if "token2wav" in unknown else "")
        raise ValueError(f"parts must be a subset of {PARTS} (Qwen2.5-Omni also takes 'token2wav' for its "
                         f"Token2Wav, the part 'code2wav'), got unknown {sorted(unknown)}{hint}")
    if backend is not None:
        requested_backend(backend)  # validates the name now (TypeError / ValueError), not at the first forward
    if backend is not None:
        _check_backend_runs_here(model, backend)
    # A fresh patch of this tree: undo an earlier one of the tree itself or of any of its parts first.
    for module in model.modules():
        if module.__dict__.get("_omni_fast_patched", False):
            _unpatch(module)
    register_transformers()
    root = _root_part(model)
    saved_configs: list[tuple[object, str, object]] = []
    counts, left = _patch_modules(model, root, wanted, backend, saved_configs)
    report = PatchReport(*report_lines(model, root, wanted, counts, left))
    warn_if_nothing_replaced(model, report.replaced, report.left, None if parts is None else wanted)
    for path, module in model.named_modules():  # the selected parts cannot be (un)patched on their own now
        if _part_of(root, path) in wanted:
            module.__dict__[_MEMBER] = True
    model._omni_fast_patched = True
    model._omni_fast_saved_configs = saved_configs
    return report


def _patch_modules(model: nn.Module, root: str, wanted: set, backend: str | None, saved_configs: list):
    """Swap omni-fast work into every module of the ``wanted`` parts; returns the report's tallies
    ``{(part, what): n}`` (replaced, left as transformers wrote it), which name the other parts' modules too."""
    attention_ready = _attention_registered()
    counts: dict[tuple[str, str], int] = {}
    left: dict[tuple[str, str], int] = {}
    rope_kernels = {path: _rope_kernel(m) for path, m in model.named_modules() if type(m).__name__ in _ROPE_ATTENTION}
    for path, module in model.named_modules():
        cls = type(module).__name__
        part = _part_of(root, path)
        bucket = counts if part in wanted else left
        if cls in _MROPE_ROTARY or cls in _PLAIN_ROTARY:
            if part in wanted:
                swap_forward(module, _rotary_forward)
            key = (part, f"{cls}: positions handed to the attention layers' {_rotary_users(path, rope_kernels)}")
            bucket[key] = 1
        elif cls in _ROPE_ATTENTION:
            _patch_rope_attention(module, part, part in wanted, backend, attention_ready, rope_kernels[path],
                                  saved_configs, bucket, left)
        elif cls in _EXPERTS:
            if part in wanted:
                _set(saved_configs, module.config, "_experts_implementation", EXPERTS_NAME)
                _pin(module, backend)
            key = (part, f"{cls}: routed experts -> omni_fast fused MoE")
            bucket[key] = bucket.get(key, 0) + 1
        elif cls == "Qwen3OmniMoeCode2Wav" and part in wanted:
            if "_omni_fast_forward" not in module.__dict__:
                _pin(module, backend)
                swap_forward(module, _code2wav_forward)  # (inside accelerate's device hook when it has one)
            counts[(part, f"{cls}: whole vocoder (forward; chunked_decode runs on it) "
                          "-> omni_fast.models.Code2Wav")] = 1
        elif cls in _TOKEN2WAV:  # Qwen2.5-Omni Token2Wav (opt-in until GPU-tested): integrations.token2wav
            from .integrations import token2wav

            token2wav.patch_piece(module, cls, part in wanted, backend, bucket, left, part, swap_forward, _pin,
                                  swap_sample=swap_sample)
        elif cls == "Qwen3OmniMoeTalkerForConditionalGeneration" and "code_predictor" in wanted:
            from .models import install_on_talker
            from .models.code_predictor import unsupported_setting

            unsupported = unsupported_setting(module.code_predictor.config)
            if unsupported is not None:  # (the frame step would fall back at every frame: say so, install nothing)
                left[("code_predictor", f"per-frame code_predictor.generate (its config has {unsupported})")] = 1
            elif "prepare_inputs_for_generation" not in module.__dict__.get("_omni_fast_saved_attrs", {}):
                remember(module, "prepare_inputs_for_generation")
                _pin(module, backend)  # read by the swapped-in frame step (models.talker_step)
                install_on_talker(module)
            if unsupported is None:
                counts[("code_predictor", "per-frame code_predictor.generate -> omni_fast.models.CodePredictor "
                                          + _frame_words())] = 1
        elif cls in _TAKEOVER and part in wanted:  # decode steps -> models.MoeTextDecoder
            from .integrations.decode_takeover import install

            counts[(part, install(module, swap_forward, lambda m: _pin(m, backend), root=model))] = 1
        elif cls.endswith(("AudioAttention", "VisionAttention")):
            _patch_encoder_attention(module, part, part in wanted, backend, attention_ready, saved_configs, counts,
                                     left)
        # not elif: the thinker / talker classes that build 3-D positions (also the talker matched above)
        if part in wanted and callable(getattr(type(module), "get_rope_index", None)) and any(
                type(m).__name__ in _MROPE_ROTARY for m in module.modules()):
            if "get_rope_index" not in module.__dict__.get("_omni_fast_saved_attrs", {}):
                module.__dict__["_omni_fast_get_rope_index"] = original_method(module, "get_rope_index")
                swap_attr(module, "get_rope_index", BoundMethod(_integer_rope_index, module))
    return counts, left


def _patch_rope_attention(module, part, selected, backend, attention_ready, rope_kernel, saved_configs, bucket, left):
    """An attention layer with RoPE (q/k norm): the fused forward, and the omni_fast attention when registered."""
    cls = type(module).__name__
    if selected:
        swap_forward(module, _attention_forward)
        _pin(module, backend)
        if attention_ready:
            _set(saved_configs, module.config, "_attn_implementation", ATTENTION_NAME)
    fused = ("q/k norm + RoPE -> omni_fast.ops.qk_norm_mrope" if rope_kernel == "qk_norm_mrope"
             else "RoPE -> omni_fast.ops.mrope")
    key = (part, f"{cls}: {fused}"
           + (", attention -> omni_fast" if attention_ready else ""))
    bucket[key] = bucket.get(key, 0) + 1
    if not attention_ready and selected:
        key = (part, f"{cls}: attention itself ({_NO_ATTENTION})")
        left[key] = left.get(key, 0) + 1


def _patch_encoder_attention(module, part, selected, backend, attention_ready, saved_configs, counts, left):
    """An audio / vision encoder attention: one varlen launch per layer where the forward is swapped."""
    cls = type(module).__name__
    if selected and attention_ready:
        _set(saved_configs, module.config, "_attn_implementation", ATTENTION_NAME)
        _pin(module, backend)  # read by the omni_fast attention function
        if cls in _ENCODER_ATTENTION:
            swap_forward(module, _encoder_attention_forward)
            what = ("attention over all windows/frames -> one omni_fast flash_attn_varlen launch per layer "
                    "(cu_seqlens)")
        else:
            what = "attention -> omni_fast (per window, as transformers calls it)"
        count_line(counts, left, True, (part, f"{cls}: {what}"))
    else:
        count_line(counts, left, False, (part, f"{cls}: attention" + ("" if not selected else f" ({_NO_ATTENTION})")))


def _frame_words() -> str:
    """How the MTP frame runs, by the ``persistent_mtp`` fast path (read per frame; this is the setting now)."""
    from . import fast_paths

    if fast_paths.enabled("persistent_mtp"):
        return "(persistent frame: one launch per frame, fast path persistent_mtp)"
    return "(one graph replay per frame on CUDA; persistent frame off: opt-in fast path persistent_mtp)"


def _pin(module: nn.Module, backend: str | None) -> None:
    """Pin ``patch(backend=...)`` on a module whose work patch swapped: every omni-fast entry point the patched
    model reaches (the swapped forwards, the attention and experts functions, the vocoder and MTP swaps) reads it
    and passes it as the ops' ``backend=``; None keeps the ambient choice. :func:`unpatch` removes it."""
    module.__dict__[PIN_ATTR] = backend


def _rope_kernel(attention: nn.Module) -> str:
    """The omni-fast op the swapped attention forward calls: with a q/k RMSNorm (a weighted norm; Code2Wav's is
    ``nn.Identity``) the fused norm + RoPE kernel, else RoPE alone (Qwen2.5-Omni, Code2Wav)."""
    return "qk_norm_mrope" if getattr(getattr(attention, "q_norm", None), "weight", None) is not None else "mrope"


def _rotary_users(path: str, rope_kernels: dict[str, str]) -> str:
    """Report label: which RoPE op(s) the attention layers beside the rotary module at ``path`` run."""
    parent = path.rpartition(".")[0]
    used = sorted({k for p, k in rope_kernels.items() if not parent or p.startswith(parent + ".")})
    if not used:
        return "RoPE (no swapped attention layer reads them)"
    return " / ".join(f"omni_fast.ops.{k} kernel" for k in used)


_NO_ATTENTION = "no omni_fast attention implementation registered: runs as transformers wrote it"


def _attention_registered() -> bool:
    """Whether transformers' ``AttentionInterface`` has an ``"omni_fast"`` entry (the attention work may not)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ATTENTION_NAME in ALL_ATTENTION_FUNCTIONS


def _check_backend_runs_here(model: nn.Module, backend: str) -> None:
    """``backend`` can run this model's tensors (a CPU model cannot take 'cuda', nor 'triton' off the interpreter)."""
    from .backend import resolve_backend

    tensor = next(iter(model.parameters()), None)
    if tensor is not None:
        resolve_backend("patch", [tensor], ("triton", "cuda", "reference"), backend)


def _set(saved: list, config, attr: str, value: str) -> None:
    if any(c is config and a == attr for c, a, _ in saved) or getattr(config, attr, None) == value:
        return  # already saved here, or set by an enclosing patch (which restores it)
    # transformers keeps the name in `<attr>_internal` behind a setter that maps None to a default; save and
    # restore the raw value so unpatch gives back exactly what was there.
    internal = attr + "_internal"
    saved.append((config, attr, config.__dict__[internal] if internal in config.__dict__ else getattr(config, attr,
                                                                                                        None)))
    setattr(config, attr, value)


def _restore(config, attr: str, old) -> None:
    internal = attr + "_internal"
    if internal in config.__dict__:
        config.__dict__[internal] = old
    else:
        setattr(config, attr, old)


def unpatch(model: nn.Module) -> None:
    """Undo :func:`patch` on ``model`` and every part of it patched on its own: original forwards and
    implementation names come back, and omni-fast's cached fast models are dropped. A part of a model patched as a
    whole raises ValueError (it cannot be restored alone: unpatch the model)."""
    _check_module(model, "unpatch")
    with _LOCK:
        _unpatch(model)


def _unpatch(model: nn.Module) -> None:
    for module in model.modules():
        for config, attr, old in reversed(module.__dict__.get("_omni_fast_saved_configs", [])):
            _restore(config, attr, old)
        unswap_forward(module)  # (accelerate's hook added or removed since the patch)
        for name, original in module.__dict__.get("_omni_fast_saved_attrs", {}).items():
            if original is _MISSING:
                module.__dict__.pop(name, None)
            else:
                object.__setattr__(module, name, original)
        for name in [n for n in module.__dict__ if n.startswith("_omni_fast_")]:
            del module.__dict__[name]  # saved state, cached fast models, pinned backends
