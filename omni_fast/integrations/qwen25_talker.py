"""Qwen2.5-Omni's talker decode on omni-fast (what :func:`omni_fast.patch` swaps into ``Qwen2_5OmniTalkerModel``).

transformers' ``generate`` runs the talker's text model once per codec token: a causal mask, a ``DynamicCache``
update and every decoder layer with Python between the kernels. The swapped ``forward`` of the talker's text model
(``talker.model``) lets transformers run the prefill (its attention already on omni-fast's RoPE kernels), then
hands the prefill's KV to a :class:`omni_fast.models.MoeTextDecoder` built from the same weights (dense SwiGLU,
q/k/v bias, no q/k norm, contiguous M-RoPE: config switches of the one decode step, not a copy of it). Every decode
step after that is one :meth:`~omni_fast.models.MoeTextDecoder.step`: one CUDA-graph replay on CUDA.

transformers carries the cache between the steps; once the decoder holds the KV, the cache it carries is a
:class:`FastTalkerCache` (the decoder and the number of tokens seen: the outer talker forward reads
``get_seq_length()`` for the decode positions). The codec head, ``thinker_to_talker_proj`` and the positions stay
transformers' own code (the outer ``Qwen2_5OmniTalkerForConditionalGeneration.forward`` is not replaced).

transformers' forward runs instead (and keeps its own cache) when: no cache object is passed in (a plain forward),
the cache passed in already holds tokens (a continued prompt), ``use_cache=False``, hidden states or attentions
are asked for, or autograd is recording.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..backend import pinned_backend
from .hf_compat import cache_keyword, output_cache, pop_cache, with_cache

INITIAL_STEPS = 512  # decode room at the prefill; doubled (one re-capture) whenever generate runs past it


class FastTalkerCache:
    """The talker's KV cache once omni-fast's decoder holds it: ``get_seq_length()`` counts the prompt and every
    decode step, as transformers' ``DynamicCache`` would (the outer talker forward builds the positions from it)."""

    is_compileable = False

    def __init__(self, decoder, seq_length: int):
        self.decoder, self.seen = decoder, int(seq_length)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def __repr__(self) -> str:
        return f"FastTalkerCache(seen={self.seen})"


def fast_decoder(model: torch.nn.Module):
    """The :class:`MoeTextDecoder` of a ``Qwen2_5OmniTalkerModel``, built from its current weights (no head: the
    outer talker applies ``codec_head``) and rebuilt when they change (``.to()``, ``load_state_dict``) or the
    ``fused_step`` fast path is switched (:func:`~omni_fast.models.text_decoder.opt_in_decoder`: the phase-fused
    step only where the decoder supports it; the dense talker keeps the ops path)."""
    from .. import fast_paths
    from ..models.cuda_graphs import weights_key
    from ..models.text_decoder import opt_in_decoder

    key = (weights_key(model), fast_paths.enabled("fused_step"), fast_paths.enabled("fused_pdl"))
    cached = model.__dict__.get("_omni_fast_talker_decoder")
    if cached is None or cached[0] != key:
        cached = (key, opt_in_decoder(model, None, backend=pinned_backend(model)))
        model.__dict__["_omni_fast_talker_decoder"] = cached
    return cached[1]


def _takes_over(model, cache, inputs_embeds, use_cache, kwargs) -> bool:
    """Whether this prefill's KV goes to omni-fast's decoder (see the module docstring for when it does not)."""
    if cache is None or use_cache is False or inputs_embeds is None or not hasattr(cache, "get_seq_length"):
        return False
    if cache.get_seq_length() != 0 or type(cache).__name__ not in ("DynamicCache", "StaticCache"):
        return False
    cfg = model.config
    if kwargs.get("output_hidden_states", cfg.output_hidden_states) or kwargs.get("output_attentions",
                                                                                  cfg.output_attentions):
        return False
    return not (torch.is_grad_enabled() and (inputs_embeds.requires_grad or any(
        p.requires_grad for p in model.parameters())))


