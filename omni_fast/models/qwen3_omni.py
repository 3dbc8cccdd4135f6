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

Not done yet (see docs/pipeline.md): while the talker runs, the host reads each step's text ids and codec id
(streaming, stopping, the talker's next text input) and synchronises for the stage timings (only the text after
the speech budget is read one step behind the device); continuous batching.
"""

from __future__ import annotations

import math
import numbers
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .components import (ExactStreamingCodec, HFCode2Wav, HFCodePredictor, OmniCodePredictor, StreamingCodec,
                         pick)
from ..integrations.hf_compat import output_cache, with_cache
from ..validation import check_positive_int, check_tensor
from .positions import PositionSpec, rope_positions
from .quantized import load_quantized, read_quantization_config
from .request_checks import checked_generate, checked_stream

SAMPLE_RATE_IN = 16000
SAMPLE_RATE_OUT = 24000
# The shortest waveform accepted: one 25 ms STFT window (the mel front end reflect-pads n_fft / 2 on each side,
# which needs more samples than that; shorter inputs would fail inside numpy/torch padding).
MIN_AUDIO_SAMPLES = 400
INPUT_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------- requests
@dataclass
class Request:
    """One request: a text prompt (already tokenised ids of the user turn's text, or a string for the demo's
    byte-level stand-in tokenizer), an optional 16 kHz mono waveform, an optional image ``[3, H, W]`` float, an
    optional video ``[F, 3, H, W]`` float (frames at ``video_fps``); ``audio_in_video``: the waveform is the
    video's sound track, and its tokens interleave with the video's by time (``<vision_start><audio_start> ...
    <audio_end><vision_end>``)."""

    text: str | list[int] = ""
    audio: torch.Tensor | None = None
    image: torch.Tensor | None = None
    video: torch.Tensor | None = None  # [F, 3, H, W] float frames sampled at `video_fps`
    video_fps: float = 2.0
    audio_in_video: bool = False  # `audio` is the video's sound track: its tokens interleave with the video's


@dataclass
class RequestTiming:
    """Per-request latency breakdown, in the technical report's terms (seconds unless noted).

    Every request has its own clocks, from the start of its batch (``stream`` called): ``preprocessing`` (mel
    features + audio/vision encoders + prompt embedding + positions; batch-wide), ``thinker_ttft`` (thinker prefill
    to the request's first text token), ``talker_ttft`` (talker prefill to its first codec token, counted from the
    thinker's first token), ``first_packet`` (start to its first audio chunk out), ``last_audio`` (start to its
    last audio chunk out), ``last_text`` (start to its last text token), ``total`` (start to the request finished:
    the later of the two).

    Rates count only the tokens the request itself produced, over the decode time of the steps it took part in (a
    batch step is charged to every row still running in it; rows that finished idle on pad tokens and are not
    charged): ``thinker_tokens_per_s`` (its text tokens after the first / thinker decode time), ``talker_tokens_per_s``
    (its codec tokens after the first / talker decode time, MTP excluded), ``mtp_per_frame`` (MTP time of the frames
    it was in / its frames), ``codec_per_code`` (Code2Wav time of the chunks that carried its frames / its frames),
    ``rtf`` = ``last_audio / audio_seconds`` (wall time to its last audio sample over its audio duration).
    ``thinker_decode`` / ``talker_decode``: those decode seconds; ``text_tokens`` / ``talker_tokens`` / ``frames``:
    the text tokens, codec tokens (codebook 0, codec EOS included) and audio frames the request produced.

    ``stages``: the batch-level split (seconds per stage for the whole batch, the same for every request of it; the
    demo's "where the time went"). Without a talker (a text-only checkpoint) the audio fields stay 0 / NaN.
    """

    preprocessing: float = 0.0
    thinker_ttft: float = 0.0
    talker_ttft: float = 0.0
    mtp_per_frame: float = 0.0
    codec_per_code: float = 0.0
    first_packet: float = float("nan")
    last_audio: float = float("nan")
    last_text: float = 0.0
    thinker_tokens_per_s: float = 0.0
    talker_tokens_per_s: float = 0.0
    rtf: float = float("nan")
    thinker_decode: float = 0.0  # seconds of the thinker decode steps this request took part in
    talker_decode: float = 0.0  # seconds of the talker decode steps this request took part in (MTP excluded)
    text_tokens: int = 0
    talker_tokens: int = 0
    frames: int = 0
    audio_seconds: float = 0.0
    total: float = 0.0
    stages: dict = field(default_factory=dict)  # batch-level stage -> seconds (the same for every row of a batch)

    def table(self) -> list[tuple[str, str]]:
        ms = lambda s: f"{s * 1e3:.1f} ms"  # noqa: E731
        return [("preprocessing", ms(self.preprocessing)), ("thinker TTFT", ms(self.thinker_ttft)),
                ("talker TTFT", ms(self.talker_ttft)), ("MTP per frame", ms(self.mtp_per_frame)),
                ("codec per code", ms(self.codec_per_code)), ("first audio packet", ms(self.first_packet)),
                ("last audio packet", ms(self.last_audio)),
                ("thinker tokens/s", f"{self.thinker_tokens_per_s:.1f}"),
                ("talker tokens/s", f"{self.talker_tokens_per_s:.1f}"), ("RTF", f"{self.rtf:.3f}"),
                ("text tokens", str(self.text_tokens)), ("codec frames", str(self.frames)),
                ("audio", f"{self.audio_seconds:.2f} s"), ("total", ms(self.total))]


@dataclass
class Event:
    """What :meth:`Qwen3Omni.stream` yields: a text delta (token ids; ``text`` decoded when a tokenizer is known),
    an audio chunk (``[S]`` float32 at 24 kHz), or the end of a request (with its timing)."""

    request: int
    kind: str  # "text" | "audio" | "done"
    token_ids: list[int] | None = None
    text: str | None = None
    audio: torch.Tensor | None = None
    timing: RequestTiming | None = None


# ------------------------------------------------------------------------------------------------------ helpers
def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def make_sampler(do_sample: bool, *, top_k: int = 50, top_p: float = 1.0, temperature: float = 1.0,
                 generator: torch.Generator | None = None):
    """logits ``[B, V]`` -> ids ``[B]``: greedy, or top-k / top-p sampling at ``temperature``."""
    if not do_sample:
        def greedy(logits: torch.Tensor) -> torch.Tensor:
            return logits.argmax(-1)

        greedy.do_sample = False
        return greedy

    def sample(logits: torch.Tensor) -> torch.Tensor:
        logits = logits / max(temperature, 1e-5)
        if top_k and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)

    # the settings, for stages that sample on their own (components.OmniCodePredictor)
    sample.do_sample, sample.top_k, sample.top_p, sample.temperature, sample.generator = (
        True, top_k, top_p, temperature, generator)
    return sample


def mel_features(waveforms: list[torch.Tensor], device: torch.device | str = "cpu", *, return_lengths: bool = False):
    """16 kHz waveforms -> ``(input_features [N, 128, F], feature_attention_mask [N, F])`` through transformers'
    ``WhisperFeatureExtractor`` math (128 mel bins, n_fft 400, hop 160; the Qwen3-Omni processor's audio kwargs:
    pad to the longest, no truncation). Built from its constructor defaults: nothing is downloaded.
    ``return_lengths``: also the mel frames per waveform ``[N]`` int64 on the host (no device read)."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLE_RATE_IN)
    dev = torch.device(device)
    out = fe([w.detach().float().cpu().numpy() for w in waveforms], sampling_rate=SAMPLE_RATE_IN, padding=True,
             truncation=False, return_attention_mask=True, return_tensors="pt",
             device="cuda" if dev.type == "cuda" else "cpu")
    feats, fmask = out["input_features"].to(dev), out["attention_mask"].to(dev)
    if return_lengths:
        return feats, fmask, out["attention_mask"].cpu().sum(-1)
    return feats, fmask


class ByteTokenizer:
    """The demo's stand-in tokenizer for random-weight models: one id per UTF-8 byte, folded into the vocabulary
    below the special ids (real checkpoints: pass token ids, or a transformers tokenizer as ``tokenizer=``)."""

    def __init__(self, limit: int):
        self.limit = limit

    def encode(self, text: str) -> list[int]:
        return [b % self.limit for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 32 <= i < 127).decode(errors="replace")


# ------------------------------------------------------------------------------------------------------ pipeline
class _Lease:
    """A token a :meth:`Qwen3Omni.stream` generator holds while it runs; the decoders leased to it are free again
    once it is gone (the generator finished or was garbage-collected)."""


class Qwen3Omni:
    """Thinker -> talker -> MTP -> streaming Code2Wav for a transformers ``Qwen3OmniMoeForConditionalGeneration``.

    ``patch``: swap omni-fast kernels in with :func:`omni_fast.patch` (``backend`` pins their backend).
    """

    def __init__(self, model, *, patch: bool = True, backend: str | None = None, tokenizer=None):
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
        are rebuilt when transformers' weights change (``load_state_dict``, ``.to()``, in-place edits)."""
        import omni_fast

        from .talker_step import weights_key

        if not self.has_talker:
            self.code_predictor = self.fast_code2wav = None
            return
        talker = self.model.talker
        key = weights_key(talker.code_predictor, talker.get_input_embeddings(), self.model.code2wav)
        if self._fast_stages is None or self._fast_stages[0] != key:
            self._fast_stages = None  # free the old copies first
            self._fast_stages = (
                key,
                OmniCodePredictor(omni_fast.models.CodePredictor.from_transformers(
                    talker.code_predictor, talker.get_input_embeddings()), backend=self.backend),
                omni_fast.models.Code2Wav.from_transformers(self.model.code2wav, backend=self.backend))
        _, self.code_predictor, self.fast_code2wav = self._fast_stages

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
        checks its own keys); another ``quantization_config`` raises a ValueError naming its method.

        ``strict`` (default): the config is validated up front (errors name the setting and the file), and a
        missing, unexpected, wrongly shaped or non-float tensor, a key the index lists but its shard lacks, or a
        truncated shard raise ONE ``ValueError`` (:class:`omni_fast.models.checkpoint.CheckpointError`) listing the
        problems with their shard files (see :mod:`omni_fast.models.checkpoint`). ``check_finite`` (default):
        refuse Code2Wav weights holding NaN/inf (they would give a NaN waveform: the vocoder's final clamp passes
        NaN)."""
        from .checkpoint import check_finite as _check_finite
        from .checkpoint import load_strict

        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory not found: {path}")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        quant = read_quantization_config(path)  # FP8-block / W4A16 experts stay quantized (models.quantized)
        if quant is not None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path, local_files_only=True)
            model = load_quantized(os.fspath(path), config, quant, dtype=dtype, device=device)
        else:
            model = load_strict(os.fspath(path), strict=bool(strict), dtype=dtype)
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
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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

    # ------------------------------------------------------------------------------------------------ prompting
    def _encode_text(self, text) -> list[int]:
        if isinstance(text, (list, tuple)):
            return list(text)
        if self.tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer: pass token ids, or tokenizer= to Qwen3Omni")
        return list(self.tokenizer.encode(text))

    def build_prompt(self, req: Request, audio_tokens_n: int, image_tokens_n: int, video_tokens_n: int = 0, *,
                     video_grid: list[int] | None = None, seconds: float | None = None) -> list[int]:
        """``<im_start>user\\n [<audio_start><audio>*n<audio_end>] [<vision_start><image>*n<vision_end>]
        [<vision_start><video>*n<vision_end>] text <im_end>\\n<im_start>assistant\\n`` in token ids (``\\n`` is one
        text token). With ``req.audio_in_video`` the audio and video tokens share one block, interleaved by time
        (``video_grid`` ``(t, h, w)`` and ``seconds`` per temporal step then say where each video token sits)."""
        c, t = self.config, self.config.thinker_config
        nl = [self.newline_id]
        ids = [c.im_start_token_id, c.user_token_id] + nl
        if req.audio_in_video:
            kinds = _audio_video_order(video_grid, seconds, audio_tokens_n, self.spec)
            ids += [t.vision_start_token_id, t.audio_start_token_id]
            ids += [t.audio_token_id if k else t.video_token_id for k in kinds]
            ids += [t.audio_start_token_id + 1, t.vision_start_token_id + 1]
            audio_tokens_n = video_tokens_n = 0
        if audio_tokens_n:
            ids += [t.audio_start_token_id] + [t.audio_token_id] * audio_tokens_n + [t.audio_start_token_id + 1]
        if image_tokens_n:
            ids += [t.vision_start_token_id] + [t.image_token_id] * image_tokens_n + [t.vision_start_token_id + 1]
        if video_tokens_n:
            ids += [t.vision_start_token_id] + [t.video_token_id] * video_tokens_n + [t.vision_start_token_id + 1]
        ids += self._encode_text(req.text) + [c.im_end_token_id] + nl
        ids += [c.im_start_token_id, c.assistant_token_id] + nl
        return ids

    # ----------------------------------------------------------------------------------------------- validation
    def _check_request(self, i: int, r) -> None:
        """A request's fields, before any work: clear errors naming ``requests[i].<field>``."""
        name = f"requests[{i}]"
        if not isinstance(r, Request):
            raise TypeError(f"{name} must be an omni_fast.models.Request, got {type(r).__name__}")
        if isinstance(r.text, (list, tuple)):
            vocab = self.config.thinker_config.text_config.vocab_size
            for tid in r.text:
                if isinstance(tid, bool) or not isinstance(tid, numbers.Integral):
                    raise TypeError(f"{name}.text: token ids must be ints, got {type(tid).__name__}")
                if not 0 <= tid < vocab:
                    raise ValueError(f"{name}.text: token id {tid} outside the vocabulary [0, {vocab})")
        elif not isinstance(r.text, str):
            raise TypeError(f"{name}.text must be a str or a list of token ids, got {type(r.text).__name__}")
        if r.audio is not None:
            a = r.audio
            if isinstance(a, torch.Tensor) and not a.is_floating_point():
                raise TypeError(f"{name}.audio must be a floating-point waveform in [-1, 1], got {a.dtype} "
                                "(16-bit PCM: divide by 32768)")
            check_tensor(f"{name}.audio", a, dtypes=INPUT_FLOAT_DTYPES)
            if a.dim() != 1:
                raise ValueError(f"{name}.audio must be a 1-D mono waveform [N] at 16 kHz, got shape "
                                 f"{list(a.shape)} (mix stereo down, e.g. audio.mean(0))")
            if a.numel() < MIN_AUDIO_SAMPLES:
                raise ValueError(f"{name}.audio has {a.numel()} samples; at least {MIN_AUDIO_SAMPLES} "
                                 f"({1e3 * MIN_AUDIO_SAMPLES / SAMPLE_RATE_IN:.0f} ms at 16 kHz, one STFT window) "
                                 "are needed")
        for kind, ndim, layout in (("image", 3, "[3, H, W]"), ("video", 4, "[F, 3, H, W]")):
            x = getattr(r, kind)
            if x is None:
                continue
            check_tensor(f"{name}.{kind}", x, dtypes=INPUT_FLOAT_DTYPES)
            if x.dim() != ndim or x.shape[-3] != 3 or min(x.shape) < 1:
                raise ValueError(f"{name}.{kind} must be {layout} float (RGB), got shape {list(x.shape)}")
        if r.video is not None:
            fps = r.video_fps
            if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not math.isfinite(fps) or fps <= 0:
                raise ValueError(f"{name}.video_fps must be a positive number of frames per second, got {fps!r}")

    @staticmethod
    def _check_stream_args(*, max_new_tokens, talker_max_new_tokens, first_chunk, chunk, left_context,
                           prefill_chunk, talker_repetition_penalty) -> None:
        """``max_new_tokens`` >= 1: the first text token is what starts the talker (0 is an error, not an empty
        answer); ``talker_max_new_tokens`` >= 1 (at most ``talker_max_new_tokens - 1`` frames, as transformers)."""
        check_positive_int("max_new_tokens", max_new_tokens)
        check_positive_int("talker_max_new_tokens", talker_max_new_tokens)
        check_positive_int("first_chunk", first_chunk)
        check_positive_int("chunk", chunk)
        check_positive_int("left_context", left_context, minimum=0)
        if prefill_chunk is not None:
            check_positive_int("prefill_chunk", prefill_chunk)
        if not isinstance(talker_repetition_penalty, (int, float)) or not talker_repetition_penalty > 0:
            raise ValueError(f"talker_repetition_penalty must be > 0, got {talker_repetition_penalty!r}")

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
               speaker: str = "ethan", do_sample: bool = False, talker_do_sample: bool = False,
               talker_repetition_penalty: float = 1.0, first_chunk: int = 1, chunk: int = 12,
               left_context: int = 25, prefill_chunk: int | None = None, static_cache: bool = False,
               graph_decode: bool | None = None, seed: int = 0) -> Iterator[Event]:
        """Yield text deltas and audio chunks for a batch of requests as they are produced, then a "done" event
        per request with its :class:`RequestTiming`.

        Greedy by default (``do_sample``/``talker_do_sample`` switch to transformers' default sampling: thinker
        top-k 50, talker top-k 50 at temperature 0.9, MTP top-k 50 / top-p 0.8). ``first_chunk``/``chunk``/
        ``left_context``: the codec streaming schedule in frames (12.5 frames per second of audio).
        ``prefill_chunk``: run the thinker prefill in chunks of this many tokens (bounded activation memory for
        long audio/image prompts; None: one chunk). ``static_cache``: preallocated KV caches (transformers'
        ``StaticCache``, sized prompt + max new tokens) for the thinker and the talker instead of growing ones.
        ``graph_decode`` (default: the model is patched and on CUDA): thinker and talker decode steps run on omni-fast's
        :class:`~omni_fast.models.text_decoder.MoeTextDecoder` (own static KV cache, fused ops, one CUDA-graph replay
        per step on CUDA, eager elsewhere) instead of transformers' text models; prefill stays on transformers.
        """
        reqs = [requests] if isinstance(requests, Request) else list(requests)
        if not reqs:
            return
        self._check_stream_args(max_new_tokens=max_new_tokens, talker_max_new_tokens=talker_max_new_tokens,
                                first_chunk=first_chunk, chunk=chunk, left_context=left_context,
                                prefill_chunk=prefill_chunk, talker_repetition_penalty=talker_repetition_penalty)
        for i, r in enumerate(reqs):
            self._check_request(i, r)
        m, cfg, dev = self.model, self.config, self.device
        tcfg = cfg.talker_config
        if graph_decode is None:  # patched now (patch() may have been called on the model after construction)
            graph_decode = dev.type == "cuda" and bool(m.__dict__.get("_omni_fast_patched", False))
        if self.fast_code2wav is not None:
            self._refresh_fast_stages()
        # Held by this generator while it runs: the decoders it loads are its own until it ends or is dropped, so
        # interleaved streams never share a decoder's KV cache.
        lease = _Lease()
        speaker_id = None
        if self.has_talker:
            speaker_id = (tcfg.speaker_id or {}).get(speaker.lower())
            if speaker_id is None:
                raise ValueError(f"unknown speaker {speaker!r}; known: {sorted(tcfg.speaker_id or {})}")
        gen = torch.Generator(device=dev).manual_seed(seed)
        text_sampler = make_sampler(do_sample, top_k=50, generator=gen)
        codec_sampler = make_sampler(talker_do_sample, top_k=50, temperature=0.9, generator=gen)
        mtp_sampler = make_sampler(talker_do_sample, top_k=50, top_p=0.8, generator=gen)
        B = len(reqs)
        timings = [RequestTiming() for _ in reqs]
        t_start = _now(dev)
        # Per-request clocks: the decode time of the batch steps each row took part in (a row that finished idles
        # on pad tokens and is not charged), and when its last text token came out.
        row_thinker, row_talker, row_mtp, row_codec = ([0.0] * B for _ in range(4))
        last_text = [0.0] * B

        def charge(acc: list[float], dt: float, rows) -> None:
            for i in rows:
                acc[i] += dt

        # ---- preprocessing: mel + audio encoder, vision encoder, prompt embeddings, TM-RoPE positions
        thinker = m.thinker
        embeds_layer = thinker.get_input_embeddings()
        audio_embeds, audio_lens, n_audio_tok = self._encode_audio(reqs)
        vis = self._encode_visual(reqs)
        # grids on the host (the layout the positions read) and on the device (the vision encoders)
        image_grids, video_grids, seconds = vis["image_grid_host"], vis["video_grid_host"], vis["seconds"]
        in_video = any(r.audio_in_video for r in reqs)
        if in_video and any((r.video is not None or r.audio is not None) and not r.audio_in_video for r in reqs):
            raise ValueError("audio_in_video applies to the whole batch (as transformers' use_audio_in_video): "
                             "every request with audio or video must set it, or none")
        if any(r.audio_in_video and (r.audio is None or r.video is None) for r in reqs):
            raise ValueError("audio_in_video needs both audio and video in the request")
        vid_of = {i: j for j, i in enumerate(i for i, r in enumerate(reqs) if r.video is not None)}
        prompts = [self.build_prompt(r, n_audio_tok[i], vis["image_tokens"][i], vis["video_tokens"][i],
                                     video_grid=None if i not in vid_of else video_grids[vid_of[i]].tolist(),
                                     seconds=None if i not in vid_of else float(seconds[vid_of[i]]))
                   for i, r in enumerate(reqs)]
        S = max(map(len, prompts))
        ids_host = torch.zeros(B, S, dtype=torch.long)
        mask_host = torch.zeros(B, S, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding, as the Qwen3-Omni processor does
            ids_host[i, S - len(p):] = torch.tensor(p)
            mask_host[i, S - len(p):] = 1
        ids, mask = _host_to_device(ids_host, dev), _host_to_device(mask_host, dev)
        inputs_embeds = embeds_layer(ids)
        if audio_embeds is not None:
            amask = (ids == self.spec.audio_token_id).unsqueeze(-1).expand_as(inputs_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(amask, audio_embeds.to(inputs_embeds.dtype))
        inputs_embeds, visual_mask, deepstack = self._merge_visual(ids, inputs_embeds, vis)
        # the layout from the host copies (no host sync); int64 positions unless a video's are fractional
        pos_i, deltas = rope_positions(ids_host, self.spec, attention_mask=mask_host, image_grid_thw=image_grids,
                                       video_grid_thw=video_grids, second_per_grids=seconds,
                                       audio_feature_lengths=audio_lens, use_audio_in_video=in_video, device=dev,
                                       integer=True)
        t_pre = _now(dev)
        for tm in timings:
            tm.preprocessing = t_pre - t_start

        # ---- thinker prefill (in chunks of `prefill_chunk` tokens when given)
        cache = _new_cache(thinker.config.text_config, static_cache, S + max_new_tokens)
        accept_layer = tcfg.accept_hidden_layer if self.has_talker else len(thinker_text_model(thinker).layers)
        out, hidden_states = self._prefill(thinker_text_model(thinker), inputs_embeds, mask, pos_i, cache,
                                           visual_mask, deepstack, prefill_chunk, accept_layer)
        logits = thinker.lm_head(out.last_hidden_state[:, -1]).float()
        token = text_sampler(logits)
        t_first = _now(dev)
        eos = cfg.im_end_token_id
        generated = [[int(x)] for x in token.tolist()]
        text_done = [g[0] == eos or max_new_tokens <= 1 for g in generated]
        thinker_time, thinker_steps = 0.0, 0
        for i in range(B):
            timings[i].thinker_ttft = t_first - t_pre
            last_text[i] = t_first - t_start
            yield self._text_event(i, generated[i])
        next_pos = _int_positions(deltas.view(B) + mask.sum(-1))  # the next TM-RoPE position (all three rows)
        thinker_mask = mask
        thinker_dec = None
        if graph_decode:  # the prefill KV moves into the decoder's own cache; transformers' cache is dropped
            t0 = _now(dev)  # counted as decode time (the first batch of a bucket also captures the graph here)
            thinker_dec = self._decoder("thinker", lease)
            thinker_dec.load_prefill(cache, mask, max_new_tokens=max_new_tokens,
                                     fractional_positions=next_pos.is_floating_point())
            cache = out = None  # (the prefill output references the cache too)
            dt = _now(dev) - t0
            thinker_time += dt
            charge(row_thinker, dt, [i for i in range(B) if not text_done[i]])

        def thinker_launch(done: torch.Tensor) -> torch.Tensor:
            """Queue one thinker step (no host sync); ``done`` bool ``[B]``: rows finished before it (they get
            EOS, as transformers pads finished rows). Returns the new ids on the device."""
            nonlocal token, thinker_mask, next_pos, thinker_steps
            if thinker_dec is not None:
                logits, _ = thinker_dec.step(embeds_layer(token), next_pos)
            else:
                thinker_mask = torch.cat([thinker_mask, thinker_mask.new_ones(B, 1)], dim=1)
                p = next_pos.view(1, B, 1).expand(3, B, 1)
                o = thinker_text_model(thinker)(inputs_embeds=embeds_layer(token[:, None]),
                                                 attention_mask=thinker_mask, position_ids=p, **with_cache(cache),
                                                 use_cache=True)
                logits = thinker.lm_head(o.last_hidden_state[:, -1])
            nxt = text_sampler(logits.float())
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            token, next_pos = nxt, next_pos + 1
            thinker_steps += 1
            return nxt

        def thinker_read(ids: list[int]) -> list[Event]:
            """The host side of a step: stream the ids of unfinished rows, decide which rows stop."""
            events, now = [], time.perf_counter() - t_start  # (the ids are on the host: the step has run)
            for i, tid in enumerate(ids):
                if not text_done[i]:
                    generated[i].append(tid)
                    text_done[i] = tid == eos or len(generated[i]) >= max_new_tokens
                    last_text[i] = now
                    events.append(self._text_event(i, [tid]))
            return events

        def thinker_step() -> list[Event]:
            """One step whose ids the talker needs now: read at once."""
            nonlocal thinker_time
            active = [i for i in range(B) if not text_done[i]]
            t0 = _now(dev)
            nxt = thinker_launch(_to_device(text_done, dev))
            dt = _now(dev) - t0
            thinker_time += dt
            charge(row_thinker, dt, active)
            return thinker_read(nxt.tolist())

        def thinker_tail() -> Iterator[Event]:
            """The text after the speech budget: nothing waits for these ids, so step k+1 is queued before step
            k's ids (copied to pinned memory without blocking) are read, and the stop check runs on the host one
            step behind the device; finished rows are tracked on the device meanwhile. The only cost: one step
            computed after the last row finished, and discarded (it draws from the text sampler's generator, which
            nothing uses afterwards)."""
            nonlocal thinker_time
            t0 = _now(dev)
            done, pending = _to_device(text_done, dev), None
            while not all(text_done):
                queued = None
                if thinker_steps < max_new_tokens - 1:  # a step is useful while a row may still be unfinished
                    nxt = thinker_launch(done)
                    done = done | (nxt == eos)
                    queued = _AsyncHostCopy(nxt)
                if pending is None and queued is None:
                    break
                if pending is not None:
                    active = [i for i in range(B) if not text_done[i]]
                    events = thinker_read(pending.tolist())
                    dt = time.perf_counter() - t0  # (the consumer's time is not decode time)
                    thinker_time += dt
                    charge(row_thinker, dt, active)
                    yield from events
                    t0 = time.perf_counter()
                pending = queued
            thinker_time += _now(dev) - t0  # (the discarded step: batch time, no row's)

        def finish(codes_hist, n_frames, audio_len, stages) -> Iterator[Event]:
            """The "done" event of every request, with its own clocks (see :class:`RequestTiming`)."""
            for i, tm in enumerate(timings):
                tm.text_tokens = len(generated[i])
                tm.talker_tokens = len(codes_hist[i]) if codes_hist else 0
                tm.frames = n_frames[i] if n_frames else 0
                tm.mtp_per_frame = row_mtp[i] / tm.frames if tm.frames else 0.0
                tm.codec_per_code = row_codec[i] / tm.frames if tm.frames else 0.0
                tm.thinker_decode, tm.talker_decode = row_thinker[i], row_talker[i]
                tm.thinker_tokens_per_s = (tm.text_tokens - 1) / row_thinker[i] if row_thinker[i] > 0 else 0.0
                tm.talker_tokens_per_s = (tm.talker_tokens - 1) / row_talker[i] if row_talker[i] > 0 else 0.0
                tm.audio_seconds = (audio_len[i] if audio_len else 0) / SAMPLE_RATE_OUT
                tm.last_text = last_text[i]
                tm.total = max(tm.last_text, 0.0 if math.isnan(tm.last_audio) else tm.last_audio)
                tm.rtf = tm.last_audio / tm.audio_seconds if tm.audio_seconds else float("nan")
                tm.stages = dict(stages)
                yield Event(i, "done", timing=tm)

        if not self.has_talker:  # a text-only checkpoint (enable_audio_output=False): no talker, no audio
            yield from thinker_tail()
            yield from finish(None, None, None, {"preprocessing": t_pre - t_start, "thinker prefill": t_first - t_pre,
                                                 "thinker decode": thinker_time})
            return

        # ---- talker prefill (needs the prompt's hidden states and the first text token only)
        t0 = _now(dev)
        talker = m.talker
        proj_special = talker.text_projection(embeds_layer(torch.tensor(
            [[cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id]], device=dev)))
        tts_bos, tts_eos, tts_pad = proj_special.chunk(3, dim=1)  # [1, 1, D] each
        t_embeds, t_mask, t_ids = self._talker_prompt(
            ids, mask, hidden_states, speaker_id, tts_bos, tts_pad, embeds_layer(token[:, None]))
        t_pos, t_deltas = rope_positions(t_ids, PositionSpec(**{**self.spec.__dict__, **_talker_ids(tcfg)}),
                                         attention_mask=t_mask, image_grid_thw=image_grids,
                                         video_grid_thw=video_grids, second_per_grids=seconds,
                                         audio_feature_lengths=audio_lens, use_audio_in_video=in_video,
                                         integer=True)
        t_cache = _new_cache(talker.config.text_config, static_cache, t_embeds.shape[1] + talker_max_new_tokens)
        # (transformers hands the MTP `hidden_states[-1]`, which is the final-norm output, i.e. last_hidden_state)
        tout = talker.model(inputs_embeds=t_embeds, attention_mask=t_mask, position_ids=_int_positions(t_pos),
                            **with_cache(t_cache), use_cache=True)
        suppress = _suppress_mask(tcfg, dev)
        c0 = self._codec_pick(talker.codec_head(tout.last_hidden_state[:, -1]).float(), suppress, [], codec_sampler,
                              talker_repetition_penalty)
        past_hidden = tout.last_hidden_state[:, -1:]
        t_first_codec = _now(dev)
        talker_prefill = t_first_codec - t0
        for i in range(B):
            timings[i].talker_ttft = talker_prefill
        talker_time, talker_steps, mtp_time, codec_time = 0.0, 0, 0.0, 0.0
        t_next_pos = _int_positions(t_deltas.view(B) + t_mask.sum(-1))
        codes_hist: list[list[int]] = [[int(x)] for x in c0.tolist()]
        speech_done = [c == tcfg.codec_eos_token_id for c in c0.tolist()]
        talker_dec = None
        if graph_decode:
            t0 = _now(dev)
            talker_dec = self._decoder("talker", lease)
            talker_dec.load_prefill(output_cache(tout), t_mask, max_new_tokens=talker_max_new_tokens,
                                    fractional_positions=t_next_pos.is_floating_point())
            tout = t_cache = None
            dt = _now(dev) - t0
            talker_time += dt
            charge(row_talker, dt, [i for i in range(B) if not speech_done[i]])
        frames: list[torch.Tensor] = []  # [B, Q] per frame
        n_frames = [0] * B
        if self.fast_code2wav is not None:  # patched: exact stateful streaming, no re-decoded left context
            codec = ExactStreamingCodec(self.fast_code2wav, B, first_chunk=first_chunk, chunk=chunk,
                                        stream=self._codec_stream(B, lease))
        else:
            codec = StreamingCodec(self.code2wav, first_chunk=first_chunk, chunk=chunk, left_context=left_context)
        audio_len = [0] * B
        step = 0

        def emit_audio(final: bool):
            nonlocal codec_time
            if not frames or not codec.ready(len(frames), final):
                return []
            t0 = _now(dev)
            start = codec.done
            wav = codec.step(torch.stack(frames, dim=-1)).float()
            dt = _now(dev) - t0
            codec_time += dt
            per_frame = wav.shape[-1] / max(len(frames) - start, 1)
            events, rows = [], []
            for i in range(B):
                # rows that ended keep getting (ignored) frames: cut at their own frame count
                keep = max(0, min(n_frames[i], len(frames)) - start)
                if keep == 0:
                    continue
                n = wav.shape[-1] if n_frames[i] >= len(frames) else int(round(keep * per_frame))
                chunk_wav = wav[i, :n].cpu()
                audio_len[i] += chunk_wav.numel()
                rows.append(i)
                events.append(Event(i, "audio", audio=chunk_wav))
            now = time.perf_counter() - t_start  # (the chunks are on the host)
            for i in rows:
                timings[i].last_audio = now
                if math.isnan(timings[i].first_packet):
                    timings[i].first_packet = now
            charge(row_codec, dt, rows)
            return events

        # ---- interleaved decode: thinker tokens, talker frames (MTP), Codec chunks
        for _ in range(talker_max_new_tokens - 1):
            if all(speech_done):
                break
            active = [i for i in range(B) if not speech_done[i]]
            t0 = _now(dev)
            residual, summed = self.code_predictor.frame(past_hidden, c0, mtp_sampler)
            dt = _now(dev) - t0
            mtp_time += dt
            charge(row_mtp, dt, active)
            frames.append(torch.cat([c0[:, None], residual], dim=1).masked_fill(
                _to_device(speech_done, dev)[:, None], 0))
            for i in active:
                n_frames[i] += 1
            yield from emit_audio(final=False)  # the frame needs no new text: audio goes out first
            # the talker's step k reads text token k+1: run the thinker up to it
            while not all(text_done) and any(len(generated[i]) < step + 2 for i in range(B) if not text_done[i]):
                yield from thinker_step()
            t0 = _now(dev)
            text_in = self._trailing(step, generated, text_done, embeds_layer, talker, tts_eos, tts_pad)
            if talker_dec is not None:
                logits, hidden = talker_dec.step((summed + text_in)[:, 0], t_next_pos)
                past_hidden = hidden[:, None]
            else:
                t_mask = torch.cat([t_mask, t_mask.new_ones(B, 1)], dim=1)
                p = t_next_pos.view(1, B, 1).expand(3, B, 1)
                tout = talker.model(inputs_embeds=summed + text_in, attention_mask=t_mask, position_ids=p,
                                    **with_cache(output_cache(tout)), use_cache=True)
                logits = talker.codec_head(tout.last_hidden_state[:, -1])
                past_hidden = tout.last_hidden_state[:, -1:]
            t_next_pos = t_next_pos + 1
            c0 = self._codec_pick(logits.float(), suppress, codes_hist, codec_sampler, talker_repetition_penalty)
            for i, c in enumerate(c0.tolist()):
                if not speech_done[i]:
                    codes_hist[i].append(c)
                    speech_done[i] = c == tcfg.codec_eos_token_id
            dt = _now(dev) - t0
            talker_time += dt
            charge(row_talker, dt, active)
            talker_steps += 1
            step += 1
        yield from emit_audio(final=True)
        yield from thinker_tail()  # text longer than the speech budget (the RTF clock has stopped: last_audio)
        yield from finish(codes_hist, n_frames, audio_len,
                          {"preprocessing": t_pre - t_start, "thinker prefill": t_first - t_pre,
                           "thinker decode": thinker_time, "talker prefill": talker_prefill,
                           "talker decode": talker_time, "MTP": mtp_time, "Code2Wav": codec_time})

    # ------------------------------------------------------------------------------------------ stage internals
    def _decoder(self, part: str, lease: "_Lease"):
        """A :class:`MoeTextDecoder` of the thinker or the talker that no live stream holds, leased to ``lease``.
        Decoders share the model's weight tensors and keep their caches and captured graphs between streams; they
        are rebuilt when the weights change. Interleaved streams get one decoder each."""
        from .talker_step import weights_key
        from .text_decoder import MoeTextDecoder

        if part == "thinker":
            text_model, head = thinker_text_model(self.model.thinker), self.model.thinker.lm_head
        else:
            text_model, head = self.model.talker.model, self.model.talker.codec_head
        key = weights_key(text_model, head)
        got = self._decoders.get(part)
        if got is None or got[0] != key:
            self._decoders.pop(part, None)  # free the old decoders' caches before building a new one
            got = self._decoders[part] = (key, [])
        for entry in got[1]:
            if entry[1]() is None:  # its stream ended (or was dropped)
                entry[1] = weakref.ref(lease)
                return entry[0]
        dec = MoeTextDecoder.from_transformers(text_model, head, backend=self.backend)
        got[1].append([dec, weakref.ref(lease)])
        return dec

    def _codec_stream(self, batch_size: int, lease: "_Lease"):
        """A Code2Wav stream of ``batch_size`` rows that no live stream holds, leased to ``lease``: streams (their
        states and CUDA graphs) outlive requests, so new requests capture no graph (after the stream's first reuse); dropped when the fast
        Code2Wav is rebuilt (new weights)."""
        code2wav = self.fast_code2wav
        if self._codec_streams is None or self._codec_streams[0] is not code2wav:
            self._codec_streams = (code2wav, {})
        entries = self._codec_streams[1].setdefault(batch_size, [])
        for entry in entries:
            if entry[1]() is None:  # its request ended (or was dropped)
                entry[1] = weakref.ref(lease)
                return entry[0]
        stream = ExactStreamingCodec.new_stream(code2wav, batch_size)
        entries.append([stream, weakref.ref(lease)])
        return stream

    @staticmethod
    def _prefill(lm, inputs_embeds, mask, positions, cache, visual_mask, deepstack, chunk, accept_layer):
        """Thinker prefill through its text model, optionally chunked: each chunk attends to the cache so far and
        receives the DeepStack rows of its own visual tokens. Returns the last chunk's output and the two hidden
        states the talker reads over the whole prompt, as ``{0: embeddings, accept_layer: hidden}`` (transformers'
        ``hidden_states[k]``: the output of layer ``k - 1``, the final-norm output for the last layer), kept by a
        forward hook instead of recording every layer."""
        B, S, _ = inputs_embeds.shape
        chunk = S if not chunk or chunk >= S else int(chunk)
        if deepstack is not None:  # row of each visual token in the (batch-major) DeepStack tensors
            flat = visual_mask.reshape(-1)
            rank = (flat.long().cumsum(0) - 1).view(B, S)
        n_layers = len(lm.layers)
        kept: list[torch.Tensor] = []
        hook = None
        if accept_layer < n_layers:
            def keep(_module, _args, output):
                kept.append(output[0] if isinstance(output, tuple) else output)

            hook = lm.layers[accept_layer - 1].register_forward_hook(keep) if accept_layer > 0 else None
        outs, out = [], None
        try:
            for s in range(0, S, chunk):
                e = min(s + chunk, S)
                extra = {}
                if deepstack is not None:
                    vm = visual_mask[:, s:e]
                    rows = rank[:, s:e][vm]
                    extra = dict(visual_pos_masks=vm, deepstack_visual_embeds=[d[rows] for d in deepstack])
                out = lm(inputs_embeds=inputs_embeds[:, s:e], attention_mask=mask[:, :e],
                         position_ids=positions[:, :, s:e], use_cache=True, **with_cache(cache, **extra))
                outs.append(out.last_hidden_state)
        finally:
            if hook is not None:
                hook.remove()
        if accept_layer == 0:
            accepted = inputs_embeds
        elif accept_layer >= n_layers:
            accepted = torch.cat(outs, dim=1)
        else:
            accepted = torch.cat(kept, dim=1)
        return out, {0: inputs_embeds, accept_layer: accepted}

    def _text_event(self, i: int, ids: list[int]) -> Event:
        text = self.tokenizer.decode(ids) if self.tokenizer is not None else None
        return Event(i, "text", token_ids=list(ids), text=text)

    def _encode_audio(self, reqs):
        """Mel features and the audio encoder for the requests that carry audio (in request order)."""
        waves = [r.audio for r in reqs if r.audio is not None]
        counts = [0] * len(reqs)
        if not waves:
            return None, None, counts
        feats, fmask, lens = mel_features(waves, self.device, return_lengths=True)
        thinker = self.model.thinker
        feats = feats.to(thinker.dtype)
        emb = thinker.get_audio_features(feats, feature_attention_mask=fmask, return_dict=True)
        emb = emb.last_hidden_state
        from .positions import audio_tokens

        j = 0
        for i, r in enumerate(reqs):
            if r.audio is not None:
                counts[i] = audio_tokens(int(lens[j]), self.spec.n_window)
                j += 1
        return emb, lens, counts

    def _encode_visual(self, reqs):
        """Patchify images (``[3, H, W]``) and videos (``[F, 3, H, W]``), run the vision encoder once per kind."""
        vcfg = self.config.thinker_config.vision_config
        merge, dtype = vcfg.spatial_merge_size, self.model.thinker.dtype
        out = {"image_tokens": [0] * len(reqs), "video_tokens": [0] * len(reqs), "image_grid": None,
               "video_grid": None, "image_grid_host": None, "video_grid_host": None, "seconds": None,
               "image": None, "video": None}
        for kind in ("image", "video"):
            items = [(i, getattr(r, kind)) for i, r in enumerate(reqs) if getattr(r, kind) is not None]
            if not items:
                continue
            patches, grids = [], []
            for i, x in items:
                frames = x[None] if kind == "image" else x
                pv, grid = _patchify(frames.to(self.device), vcfg.patch_size, vcfg.temporal_patch_size, merge)
                patches.append(pv)
                grids.append(grid)
                out[f"{kind}_tokens"][i] = grid[0] * grid[1] * grid[2] // merge ** 2
            grid_thw = torch.tensor(grids, device=self.device)
            pixels = torch.cat(patches).to(dtype)
            thinker = self.model.thinker
            get = thinker.get_image_features if kind == "image" else thinker.get_video_features
            out[kind] = get(pixels, grid_thw, return_dict=True)
            out[f"{kind}_grid"] = grid_thw
            out[f"{kind}_grid_host"] = torch.tensor(grids)
            if kind == "video":  # seconds per temporal grid step: temporal_patch_size frames at video_fps
                out["seconds"] = torch.tensor([vcfg.temporal_patch_size / reqs[i].video_fps for i, _ in items])
        return out

    def _merge_visual(self, ids, inputs_embeds, vis):
        """Image/video embeddings into their placeholder tokens; the DeepStack features of all visual tokens in
        prompt order (what transformers' thinker builds) and their mask."""
        masks, feats = [], []
        for kind, token in (("image", self.spec.image_token_id), ("video", self.spec.video_token_id)):
            if vis[kind] is None:
                continue
            m = ids == token
            emb = _rows(vis[kind].pooler_output).to(inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(m.unsqueeze(-1).expand_as(inputs_embeds), emb)
            masks.append(m)
            feats.append([_rows(f) for f in vis[kind].deepstack_features])
        if not masks:
            return inputs_embeds, None, None
        visual = masks[0] if len(masks) == 1 else masks[0] | masks[1]
        if len(masks) == 1:
            return inputs_embeds, visual, feats[0]
        joint = []
        for layer_feats in zip(*feats):  # rows of both kinds, placed in prompt order
            rows = layer_feats[0].new_zeros(int(visual.sum()), layer_feats[0].shape[-1])
            for m, f in zip(masks, layer_feats):
                rows[m[visual]] = f
            joint.append(rows)
        return inputs_embeds, visual, joint

    def _talker_prompt(self, ids, mask, hidden_states, speaker_id, tts_bos, tts_pad, first_token_embed):
        """The talker's prompt, as ``Qwen3OmniMoeForConditionalGeneration.generate`` builds it: the user turn
        (text embeddings -> ``text_projection``, audio/image tokens' thinker hidden at ``accept_hidden_layer`` ->
        ``hidden_projection``), then ``<im_start>assistant\\n`` + 4 tts pads + tts_bos + the first text token, each
        added to the codec special embeddings (nothink, think_bos, think_eos, speaker, pad, bos)."""
        cfg, tcfg, talker = self.config, self.config.talker_config, self.model.talker
        B, S = ids.shape
        thinker_embed, thinker_hidden = hidden_states[0], hidden_states[tcfg.accept_hidden_layer]
        mm = ((ids == cfg.thinker_config.audio_token_id) | (ids == cfg.thinker_config.image_token_id)
              | (ids == cfg.thinker_config.video_token_id))
        # user turn tokens: those whose closest preceding <im_start> is followed by the user role
        pos = torch.arange(S, device=ids.device).expand(B, S)
        starts = torch.where(ids == cfg.im_start_token_id, pos, torch.full_like(pos, -1)).cummax(-1).values
        role = ids.gather(1, (starts.clamp_min(0) + 1).clamp_max(S - 1))
        user = (role == cfg.user_token_id) & mask.bool()
        user_part = torch.where(mm.unsqueeze(-1), talker.hidden_projection(thinker_hidden),
                                talker.text_projection(thinker_embed))
        n_user = user.sum(-1)
        U = int(n_user.max())
        order = torch.where(user, S + pos, pos).argsort(-1)[:, -U:]  # user tokens last, in order, right-aligned
        user_embeds = user_part.gather(1, order.unsqueeze(-1).expand(-1, -1, user_part.shape[-1]))
        user_ids = ids.gather(1, order)
        user_mask = (torch.arange(U, device=ids.device) >= (U - n_user).unsqueeze(1)).long()
        # assistant part: the last 3 prompt tokens are <im_start> assistant \n
        a_hidden = talker.text_projection(torch.cat([thinker_embed[:, -3:], first_token_embed], dim=1))
        text_hidden = torch.cat([a_hidden[:, :3], tts_pad.expand(B, 4, -1), tts_bos.expand(B, -1, -1),
                                 a_hidden[:, 3:4]], dim=1)
        special = torch.tensor([[tcfg.codec_nothink_id, tcfg.codec_think_bos_id, tcfg.codec_think_eos_id, speaker_id,
                                 tcfg.codec_pad_id, tcfg.codec_bos_id]], device=ids.device).expand(B, -1)
        codec_hidden = torch.cat([text_hidden.new_zeros(B, 3, text_hidden.shape[-1]),
                                  talker.get_input_embeddings()(special)], dim=1)
        embeds = torch.cat([user_embeds, text_hidden + codec_hidden], dim=1)
        t_ids = torch.cat([user_ids, torch.full((B, text_hidden.shape[1]), cfg.tts_pad_token_id, device=ids.device)],
                          dim=1)
        t_mask = torch.cat([user_mask, mask.new_ones(B, text_hidden.shape[1])], dim=1)
        return embeds, t_mask, t_ids

    def _trailing(self, step, generated, text_done, embeds_layer, talker, tts_eos, tts_pad):
        """The text input ``[B, 1, D]`` of talker step ``step`` (transformers' ``trailing_text_hidden``): per request
        the projected embedding of its text token ``step + 1``; once its text has ended (N tokens), tts_eos at step
        ``N - 2`` and tts_pad after. As in transformers' batch-1 generate, the final token (EOS, or the last one at
        ``max_new_tokens``) is never fed to the talker: its thinker embedding is never computed there."""
        ids, kind = [], []  # kind: 0 text token, 1 tts_eos, 2 tts_pad
        for g, done in zip(generated, text_done):
            eos_step = max(len(g) - 2, 0)
            k = 0 if not done or step < eos_step else (1 if step == eos_step else 2)
            kind.append(k)
            ids.append(g[step + 1] if k == 0 else 0)
        if all(k == 2 for k in kind):
            return tts_pad.expand(len(ids), -1, -1)
        dev = self.device
        text = talker.text_projection(embeds_layer(_to_device(ids, dev)[:, None]))
        kind_t = _to_device(kind, dev).view(-1, 1, 1)
        return torch.where(kind_t == 0, text, torch.where(kind_t == 1, tts_eos, tts_pad))

    def _codec_pick(self, logits, suppress, history, sampler, penalty):
        logits = logits.masked_fill(suppress, float("-inf"))
        if penalty != 1.0 and history and history[0]:
            width = max(map(len, history))  # rows that stopped are shorter: pad with a code they already have
            idx = torch.tensor([h + h[:1] * (width - len(h)) for h in history], device=logits.device)
            got = logits.gather(1, idx)
            logits = logits.scatter(1, idx, torch.where(got < 0, got * penalty, got / penalty))
        return sampler(logits)


# ---------------------------------------------------------------------------------------------- module helpers
def thinker_text_model(thinker):
    """The thinker's text decoder: ``thinker.model.language_model`` (transformers >= 5.2x, where ``thinker.model`` is
    the multimodal ``Qwen3OmniMoeThinkerModel``) or ``thinker.model`` itself (earlier 5.x, e.g. 5.17)."""
    return getattr(thinker.model, "language_model", thinker.model)


def _rows(features) -> torch.Tensor:
    """Per-item feature rows as one tensor: transformers returns a tuple/list split per image/video in some
    versions and one tensor in others."""
    return features if isinstance(features, torch.Tensor) else torch.cat(tuple(features), dim=0)


def _new_cache(config, static: bool, max_len: int):
    """A transformers KV cache: ``StaticCache`` (preallocated, fixed shapes) or ``DynamicCache`` (grows)."""
    from transformers.cache_utils import DynamicCache, StaticCache

    return StaticCache(config=config, max_cache_len=max_len) if static else DynamicCache(config=config)


class _AsyncHostCopy:
    """A device tensor's values copied to the host without blocking (pinned memory + an event on CUDA); read with
    :meth:`tolist`, which waits for that copy only."""

    def __init__(self, t: torch.Tensor):
        if t.device.type != "cuda":
            self.host, self.event = t, None
            return
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.host.copy_(t, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def tolist(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def _host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a host sync (pinned memory + a non-blocking copy on CUDA)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _to_device(values: list, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor without a host sync: on CUDA through pinned memory and a non-blocking
    copy (a copy from pageable memory waits for the stream to drain first)."""
    return _host_to_device(torch.tensor(values), device)


def _int_positions(pos: torch.Tensor) -> torch.Tensor:
    """The float positions of ``get_rope_index`` as int64 when they are whole numbers (the fused RoPE needs
    integers; a fractional video timestamp keeps them float, for the rest of the request's decode too, and
    transformers' own RoPE runs). Integer positions pass through; float ones cost one host sync, at prefill
    (``rope_positions(..., integer=True)`` returns int64 whenever it can, so only fractional prompts get here)."""
    if not pos.is_floating_point():
        return pos
    as_int = pos.to(torch.int64)
    return as_int if torch.equal(as_int.to(pos.dtype), pos) else pos


def _audio_video_order(grid, seconds: float, n_audio: int, spec: PositionSpec) -> list[bool]:
    """Token kinds (True = audio) of an audio-in-video block, in the order of their temporal positions: video tokens
    at ``i * seconds * position_id_per_seconds`` (``h * w / merge**2`` per temporal step), audio tokens at 0, 1, ...;
    video first on ties (the order ``get_rope_index``'s merge assigns positions in)."""
    gt, gh, gw = grid
    per_step = gh * gw // spec.spatial_merge_size ** 2
    video_t = (torch.arange(gt) * torch.tensor(seconds, dtype=torch.float32) * spec.position_id_per_seconds).float()
    keys = torch.cat([video_t.repeat_interleave(per_step), torch.arange(n_audio, dtype=torch.float32)])
    order = torch.sort(keys, stable=True).indices
    return (order >= gt * per_step).tolist()


def _talker_ids(tcfg) -> dict:
    return dict(image_token_id=tcfg.image_token_id, video_token_id=tcfg.video_token_id,
                audio_token_id=tcfg.audio_token_id, vision_start_token_id=tcfg.vision_start_token_id,
                audio_start_token_id=tcfg.audio_start_token_id,
                position_id_per_seconds=tcfg.position_id_per_seconds)


def _suppress_mask(tcfg, device) -> torch.Tensor:
    """The top 1024 codec ids but codec EOS are never sampled (transformers' ``suppress_tokens``)."""
    vocab = tcfg.text_config.vocab_size
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    mask[max(vocab - 1024, 0):] = True
    mask[tcfg.codec_eos_token_id] = False
    return mask


def _patchify(frames: torch.Tensor, patch: int, temporal: int, merge: int):
    """``[F, 3, H, W]`` float frames (an image is one frame) -> (patches ``[t*h*w, 3*temporal*patch*patch]`` in the
    merge-block order the Qwen image/video processors use, grid ``(t, h, w)``): resized so h and w are multiples
    of ``merge`` patches, frames padded to a multiple of ``temporal`` by repeating the last one (an image is
    repeated over the temporal patch)."""
    unit = patch * merge
    H = max(unit, round(frames.shape[-2] / unit) * unit)
    W = max(unit, round(frames.shape[-1] / unit) * unit)
    frames = torch.nn.functional.interpolate(frames.float(), size=(H, W), mode="bilinear", align_corners=False)
    pad = (-frames.shape[0]) % temporal
    if pad:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    gt, gh, gw = frames.shape[0] // temporal, H // patch, W // patch
    x = frames.reshape(gt, temporal, 3, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, 3 * temporal * patch * patch), (gt, gh, gw)


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
