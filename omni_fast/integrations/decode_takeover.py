"""Decode takeover: a transformers text model's ``generate`` decode steps on omni-fast's
:class:`~omni_fast.models.MoeTextDecoder` (what :func:`omni_fast.patch` swaps into the talkers' text models).

transformers' ``generate`` runs a text model once per token: a causal mask, a ``DynamicCache`` update and every
decoder layer with Python between the kernels. The swapped ``forward`` of the text model lets transformers run the
prefill (its attention and MoE already on omni-fast's kernels), then hands the prefill's KV to a
:class:`~omni_fast.models.MoeTextDecoder` built from the same weights. Every decode step after that is one
:meth:`~omni_fast.models.MoeTextDecoder.step`: one CUDA-graph replay on CUDA, three launches per layer with the
opt-in ``fused_step`` fast path (where the decoder supports it: MoE layers, no attention biases).

One mechanism, the per-family differences as data (:class:`Family`, :data:`FAMILIES`):

- ``Qwen2_5OmniTalkerModel`` (Qwen2.5-Omni's talker text model): dense SwiGLU, q/k/v bias, no q/k norm, contiguous
  M-RoPE; the fused step does not apply (dense layers).
- ``Qwen3OmniMoeTalkerModel`` (Qwen3-Omni's talker text model): MoE with the sigmoid-gated shared expert, q/k
  RMSNorm, interleaved M-RoPE; the fused step applies. Its ``generate`` asks every step for hidden states
  (``output_hidden_states=True``) and reads only the last entry (``hidden_states[-1]``: the final-norm output,
  transformers ties it to ``last_hidden_state``) as the code predictor's input. The decode steps answer with that
  entry and ``None`` for the others (transformers' convention for unselected layers): the per-layer residuals would
  cost one copy per layer per step, and nothing in the talker's ``generate`` reads them. A selection
  (``output_hidden_states=[...]``) of anything but the last entry keeps transformers' forward.

transformers carries the cache between the steps; once the decoder holds the KV, the cache it carries is a
:class:`FastTalkerCache` (the decoder and the number of tokens seen, padding included as in a ``DynamicCache``: the
outer talker forward builds the decode positions from ``get_seq_length()``). The codec head, the projections and
the positions stay transformers' own code (the outer ``*TalkerForConditionalGeneration.forward`` is not replaced).

transformers' forward runs instead (and keeps its own cache) when: no cache object is passed in (a plain forward),
the cache passed in already holds tokens (a continued prompt) or is not a ``DynamicCache`` / ``StaticCache``,
``use_cache=False``, attentions or router logits are asked for, hidden states are asked for from a family that does
not answer them (Qwen2.5) or beyond the last entry, deepstack visual embeddings are passed, or autograd is
recording.

The Qwen3-Omni THINKER is not taken over (its decode stays on transformers' per-op path, patched kernels): see
:data:`THINKER_NOT_TAKEN_OVER`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backend import pinned_backend
from .hf_compat import cache_keyword, output_cache, pop_cache, with_cache

INITIAL_STEPS = 512  # decode room at the prefill; doubled (one re-capture) whenever generate runs past it
DECODER_ATTR = "_omni_fast_talker_decoder"  # (key, MoeTextDecoder) cached on the text model (unpatch drops it)

THINKER_NOT_TAKEN_OVER = (
    "Qwen3-Omni's thinker decode stays on transformers' per-op path (its attention, RoPE and experts on omni-fast "
    "kernels): when generate speaks (return_audio) it asks the thinker for every step's hidden states and builds "
    "the talker's input from entry 0 (the input embeddings) and entry accept_hidden_layer (a middle layer's "
    "residual), which the decoder's step does not return yet (it would record those two per step in its static "
    "buffers); and its forward sits under Qwen3OmniMoeThinkerModel, whose rope_deltas / deepstack bookkeeping the "
    "takeover would have to mirror. The pipeline (omni_fast.models.Qwen3Omni) runs the thinker on the decoder.")


@dataclass(frozen=True)
class Family:
    """What differs between the text models the takeover serves.

    ``words``: the report's description of the decoder it builds; ``answers_hidden_states``: whether decode steps
    asked for ``output_hidden_states`` answer with the last entry (the rest None) instead of falling back."""

    words: str
    answers_hidden_states: bool


FAMILIES = {
    "Qwen2_5OmniTalkerModel": Family("dense SwiGLU, q/k/v bias, contiguous M-RoPE", answers_hidden_states=False),
    "Qwen3OmniMoeTalkerModel": Family("MoE + sigmoid-gated shared expert, q/k norm, interleaved M-RoPE; hidden "
                                      "states: the last entry (what generate reads)", answers_hidden_states=True),
}


class FastTalkerCache:
    """The KV cache once omni-fast's decoder holds it: ``get_seq_length()`` counts the prompt and every decode step,
    as transformers' ``DynamicCache`` would (the outer talker forward builds the positions from it)."""

    is_compileable = False

    def __init__(self, decoder, seq_length: int):
        self.decoder, self.seen = decoder, int(seq_length)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def __repr__(self) -> str:
        return f"FastTalkerCache(seen={self.seen})"


