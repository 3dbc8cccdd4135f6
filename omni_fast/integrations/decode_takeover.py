"""Decode takeover: a transformers text model's ``generate`` decode steps on omni-fast's
:class:`~omni_fast.models.MoeTextDecoder` (what :func:`omni_fast.patch` swaps into the text models below).

transformers' ``generate`` runs a text model once per token: a causal mask, a ``DynamicCache`` update and every
decoder layer with Python between the kernels. The swapped ``forward`` of the text model lets transformers run the
prefill (its attention and MoE already on omni-fast's kernels; DeepStack rows included), then hands the prefill's KV
to a :class:`~omni_fast.models.MoeTextDecoder` built from the same weights. Every decode step after that is one
:meth:`~omni_fast.models.MoeTextDecoder.step`: one CUDA-graph replay on CUDA, three launches per layer with the
opt-in ``fused_step`` fast path (where the decoder supports it: MoE layers, float experts, no attention biases).

One mechanism, the per-family differences as data (:class:`Family`, :data:`FAMILIES`):

- ``Qwen2_5OmniTalkerModel`` (Qwen2.5-Omni's talker text model): dense SwiGLU, q/k/v bias, no q/k norm, contiguous
  M-RoPE; the fused step does not apply (dense layers). Asked for hidden states, it falls back.
- ``Qwen3OmniMoeTalkerModel`` (Qwen3-Omni's talker text model): MoE with the sigmoid-gated shared expert, q/k
  RMSNorm, interleaved M-RoPE. Its ``generate`` asks every step for hidden states and reads ``hidden_states[-1]``
  (the final-norm output, tied to ``last_hidden_state``) as the code predictor's input.
- ``Qwen3OmniMoeThinkerTextModel`` (Qwen3-Omni's thinker text model, under ``Qwen3OmniMoeThinkerModel``, which
  keeps its embeddings, ``rope_deltas`` and positions). When ``generate`` speaks it asks the thinker for every
  step's hidden states and builds the talker's input from entries 0 (the input embeddings) and
  ``accept_hidden_layer`` (a middle layer's output).

Hidden states: a decode step asked for them returns transformers' layout (N + 1 entries) with the entries
:func:`answered_hidden_states` names and None for the others (transformers' convention for unselected layers):
entry 0 and N are free, each middle layer output costs one ``[B, H]`` copy per step in the captured step
(``MoeTextDecoder.record_layers``), so only the one the talker reads is kept when patch sees the whole model
(every layer for a thinker patched alone). A request (``output_hidden_states=[...]``) for an entry not kept, at the
prefill, keeps transformers' forward for the whole generation.

transformers carries the cache between the steps; once the decoder holds the KV, the cache it carries is a
:class:`FastTalkerCache` (the decoder and the number of tokens seen, padding included as in a ``DynamicCache``: the
outer forward builds the decode positions from ``get_seq_length()``). The heads, projections and positions stay
transformers' own code (the outer ``*ForConditionalGeneration.forward`` is not replaced).

transformers' forward runs instead (and keeps its own cache) when: no cache object is passed in (a plain forward),
the cache passed in already holds tokens (a continued prompt) or is not a ``DynamicCache`` / ``StaticCache``,
``use_cache=False``, attentions or router logits are asked for, hidden states are asked for that the family does not
keep (above), autograd is recording, the text model has sliding-window layers (``layer_types`` other than
"full_attention": the decoder attends to the whole cache), or the text model's weights are on several devices (transformers'
``device_map="auto"`` splitting the thinker's layers over two GPUs: the decoder keeps one static KV cache and one
graph per step on one device; patch's report says so). A text model on one device that is not the current one is
taken over: the decoder captures and replays on its own device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._cache_memory import record_copy_use
from .._device import devices_of
from ..backend import pinned_backend
from ..validation import records_grad
from .hf_compat import cache_keyword, carries_paged_cache, output_cache, pop_cache, with_cache

INITIAL_STEPS = 512  # decode room at the prefill; doubled (one re-capture) whenever generate runs past it
DECODER_ATTR = "_omni_fast_talker_decoder"  # (key, leased decoders) cached on the text model (unpatch drops it)


@dataclass(frozen=True)
class Family:
    """What differs between the text models the takeover serves.

    ``words``: the report's description of the decoder it builds; ``answers_hidden_states``: whether decode steps
    asked for ``output_hidden_states`` answer (with the entries :func:`answered_hidden_states` names, the rest
    None) instead of falling back to transformers' forward."""

    words: str
    answers_hidden_states: bool


