"""The Talker side of one audio frame: codebooks 1..15 from the code predictor and the Talker's next input.

transformers (``Qwen3OmniMoeTalkerForConditionalGeneration.prepare_inputs_for_generation``) builds the input of
the Talker's next decode step as

    inputs_embeds = sum_g embed_g(code_g)                        # codebook 0: the Talker's codec embedding
                  + trailing_text_hidden[:, step]   if step < trailing_text_hidden.shape[1]
                  + tts_pad_embed                   otherwise

where ``step`` is the Talker's generation step since prefill (0 for the first decode step).
"""

from __future__ import annotations

import torch

from .._bound import BoundMethod
from ..backend import pinned_backend
from ..validation import REAL_DTYPES, check_positive_int, check_tensor
from .code_predictor import CodePredictor, unsupported_setting
from .._cache_memory import record_copy_use
from .cuda_graphs import key_devices, weights_key  # noqa: F401 (weights_key re-exported: models build their caches on it)


class TalkerStep:
    """Runs the code predictor for a batch of frames and returns the Talker's next ``inputs_embeds``.

    trailing_text_hidden: ``[B, T_text, H]`` (the projected thinker text hidden states after the first token);
    tts_pad_embed: ``[B or 1, 1, H]`` (the projected ``tts_pad`` embedding).
    """

    def __init__(self, code_predictor: CodePredictor, trailing_text_hidden: torch.Tensor,
                 tts_pad_embed: torch.Tensor):
        check_tensor("trailing_text_hidden", trailing_text_hidden, dtypes=REAL_DTYPES, ndim=3)
        B, _, H = trailing_text_hidden.shape
        check_tensor("tts_pad_embed", tts_pad_embed, dtypes=REAL_DTYPES, ndim=3)
        if tts_pad_embed.shape[0] not in (1, B) or tuple(tts_pad_embed.shape[1:]) != (1, H):
            raise ValueError(f"tts_pad_embed must be [B or 1, 1, H] = [{B} or 1, 1, {H}], got "
                             f"{list(tts_pad_embed.shape)}")
        self.code_predictor = code_predictor
        self.trailing_text_hidden = trailing_text_hidden
        self.tts_pad_embed = tts_pad_embed

    def text_term(self, generation_step: int) -> torch.Tensor:
        """``[B or 1, 1, H]``: the trailing text hidden of this step, or ``tts_pad_embed`` past its end."""
        generation_step = check_positive_int("generation_step", generation_step, minimum=0)  # -1 would wrap
        if generation_step < self.trailing_text_hidden.shape[1]:
            return self.trailing_text_hidden[:, generation_step].unsqueeze(1)
        return self.tts_pad_embed

    def next_input(self, codec_sum: torch.Tensor, generation_step: int) -> torch.Tensor:
        """``[B, 1, H]``: ``codec_sum`` ``[B, H]`` (sum of the 16 codebook embeddings) plus the text term."""
        B, _, H = self.trailing_text_hidden.shape
        check_tensor("codec_sum", codec_sum, dtypes=REAL_DTYPES, shape=(B, H))
        return codec_sum.unsqueeze(1) + self.text_term(generation_step).to(codec_sum.device)

    def __call__(self, talker_hidden: torch.Tensor, c0: torch.Tensor, generation_step: int, **sampling):
        """One frame: ``(codes [B, G], inputs_embeds [B, 1, H])`` (``sampling``: predict_frame's keywords)."""
        # codec_sum is never None: the prefill itself embeds c0 (the predictor's codec_embedding or ``c0_embed``
        # in ``sampling``; predict_frame raises before running without either), and the same row is codebook 0 of
        # the sum
        B, _, H = self.trailing_text_hidden.shape
        check_tensor("talker_hidden", talker_hidden, dtypes=REAL_DTYPES, shape=(B, H))
        check_positive_int("generation_step", generation_step, minimum=0)  # before the frame's work
        codes, codec_sum = self.code_predictor.predict_frame(talker_hidden, c0, **sampling)
        return codes, self.next_input(codec_sum, generation_step)


