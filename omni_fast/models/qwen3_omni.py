"""A thin streaming Qwen3-Omni pipeline on transformers' modules, patched with omni-fast kernels.

``Qwen3Omni`` runs thinker -> talker -> MTP code predictor -> streaming Code2Wav with its own loops (no
``generate``), so text deltas and audio chunks come out as soon as they exist: the talker starts right after the
thinker's first token (it needs only the prompt's hidden states and the *embeddings* of the text tokens, one per
talker step), every codec frame goes through the MTP step at once, and Code2Wav decodes a first small chunk then
larger ones with left context. A batch of requests runs together (left padding; finished rows idle on pad
tokens, as transformers does).

Semantics are transformers' ``Qwen3OmniMoeForConditionalGeneration.generate``: with greedy decoding, no repetition
penalty and one 300-frame codec chunk, the text ids, codes and waveform are the same (``tests/test_pipeline.py``).

Decode: patched on CUDA (``graph_decode``), each thinker and talker decode step is one CUDA-graph replay of
:class:`~omni_fast.models.text_decoder.MoeTextDecoder` (its own static KV cache, taken over from transformers'
prefill; omni-fast ops; no host sync inside the step); otherwise the step goes through transformers' text models.
Prefill always runs on transformers' (patched) modules.

Timings per request use the technical report's terms, with each request's own clocks (see :class:`RequestTiming`);
on a GPU every stage boundary synchronises the device so that the numbers are stage times, not launch times.
Requests and arguments are validated before any work (clear errors naming ``requests[i].<field>``). A checkpoint
without a talker (``enable_audio_output=False``) streams text only.

The loop itself is model-family independent: :mod:`omni_fast.pipeline` holds the requests and timing, the
streaming scheduler and one stage adapter per family (here :class:`omni_fast.pipeline.qwen3.Qwen3Stages`); this
module keeps the Qwen3-Omni pipeline object (construction, patching, checkpoint loading).

Not done yet (see docs/pipeline.md): while the talker runs, the host reads each step's text ids and codec id
(streaming, stopping, the talker's next text input) and synchronises for the stage timings (only the text after
the speech budget is read one step behind the device); continuous batching.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch

from ..pipeline.device import resumed_in_order
from ..pipeline.qwen3 import Qwen3Stages
from ..pipeline.requests import ByteTokenizer, Event, Request, make_sampler
from ..pipeline.scheduler import StreamOptions, StreamRun
from ..validation import check_bool, check_device, check_positive_int
from .code_predictor import unsupported_setting
from .components import HFCode2Wav, HFCodePredictor, OmniCodePredictor, pick
from .positions import PositionSpec
from .quantized import load_quantized, read_quantization_config
from .request_checks import checked_generate, checked_stream


_PIPELINES = {"Qwen3OmniMoeForConditionalGeneration": "Qwen3Omni", "Qwen2_5OmniForConditionalGeneration": "Qwen25Omni"}


def check_pipeline_model(model, expected: str):
    """``model`` is transformers' whole ``expected`` model (or a subclass): TypeError naming model and what to use
    (a part, the other family's model, a checkpoint path) instead of an AttributeError deep in a constructor.
    Returns the model, unwrapped from a ``torch.compile`` wrapper (the pipeline drives the model's parts itself, so
    the wrapper's compiled forward would never run)."""
    while isinstance(model, torch.nn.Module) and isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model._orig_mod
    if any(c.__name__ == expected for c in type(model).__mro__):
        return model
    pipeline = _PIPELINES[expected]
    other = next((p for c in type(model).__mro__ for n, p in _PIPELINES.items() if c.__name__ == n), None)
    hint = (f"a path: use {pipeline}.from_pretrained(path)" if isinstance(model, (str, os.PathLike))
            else f"this model is {other}'s: use {other}(model)" if other is not None
            else "a part alone is not enough; omni_fast.patch(part) runs a part on omni-fast kernels")
    raise TypeError(f"model must be a transformers {expected} (thinker, talker and vocoder), got "
                    f"{type(model).__name__} ({hint})")


class Qwen3Omni:
    """Thinker -> talker -> MTP -> streaming Code2Wav for a transformers ``Qwen3OmniMoeForConditionalGeneration``.

    ``patch``: swap omni-fast kernels in with :func:`omni_fast.patch` (``backend`` pins their backend).
    """

    def __init__(self, model, *, patch: bool = True, backend: str | None = None, tokenizer=None):
        model = check_pipeline_model(model, "Qwen3OmniMoeForConditionalGeneration")
        self.model = model.eval()
        self.config = model.config
        self.device = next(model.parameters()).device
        self.backend = backend
        # "thinker"/"talker" -> (weights key, [[MoeTextDecoder, weakref to the _Lease of the stream using it]])
        self._decoders: dict[str, tuple] = {}
        # (Code2Wav, {batch size: [[Code2WavStream, weakref to the _Lease of the stream using it]]})
        self._codec_streams = None
        self._fast_stages = None  # (weights key, OmniCodePredictor, Code2Wav): rebuilt when the weights change
        thinker_cfg = self.config.thinker_config
        self.spec = PositionSpec.from_config(thinker_cfg)
        self.tokenizer = tokenizer
        # "\n" (one token in Qwen's vocabulary: 198); a tokenizer, when given, says which id it is
        vocab = thinker_cfg.text_config.vocab_size
        self.newline_id = next(iter(tokenizer.encode("\n")), None) if tokenizer is not None else None
        if self.newline_id is None:
            self.newline_id = 198 if vocab > 198 else 10
        self.patch_report = None
        # A checkpoint saved with enable_audio_output=False has no talker and no Code2Wav: text only (no audio
        # events; the timing's audio fields stay empty).
        self.has_talker = bool(getattr(model, "has_talker", True)) and hasattr(model, "talker") \
            and hasattr(model, "code2wav")
        # the re-decoding codec (transformers' module, patched or not), used when the exact stream is not
        self.code2wav = pick("Code2Wav", model.code2wav, HFCode2Wav) if self.has_talker else None
        if patch:
            self.set_patched(True)
        else:  # leaves the model as given (a model the caller patched stays patched)
            self._transformers_stages()

    def set_patched(self, patched: bool) -> None:
        """Run on omni-fast (``omni_fast.patch`` of the model, plus omni-fast's MTP frame step and exact streaming
        Code2Wav) or on transformers' modules as they are (``omni_fast.unpatch``). Every stage follows, so one
        pipeline can be timed both ways."""
        import omni_fast

        model = self.model
        if patched:
            if not model.__dict__.get("_omni_fast_patched", False):
                self.patch_report = omni_fast.patch(model, backend=self.backend)
            self._refresh_fast_stages()
        else:
            if model.__dict__.get("_omni_fast_patched", False):
                omni_fast.unpatch(model)
            self._transformers_stages()

    def _refresh_fast_stages(self) -> None:
        """The MTP frame step on omni-fast (graph replay per frame on CUDA) and the codec streaming through
        omni-fast's stateful Code2Wav (exact, no recomputed left context); both copy (repack) the weights, so they
        are rebuilt when transformers' weights change (``load_state_dict``, ``.to()``, in-place edits). The MTP
        frame is one persistent launch while the ``persistent_mtp`` fast path is on (read here, before each stream)."""
        import omni_fast

        from .._cache_memory import record_copy_use
        from .talker_step import follow_fast_paths, weights_key

        if not self.has_talker:
            self.code_predictor = self.fast_code2wav = None
            return
        talker = self.model.talker
        key = weights_key(talker.code_predictor, talker.get_input_embeddings(), self.model.code2wav)
        if self._fast_stages is None or self._fast_stages[0] != key:
            self._fast_stages = None  # free the old copies first
            # a code-predictor config CodePredictor does not compute (unsupported_setting): transformers' frame loop
            frames = (HFCodePredictor(talker.code_predictor, talker.get_input_embeddings())
                      if unsupported_setting(talker.code_predictor.config) is not None else
                      OmniCodePredictor(omni_fast.models.CodePredictor.from_transformers(
                          talker.code_predictor, talker.get_input_embeddings()), backend=self.backend))
            self._fast_stages = (key, frames,
                                 omni_fast.models.Code2Wav.from_transformers(self.model.code2wav, backend=self.backend))
        _, self.code_predictor, self.fast_code2wav = self._fast_stages
        record_copy_use(self.fast_code2wav, self.fast_code2wav.device)  # (a hot swap may drop it mid-request)
        cp = getattr(self.code_predictor, "cp", None)
        if cp is not None:
            record_copy_use(cp, cp.norm.device)
            follow_fast_paths(cp)

    def _transformers_stages(self) -> None:
        self.fast_code2wav = None
        if not self.has_talker:
            self.code_predictor = None
            return
        talker = self.model.talker
        self.code_predictor = pick("CodePredictor", talker.code_predictor,
                                   lambda m: HFCodePredictor(m, talker.get_input_embeddings()))

    # ---------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, strict: bool = True, check_finite: bool = True,
                        **kwargs) -> "Qwen3Omni":
        """A local transformers-format checkpoint directory (config.json + safetensors shards); nothing is fetched
        from a hub (``local_files_only``). A tokenizer in the directory is loaded when present. A checkpoint with
        FP8-block or compressed-tensors W4A16 experts keeps them quantized (:mod:`omni_fast.models.quantized`, which
        checks its own keys); another ``quantization_config`` raises a ValueError naming its method. ``dtype``: a
        floating ``torch.dtype``, its name or ``"auto"`` (config.json's dtype), as transformers takes it (default
        bf16 on CUDA, fp32 on a CPU); ``device`` is checked before anything is read.

        ``strict`` (default): the config is validated up front (errors name the setting and the file), and a
        missing, unexpected, wrongly shaped or non-float tensor, a key the index lists but its shard lacks, or a
        truncated shard raise ONE ``ValueError`` (:class:`omni_fast.models.checkpoint.CheckpointError`) listing the
        problems with their shard files (see :mod:`omni_fast.models.checkpoint`). ``check_finite`` (default):
        refuse Code2Wav weights holding NaN/inf (they would give a NaN waveform: the vocoder's final clamp passes
        NaN)."""
        from .checkpoint import check_finite as _check_finite
        from .checkpoint import checkpoint_dir, load_config, load_strict, resolve_dtype

        path = checkpoint_dir(path)  # a str naming an existing directory
        device = check_device("device", device)  # before anything is read or built
        strict, check_finite = check_bool("strict", strict), check_bool("check_finite", check_finite)
        dtype = resolve_dtype(dtype, torch.bfloat16 if device.type == "cuda" else torch.float32, path)
        quant = read_quantization_config(path)  # FP8-block / W4A16 experts stay quantized (models.quantized)
        if quant is not None:
            config = load_config(path)  # validated: model_type, settings (errors name the file)
            model = load_quantized(path, config, quant, dtype=dtype, device=device)
        else:
            model = load_strict(path, strict=strict, dtype=dtype)
        if check_finite and hasattr(model, "code2wav"):
            _check_finite(model.code2wav, "code2wav.")
        model = model.to(device)
        tokenizer = kwargs.pop("tokenizer", None)
        if tokenizer is None:
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                if not tokenizer.encode("\n"):  # built without vocabulary files: no real tokenizer there
                    tokenizer = None
            except Exception:  # noqa: BLE001 - a weights-only directory: the caller passes token ids
                tokenizer = None
        return cls(model, tokenizer=tokenizer, **kwargs)

    @classmethod
    def random(cls, preset: str = "tiny", *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
               seed: int = 0, thinker_layers: int | None = None, allow_cpu: bool = False,
               **kwargs) -> "Qwen3Omni":
        """Random weights: ``"tiny"`` (~0.39M parameters, CPU) or ``"full"`` (the 30B-A3B shapes: 65.7 GiB of bf16
        weights; ``thinker_layers`` < 48 trims only the thinker's depth when memory is short, see
        :func:`~omni_fast.models.presets.full_thinker_layers`). ``"full"`` is for a GPU: on a CPU it raises unless
        ``allow_cpu=True`` (it would allocate 65.7 GiB in bf16, 131 GiB in fp32, the CPU default)."""
        from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3

        from .presets import (FULL_WEIGHTS_GIB, THINKER_LAYER_GIB, TINY_TEXT_VOCAB, full_qwen3_omni_config,
                              tiny_qwen3_omni_config)

        if preset not in ("tiny", "full"):
            raise ValueError(f"preset must be 'tiny' or 'full', got {preset!r}")
        device = check_device("device", device)  # before anything is read or built
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if preset == "full":
            if thinker_layers is not None:
                check_positive_int("thinker_layers", thinker_layers, maximum=48)
            if device.type != "cuda" and not allow_cpu:
                gib = (FULL_WEIGHTS_GIB - (48 - (thinker_layers or 48)) * THINKER_LAYER_GIB) \
                    * torch.finfo(dtype).bits / 16
                raise ValueError(f"Qwen3Omni.random('full') builds the 30B-A3B shapes ({gib:.0f} GiB of {dtype} "
                                 f"weights) on {device}: it is meant for a GPU. Use the 'tiny' preset on a CPU, or "
                                 "pass allow_cpu=True if you really have the memory")
        config = tiny_qwen3_omni_config() if preset == "tiny" else full_qwen3_omni_config(thinker_layers)
        torch.manual_seed(seed)
        with torch.device(device):
            model = q3.Qwen3OmniMoeForConditionalGeneration._from_config(config, dtype=dtype)
        _randomize(model, seed, scale=0.2 if preset == "tiny" else None)
        vocab = TINY_TEXT_VOCAB - 32 if preset == "tiny" else 151000
        kwargs.setdefault("tokenizer", ByteTokenizer(vocab))
        return cls(model, **kwargs)

    @staticmethod
    def samplers(opts, generator: torch.Generator):
        """(text, codec, MTP) samplers for ``stream``'s options: greedy, or transformers' defaults when sampling
        (thinker top-k 50, talker top-k 50 at temperature 0.9, MTP top-k 50 / top-p 0.8), all on ``generator``."""
        return (make_sampler(opts.do_sample, top_k=50, generator=generator),
                make_sampler(opts.talker_do_sample, top_k=50, temperature=0.9, generator=generator),
                make_sampler(opts.talker_do_sample, top_k=50, top_p=0.8, generator=generator))

    # ------------------------------------------------------------------------------------------------ prompting
    def build_prompt(self, req: Request, audio_tokens_n: int, image_tokens_n: int, video_tokens_n: int = 0, *,
                     video_grid: list[int] | None = None, seconds: float | None = None) -> list[int]:
        """The prompt's token ids (see :meth:`omni_fast.pipeline.qwen3.Qwen3Stages.build_prompt`)."""
        return Qwen3Stages(self).build_prompt(req, audio_tokens_n, image_tokens_n, video_tokens_n,
                                              video_grid=video_grid, seconds=seconds)

    # ----------------------------------------------------------------------------------------------- generation
    @checked_generate
    def generate(self, requests: Request | list[Request], **kwargs) -> list[dict]:
        """Run :meth:`stream` to the end; per request: ``token_ids``, ``text``, ``audio`` ``[S]``, ``timing``."""
        reqs = [requests] if isinstance(requests, Request) else list(requests)
        out = [{"token_ids": [], "text": "", "audio": [], "timing": None} for _ in reqs]
        for ev in self.stream(reqs, **kwargs):
            o = out[ev.request]
            if ev.kind == "text":
                o["token_ids"] += ev.token_ids
                o["text"] += ev.text or ""
            elif ev.kind == "audio":
                o["audio"].append(ev.audio)
            else:
                o["timing"] = ev.timing
        for o in out:
            o["audio"] = torch.cat(o["audio"]) if o["audio"] else torch.zeros(0)
        return out

    @checked_stream
    @torch.no_grad()
    def stream(self, requests: Request | list[Request], *, max_new_tokens: int = 32, talker_max_new_tokens: int = 64,
               talker_min_new_tokens: int = 0, speaker: str = "ethan", do_sample: bool = False,
               talker_do_sample: bool = False, talker_repetition_penalty: float = 1.0, first_chunk: int = 1,
               chunk: int = 12, left_context: int = 25, prefill_chunk: int | None = None, static_cache: bool = False,
               graph_decode: bool | None = None, seed: int = 0) -> Iterator[Event]:
        """Yield text deltas and audio chunks for a batch of requests as they are produced, then a "done" event
        per request with its :class:`RequestTiming`.

        Greedy by default (``do_sample``/``talker_do_sample`` switch to transformers' default sampling: thinker
        top-k 50, talker top-k 50 at temperature 0.9, MTP top-k 50 / top-p 0.8). ``first_chunk``/``chunk``/
        ``left_context``: the codec streaming schedule in frames (12.5 frames per second of audio).
        ``talker_min_new_tokens`` (transformers' ``talker_min_new_tokens`` -> ``min_new_tokens``): no row's talker
        stops before this many codec tokens (0: no minimum). ``prefill_chunk``: run the thinker prefill in chunks
        of this many tokens (bounded activation memory for long audio/image prompts; None: one chunk).
        ``static_cache``: preallocated KV caches (transformers' ``StaticCache``, sized prompt + max new tokens) for
        the thinker and the talker instead of growing ones.
        ``graph_decode`` (default: the model is patched and on CUDA): thinker and talker decode steps run on omni-fast's
        :class:`~omni_fast.models.text_decoder.MoeTextDecoder` (own static KV cache, fused ops, one CUDA-graph replay
        per step on CUDA, eager elsewhere) instead of transformers' text models; prefill stays on transformers.
        """
        reqs = [requests] if isinstance(requests, Request) else list(requests)
        if not reqs:
            return
        opts = StreamOptions(max_new_tokens=max_new_tokens, talker_max_new_tokens=talker_max_new_tokens,
                             talker_min_new_tokens=talker_min_new_tokens,
                             speaker=speaker, do_sample=do_sample, talker_do_sample=talker_do_sample,
                             talker_repetition_penalty=talker_repetition_penalty, first_chunk=first_chunk,
                             chunk=chunk, left_context=left_context, prefill_chunk=prefill_chunk,
                             static_cache=static_cache, graph_decode=graph_decode, seed=seed)
        run = StreamRun(self.stages(), reqs, opts)
        # (a server thread on its own stream may resume it: each new stream records the run's leased decoders)
        yield from resumed_in_order(run.events(), run.dev, run.lease)

    def stages(self):
        """The stage adapter of this model family (:mod:`omni_fast.pipeline`)."""
        return Qwen3Stages(self)


def _randomize(model, seed: int, scale: float | None):
    """Random weights: N(0, scale) for the tiny model (large enough that routing and attention are not
    degenerate); for the full model keep transformers' init (std 0.02) and only re-seed."""
    if scale is None:
        return
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_((torch.randn(p.shape, generator=gen) * scale).to(p.device, p.dtype))


# The names this module held before the split into omni_fast.pipeline (imported from here by callers and tests).
from ..pipeline.device import Lease as _Lease  # noqa: E402
from ..pipeline.multimodal import audio_video_order as _audio_video_order, patchify as _patchify  # noqa: E402
from ..pipeline.requests import (INPUT_FLOAT_DTYPES, MIN_AUDIO_SAMPLES, SAMPLE_RATE_IN, SAMPLE_RATE_OUT,  # noqa: E402
                                 RequestTiming, mel_features)

__all__ = ["ByteTokenizer", "Event", "INPUT_FLOAT_DTYPES", "MIN_AUDIO_SAMPLES", "Qwen3Omni", "Request", "RequestTiming",
           "SAMPLE_RATE_IN", "SAMPLE_RATE_OUT", "_Lease", "_audio_video_order", "_patchify", "make_sampler",
           "mel_features"]