FAMILIES = {
    "Qwen2_5OmniTalkerModel": Family("dense SwiGLU, q/k/v bias, contiguous M-RoPE", answers_hidden_states=False),
    "Qwen3OmniMoeTalkerModel": Family("MoE + sigmoid-gated shared expert, q/k norm, interleaved M-RoPE",
                                      answers_hidden_states=True),
    "Qwen3OmniMoeThinkerTextModel": Family("MoE, q/k norm, interleaved M-RoPE", answers_hidden_states=True),
}
HIDDEN_ATTR = "_omni_fast_hidden_layers"  # set by install: the layer outputs a family's decode steps record


class FastTalkerCache:
    """The KV cache once omni-fast's decoder holds it: ``get_seq_length()`` counts the prompt and every decode step,
    as transformers' ``DynamicCache`` would (the outer talker forward builds the positions from it)."""

    is_compileable = False
    is_croppable = True  # crop() rewinds the decoder: assisted decoding drops rejected candidates with it

    def __init__(self, decoder, seq_length: int, lease=None):
        # lease: held while this cache lives, so no other generate (another thread's, or one run between this
        # one's steps) is handed the same decoder and overwrites its KV (fast_decoder)
        self.decoder, self.seen, self.lease = decoder, int(seq_length), lease

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: each row continues from row ``beam_idx[b]`` (``DynamicCache.reorder_cache``'s contract)."""
        self.decoder.reorder_rows(beam_idx)

    def crop(self, max_length: int) -> None:
        """As ``DynamicCache.crop``: negative drops ``-max_length`` tokens, 0 drops none (transformers >= 5.24 passes
        ``-tokens_to_remove``, 0 when assisted decoding accepted every candidate), positive keeps the first
        ``max_length`` (older releases)."""
        keep = max_length if max_length > 0 else self.seen + max_length
        if 0 <= keep < self.seen:
            self.decoder.rewind(self.seen - keep)
            self.seen = keep

    def __repr__(self) -> str:
        return f"FastTalkerCache(seen={self.seen})"


class _Leased(list):
    """The decoders of :func:`fast_decoder`: ``[[decoder, weakref to its lease], ...]``. Pickles and deep-copies as
    none (a weakref cannot be pickled, and a copy of the model builds decoders of its own weights when used)."""

    def __reduce__(self):
        return _Leased, ()


def fast_decoder(model: torch.nn.Module, lease=None):
    """A :class:`MoeTextDecoder` of a text model in :data:`FAMILIES`, built from its current weights (no head: the
    outer model applies ``codec_head`` / ``lm_head``), recording the layer outputs :func:`answered_hidden_states`
    names, and rebuilt when the weights change (``.to()``, ``load_state_dict``) or the ``fused_step`` /
    ``fused_pdl`` fast paths are switched (:func:`~omni_fast.models.text_decoder.opt_in_decoder`: the phase-fused
    step only where the decoder supports it).

    ``lease`` (a :class:`~omni_fast.pipeline.device.Lease` a generate's cache holds): a decoder no live generate
    holds, now leased to it (:func:`~omni_fast.pipeline.device.lease_from`: generates of several threads, or one
    run between another's steps, each get their own KV cache; decoders keep their graphs between generates) and
    recorded on the current stream (a swap drops the old weights' decoders while a generate of another thread may
    still read its own). None: the first decoder (built if there is none), e.g. to look at it."""
    from .. import fast_paths
    from ..models.cuda_graphs import weights_key
    from ..models.text_decoder import opt_in_decoder
    from ..pipeline.device import Lease, lease_from

    record = frozenset(i for i in answered_hidden_states(model) if 0 < i < len(model.layers))
    key = (weights_key(model), fast_paths.enabled("fused_step"), fast_paths.enabled("fused_pdl"), record)
    cached = model.__dict__.get(DECODER_ATTR)
    if cached is None or cached[0] != key:
        cached = model.__dict__[DECODER_ATTR] = (key, _Leased())  # [[decoder, weakref to its lease], ...]
    entries = cached[1]
    if lease is None and entries:
        record_copy_use(entries[0][0], entries[0][0].device)  # (as a lease records it: lease_from)
        return entries[0][0]

    def build():
        dec = opt_in_decoder(model, None, backend=pinned_backend(model))
        dec.record_layers = record
        return dec

    return lease_from(entries, Lease() if lease is None else lease, build)  # (a fresh Lease ends at once)


def prefill_forward(model: torch.nn.Module):
    """What runs a prefill on ``model`` without the takeover: transformers' forward (with the patched kernels) when
    patch swapped the takeover in, else the module itself. For callers with their own decoder (the pipeline), which
    load the KV of a transformers cache themselves."""
    return model.__dict__.get("_omni_fast_forward", model) if type(model).__name__ in FAMILIES else model


def _family(model) -> Family:
    return FAMILIES[type(model).__name__]


def answered_hidden_states(model) -> frozenset[int]:
    """The ``hidden_states`` indices the decode steps of ``model`` return (empty: the family answers none).

    0 (the step's input embeddings) and N (the final-norm output, transformers' tied last entry) cost nothing; the
    layer outputs in between are copied every step, so only those :func:`install` chose are kept: none for the
    talker (its generate reads ``hidden_states[-1]``), the talker's ``accept_hidden_layer`` for the thinker of a
    whole Qwen3-Omni model (its generate reads entries 0 and ``accept_hidden_layer``), every layer for a thinker
    patched alone (its ``accept_hidden_layer`` is in the talker's config)."""
    if not _family(model).answers_hidden_states:
        return frozenset()
    return frozenset({0, len(model.layers)}) | frozenset(model.__dict__.get(HIDDEN_ATTR, ()))


def _hidden_request(model, kwargs) -> frozenset[int] | str | None:
    """None (not asked), the indices to answer, or ``"refuse"`` (asked for what the decode steps do not keep)."""
    asked = kwargs.get("output_hidden_states", model.config.output_hidden_states)
    if asked is None or asked is False:
        return None
    answered = answered_hidden_states(model)
    if not answered:
        return "refuse"
    if asked is True:
        return answered
    n = len(model.layers) + 1  # the input embeddings, then every layer's output
    picks = [asked] if isinstance(asked, int) else list(asked)
    if not picks or not all(isinstance(i, int) and -n <= i < n for i in picks):
        return "refuse"
    picks = frozenset(i % n for i in picks)
    return picks if picks <= answered else "refuse"


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
    if _hidden_request(model, kwargs) == "refuse":
        return False
    if len(devices_of(model)) > 1:  # a device_map split: transformers' decode (and accelerate's hooks) move data
        return False
    if not_computed(model):  # sliding windows, another activation (MoeTextDecoder.from_transformers refuses them)
        return False
    return not records_grad(inputs_embeds, module=model)


def not_computed(model) -> str | None:
    """What of the text model's config :class:`MoeTextDecoder` does not compute, or None: sliding-window layers
    (Qwen2.5-Omni's talker with ``use_sliding_window``; it attends to the whole cache) or an MLP / expert activation
    other than SiLU. Such a model keeps transformers' decode."""
    types = list(getattr(model.config, "layer_types", None) or ())
    if any(t != "full_attention" for t in types):
        return f"sliding-window layers (layer_types {types}; MoeTextDecoder attends to the whole cache)"
    act = getattr(model.config, "hidden_act", "silu")
    if act != "silu":
        return f"hidden_act {act!r} (MoeTextDecoder's MLPs and experts are SiLU SwiGLU)"
    return None


def text_model_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                       use_cache=None, **kwargs):
    """The text model's ``forward`` with the decode steps on omni-fast (bound to the module by patch)."""
    if carries_paged_cache(kwargs):
        # continuous batching (generate_batch): transformers' forward with the keywords as they came (5.17 hands
        # the paged cache on as ``cache=`` for the attention function, beside ``past_key_values=None``)
        return self._omni_fast_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
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
    from ..pipeline.device import Lease

    lease = Lease()
    dec = fast_decoder(self, lease)
    fractional = position_ids is not None and position_ids.is_floating_point()
    dec.load_prefill(output_cache(out), mask, max_new_tokens=INITIAL_STEPS, fractional_positions=fractional)
    # transformers' KV is dropped: the decoder has a copy (its own while this cache lives)
    setattr(out, cache_keyword(), FastTalkerCache(dec, S, lease))
    return out