def fast_decoder(model: torch.nn.Module):
    """The :class:`MoeTextDecoder` of a text model in :data:`FAMILIES`, built from its current weights (no head: the
    outer talker applies ``codec_head``) and rebuilt when they change (``.to()``, ``load_state_dict``) or the
    ``fused_step`` / ``fused_pdl`` fast paths are switched (:func:`~omni_fast.models.text_decoder.opt_in_decoder`:
    the phase-fused step only where the decoder supports it)."""
    from .. import fast_paths
    from ..models.cuda_graphs import weights_key
    from ..models.text_decoder import opt_in_decoder

    key = (weights_key(model), fast_paths.enabled("fused_step"), fast_paths.enabled("fused_pdl"))
    cached = model.__dict__.get(DECODER_ATTR)
    if cached is None or cached[0] != key:
        cached = (key, opt_in_decoder(model, None, backend=pinned_backend(model)))
        model.__dict__[DECODER_ATTR] = cached
    return cached[1]


def prefill_forward(model: torch.nn.Module):
    """What runs a prefill on ``model`` without the takeover: transformers' forward (with the patched kernels) when
    patch swapped the takeover in, else the module itself. For callers with their own decoder (the pipeline), which
    load the KV of a transformers cache themselves."""
    return model.__dict__.get("_omni_fast_forward", model) if type(model).__name__ in FAMILIES else model


def _family(model) -> Family:
    return FAMILIES[type(model).__name__]


def _hidden_request(model, kwargs) -> str | None:
    """None (not asked), ``"last"`` (asked, and the family answers with the last entry) or ``"refuse"``."""
    asked = kwargs.get("output_hidden_states", model.config.output_hidden_states)
    if asked is None or asked is False:
        return None
    if not _family(model).answers_hidden_states:
        return "refuse"
    if asked is True:
        return "last"
    n = len(model.layers) + 1  # the input embeddings, then every layer's output
    picks = [asked] if isinstance(asked, int) else list(asked)
    return "last" if picks and all(isinstance(i, int) and i % n == n - 1 for i in picks) else "refuse"


def _takes_over(model, cache, inputs_embeds, use_cache, kwargs) -> bool:
    """Whether this prefill's KV goes to omni-fast's decoder (see the module docstring for when it does not)."""
    if cache is None or use_cache is False or inputs_embeds is None or not hasattr(cache, "get_seq_length"):
        return False
    if cache.get_seq_length() != 0 or type(cache).__name__ not in ("DynamicCache", "StaticCache"):
        return False
    cfg = model.config
    if kwargs.get("output_attentions", cfg.output_attentions) or kwargs.get(
            "output_router_logits", getattr(cfg, "output_router_logits", False)):
        return False
    if _hidden_request(model, kwargs) == "refuse" or kwargs.get("deepstack_visual_embeds") is not None:
        return False
    return not (torch.is_grad_enabled() and (inputs_embeds.requires_grad or any(
        p.requires_grad for p in model.parameters())))


def text_model_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                       use_cache=None, **kwargs):
    """The text model's ``forward`` with the decode steps on omni-fast (bound to the module by patch)."""
    cache = pop_cache(kwargs)
    if isinstance(cache, FastTalkerCache):
        return _decode_step(self, cache, input_ids, position_ids, inputs_embeds, kwargs)
    if inputs_embeds is None and input_ids is not None and cache is not None:
        inputs_embeds = self.get_input_embeddings()(input_ids)
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


def _decode_step(model, cache: FastTalkerCache, input_ids, position_ids, inputs_embeds, kwargs=None):
    """One token per row: ``inputs_embeds [B, 1, H]`` (or ``input_ids [B, 1]``), ``position_ids`` ``[3, B, 1]`` /
    ``[B, 1]`` / ``[4, B, 1]`` (transformers' layouts) or None (continue from the cache length)."""
    if inputs_embeds is None:
        inputs_embeds = model.get_input_embeddings()(input_ids)
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[1] != 1:
        raise ValueError(f"inputs_embeds: omni-fast's decode takeover takes one token per row after the prefill, "
                         f"got shape {tuple(inputs_embeds.shape)}")
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
    hidden = hidden[:, None]
    extra = {}
    if _hidden_request(model, kwargs or {}) == "last":  # the tied last entry; the per-layer ones are not kept
        extra["hidden_states"] = (None,) * len(model.layers) + (hidden,)
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return BaseModelOutputWithPast(last_hidden_state=hidden, **extra, **{cache_keyword(): cache})


def install(model: torch.nn.Module, swap_forward, pin) -> str:
    """What :func:`omni_fast.patch` does to a text model in :data:`FAMILIES` (``swap_forward(module, fn)`` /
    ``pin(module)``: patch's own helpers, undone by ``unpatch``); returns the report line."""
    from .. import fast_paths

    swap_forward(model, text_model_forward)
    pin(model)  # the decoder's ops run on patch(backend=...)
    line = (f"{type(model).__name__}: decode steps after transformers' prefill -> omni_fast.models.MoeTextDecoder "
            f"({_family(model).words}; one graph replay per token on CUDA)")
    if not fast_paths.enabled("fused_step"):
        return line + "; phase-fused step off (opt-in fast path fused_step)"
    why = fast_decoder(model).fused_fallback  # built now (cached) to say whether the fused step applies
    return line + ("; phase-fused step (fast path fused_step): 3 launches per layer" if why is None
                   else f"; fast path fused_step not applicable, ops path kept: {why}")


__all__ = ["DECODER_ATTR", "FAMILIES", "Family", "FastTalkerCache", "INITIAL_STEPS", "THINKER_NOT_TAKEN_OVER",
           "fast_decoder", "install", "prefill_forward", "text_model_forward"]