def talker_model_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                         use_cache=None, **kwargs):
    """``Qwen2_5OmniTalkerModel.forward`` with the decode steps on omni-fast (bound to the module by patch)."""
    cache = pop_cache(kwargs)
    if isinstance(cache, FastTalkerCache):
        return _decode_step(self, cache, input_ids, position_ids, inputs_embeds)
    if inputs_embeds is None and input_ids is not None and cache is not None:
        inputs_embeds = self.embed_tokens(input_ids)
        input_ids = None
    args = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    if not _takes_over(self, cache, inputs_embeds, use_cache, kwargs):
        return self._omni_fast_forward(**with_cache(cache, **args))
    out = self._omni_fast_forward(**with_cache(cache, **args))
    B, S = inputs_embeds.shape[:2]
    mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
    mask = torch.ones(B, S, dtype=torch.long, device=inputs_embeds.device) if mask is None else mask[:, -S:]
    dec = fast_decoder(self)
    fractional = position_ids is not None and position_ids.is_floating_point()
    dec.load_prefill(output_cache(out), mask, max_new_tokens=INITIAL_STEPS, fractional_positions=fractional)
    setattr(out, cache_keyword(), FastTalkerCache(dec, S))  # transformers' KV is dropped: the decoder has a copy
    return out


def _decode_step(model, cache: FastTalkerCache, input_ids, position_ids, inputs_embeds):
    """One token per row on the decoder: ``inputs_embeds [B, 1, H]`` (or ``input_ids [B, 1]``), ``position_ids``
    ``[3, B, 1]`` / ``[B, 1]`` / ``[4, B, 1]`` (transformers' layouts) or None (continue from the cache length)."""
    if inputs_embeds is None:
        inputs_embeds = model.embed_tokens(input_ids)
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[1] != 1:
        raise ValueError(f"inputs_embeds: omni-fast's talker decode takes one token per row after the prefill, got "
                         f"shape {tuple(inputs_embeds.shape)}")
    B = inputs_embeds.shape[0]
    if position_ids is None:
        pos = torch.full((3, B), cache.seen, dtype=torch.long, device=inputs_embeds.device)
    else:
        pos = position_ids[None] if position_ids.dim() == 2 else position_ids
        pos = (pos[1:] if pos.shape[0] == 4 else pos)[..., -1].expand(3, B)
    dec = cache.decoder
    if dec.steps_left < 1:
        dec.reserve(max(cache.seen, INITIAL_STEPS))  # doubling: few re-captures however long generate runs
    _, hidden = dec.step(inputs_embeds[:, 0], pos)
    cache.seen += 1
    return BaseModelOutputWithPast(last_hidden_state=hidden[:, None], **{cache_keyword(): cache})


def install(model: torch.nn.Module, swap_forward, pin) -> str:
    """What :func:`omni_fast.patch` does to a ``Qwen2_5OmniTalkerModel`` (``swap_forward(module, fn)`` /
    ``pin(module)``: patch's own helpers, undone by ``unpatch``); returns the report line."""
    from .. import fast_paths

    swap_forward(model, talker_model_forward)
    pin(model)  # the decoder's ops run on patch(backend=...)
    line = (f"{type(model).__name__}: decode steps after transformers' prefill -> omni_fast.models.MoeTextDecoder "
            "(dense SwiGLU, q/k/v bias, contiguous M-RoPE; one graph replay per token on CUDA)")
    if not fast_paths.enabled("fused_step"):
        return line + "; phase-fused step off (opt-in fast path fused_step)"
    why = fast_decoder(model).fused_fallback  # built now (cached) to say whether the fused step applies
    return line + ("; phase-fused step (fast path fused_step): 3 launches per layer" if why is None
                   else f"; fast path fused_step not applicable, ops path kept: {why}")


__all__ = ["FastTalkerCache", "fast_decoder", "install", "talker_model_forward"]