def _decode_step(model, cache: FastTalkerCache, input_ids, position_ids, inputs_embeds, kwargs=None):
    """``T`` tokens per row, one decoder step each (``T`` 1, or the candidates of assisted decoding):
    ``inputs_embeds [B, T, H]`` (or ``input_ids [B, T]``), ``position_ids`` ``[3, B, T]`` / ``[B, T]`` /
    ``[4, B, T]`` (transformers' layouts) or None (continue from the cache length)."""
    if inputs_embeds is None:
        inputs_embeds = model.get_input_embeddings()(input_ids)
    asked = _hidden_request(model, kwargs or {})
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[1] < 1 or (
            inputs_embeds.shape[1] > 1 and isinstance(asked, frozenset)):
        raise ValueError(f"inputs_embeds: omni-fast's decode takeover takes [B, T, H] tokens after the prefill (one "
                         f"when hidden states are asked for), got shape {tuple(inputs_embeds.shape)} (pass a fresh "
                         f"cache, or omni_fast.unpatch the model)")
    B, T = inputs_embeds.shape[:2]
    if position_ids is None:
        pos = torch.arange(cache.seen, cache.seen + T, device=inputs_embeds.device).expand(3, B, T)  # one launch
    else:
        pos = position_ids[None] if position_ids.dim() == 2 else position_ids
        pos = (pos[1:] if pos.shape[0] == 4 else pos)[..., -T:].expand(3, B, T)
    dec = cache.decoder
    if dec.steps_left < T:
        dec.reserve(max(cache.seen, INITIAL_STEPS, T))  # doubling: few re-captures however long generate runs
    # a generate (the Qwen2.5 pipeline's talker) resumed on another stream than its prefill's: recorded there too
    # (once per stream; later steps one set check), a swap may drop the decoder while these steps are queued
    record_copy_use(dec, dec.device)
    steps = [dec.step(inputs_embeds[:, t], pos[..., t])[1] for t in range(T)]
    # (one token, the every-step case: a view, no copy; the candidates of assisted decoding: stacked)
    hidden = steps[0][:, None] if T == 1 else torch.stack(steps, dim=1)
    cache.seen += T
    extra = {}
    if isinstance(asked, frozenset):  # transformers' layout: N + 1 entries, None where not kept
        n = len(model.layers)
        extra["hidden_states"] = tuple(
            None if i not in asked else inputs_embeds if i == 0 else hidden if i == n else dec.recorded(i)[:, None]
            for i in range(n + 1))
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return BaseModelOutputWithPast(last_hidden_state=hidden, **extra, **{cache_keyword(): cache})