def _fast_code_predictor(talker: torch.nn.Module) -> CodePredictor | None:
    """The talker's :class:`CodePredictor`: the one given to :func:`install_on_talker` (used as it is), else built
    from the talker's current weights (rebuilt when they change), its frame persistent while the ``persistent_mtp``
    fast path is on (:mod:`omni_fast.fast_paths`; read per frame, so switching it applies to the next frame).
    None while weights it would copy are offloaded by device_map (CPU / disk: on meta outside their modules' own
    hooked forwards; copying them raised 'Cannot copy out of meta tensor'), or while its config asks for what
    :class:`CodePredictor` does not compute (:func:`~omni_fast.models.code_predictor.unsupported_setting`):
    transformers' code predictor runs."""
    fixed = talker.__dict__.get("_omni_fast_cp_fixed")
    if fixed is not None:
        return fixed
    key = weights_key(talker.code_predictor, talker.get_input_embeddings())
    cached = talker.__dict__.get("_omni_fast_cp_cache")
    if cached is None or cached[0] != key:
        if torch.device("meta") in key_devices(key):
            return None  # (checked on a rebuild only: offloaded weights are new tensors at every load)
        if unsupported_setting(talker.code_predictor.config) is not None:
            return None  # (a config setting it would not compute as transformers does)
        cached = (key, CodePredictor.from_transformers(talker.code_predictor, talker.get_input_embeddings()))
        talker.__dict__["_omni_fast_cp_cache"] = cached
    record_copy_use(cached[1], cached[1].norm.device)  # (a hot swap may drop it while this stream still reads it)
    return follow_fast_paths(cached[1])


def follow_fast_paths(cp: CodePredictor) -> CodePredictor:
    """``cp`` with its ``persistent`` setting from the ``persistent_mtp`` fast path, unless ``cp`` has its own
    (``CodePredictor(persistent=True/False)`` or ``cp.persistent = ...``: the object's explicit setting wins; see
    :attr:`CodePredictor.persistent`). The persistent frames and captured graphs are cached per setting: nothing is
    rebuilt when it flips back."""
    return cp.follow_fast_path()


def _prepare_inputs_with_fast_mtp(self, input_ids, attention_mask=None, inputs_embeds=None, is_first_iteration=False,
                                  **kwargs):
    """transformers' ``prepare_inputs_for_generation`` of the talker with the per-frame code predictor on omni-fast.

    Bound to the talker instance (:class:`omni_fast._bound.BoundMethod`: a deep copy of the talker re-binds to the
    copy, and a pickled talker loads back). The cache arrives in ``kwargs`` under the installed release's name
    (``cache`` from 5.24, ``past_key_values`` before) and goes on as given. ``inputs_embeds`` stays a named
    parameter: ``generate`` inspects the signature for it (BoundMethod presents this function's signature).
    """
    named = dict(attention_mask=attention_mask, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration)
    cp = None if is_first_iteration or not kwargs.get("use_cache", True) else _fast_code_predictor(self)
    if cp is None:
        return type(self).prepare_inputs_for_generation(self, input_ids, **named, **kwargs)
    hidden_states = kwargs.pop("hidden_states", None)
    inputs = super(type(self), self).prepare_inputs_for_generation(input_ids, **named, **kwargs)
    last_ids = input_ids[:, -1]
    past_hidden = hidden_states[0][-1][:, -1]  # last layer, last token
    gen = self.code_predictor.generation_config
    # transformers passes top_k=50, top_p=0.8 when sampling; other fields (temperature) come from the config.
    codes, codec_sum = cp.predict_frame(past_hidden.to(cp.table.device), last_ids.to(cp.table.device),
                                        do_sample=bool(gen.do_sample), top_k=50, top_p=0.8,
                                        temperature=float(getattr(gen, "temperature", None) or 1.0),
                                        backend=pinned_backend(self))  # patch(backend=...)
    step = TalkerStep(cp, kwargs["trailing_text_hidden"], kwargs["tts_pad_embed"])
    embeds = step.next_input(codec_sum, kwargs.get("generation_step"))
    inputs["inputs_embeds"] = embeds.to(past_hidden.device)
    inputs["residual_codes"] = codes.to(input_ids.device)
    return inputs


def install_on_talker(talker: torch.nn.Module, code_predictor: CodePredictor | None = None) -> CodePredictor:
    """Make a transformers ``Qwen3OmniMoeTalkerForConditionalGeneration`` run its per-frame code predictor on
    omni-fast: ``talker.prepare_inputs_for_generation`` is replaced (on this instance) by one that calls
    :meth:`CodePredictor.predict_frame` (one graph replay on CUDA) instead of ``code_predictor.generate``, and builds
    ``inputs_embeds`` / ``residual_codes`` exactly as transformers does. Greedy decoding gives identical results;
    sampling draws from the same distribution with omni-fast's RNG (a fresh seed per frame from torch's generator).
    Without ``code_predictor`` it is built from the talker's weights, and rebuilt whenever they change (``.to()``,
    ``load_state_dict``). Returns the :class:`CodePredictor` in use now (None while the talker's code predictor is
    offloaded by device_map: transformers' runs then).
    """
    talker.__dict__["_omni_fast_cp_fixed"] = code_predictor
    talker.prepare_inputs_for_generation = BoundMethod(_prepare_inputs_with_fast_mtp, talker)  # picklable
    return _fast_code_predictor(talker)