def install(model: torch.nn.Module, swap_forward, pin, root: torch.nn.Module | None = None) -> str:
    """What :func:`omni_fast.patch` does to a text model in :data:`FAMILIES` (``swap_forward(module, fn)`` /
    ``pin(module)``: patch's own helpers, undone by ``unpatch``; ``root``: the model being patched, whose talker
    config names the thinker layer the talker reads); returns the report line."""
    from .. import fast_paths

    swap_forward(model, text_model_forward)
    pin(model)  # the decoder's ops run on patch(backend=...)
    n = len(model.layers)
    if type(model).__name__ == "Qwen3OmniMoeThinkerTextModel":
        accept = getattr(getattr(getattr(root, "config", None), "talker_config", None), "accept_hidden_layer", None)
        model.__dict__[HIDDEN_ATTR] = tuple(range(1, n)) if accept is None else (int(accept) % (n + 1),)
    kept = sorted(answered_hidden_states(model))
    hidden = ("" if not kept else "; hidden states " + ("all" if len(kept) == n + 1 else ", ".join(map(str, kept)))
              + " per step")
    line = (f"{type(model).__name__}: decode steps after transformers' prefill -> omni_fast.models.MoeTextDecoder "
            f"({_family(model).words}{hidden}; one graph replay per token on CUDA)")
    if not_computed(model):
        return f"{type(model).__name__}: decode steps stay on transformers: {not_computed(model)}"
    devices = devices_of(model)
    if len(devices) > 1:
        return (f"{type(model).__name__}: decode steps stay on transformers while its weights are on several "
                f"devices ({', '.join(map(str, devices))}: MoeTextDecoder runs on one)")
    if not fast_paths.enabled("fused_step"):
        return line + "; phase-fused step off (opt-in fast path fused_step)"
    why = fast_decoder(model).fused_fallback  # built now (cached) to say whether the fused step applies
    return line + ("; phase-fused step (fast path fused_step): 3 launches per layer" if why is None
                   else f"; fast path fused_step not applicable, ops path kept: {why}")


__all__ = ["DECODER_ATTR", "FAMILIES", "Family", "FastTalkerCache", "HIDDEN_ATTR", "INITIAL_STEPS",
           "answered_hidden_states", "fast_decoder", "install", "prefill_forward", "text_model_forward"]
