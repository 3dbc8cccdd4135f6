"""Requests, events and per-request timing of the streaming pipelines (model-family independent).

:class:`Request` (what a caller asks), :class:`Event` (what ``stream`` yields), :class:`RequestTiming` (the
technical report's latency terms, per request), the samplers, the mel front end, the checks run on requests and
stream arguments before any work, and :class:`Clocks`, the per-row decode-time ledger the scheduler fills.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from ..validation import check_positive_int, check_tensor

SAMPLE_RATE_IN = 16000
SAMPLE_RATE_OUT = 24000
# The shortest waveform accepted: one 25 ms STFT window (the mel front end reflect-pads n_fft / 2 on each side,
# which needs more samples than that; shorter inputs would fail inside numpy/torch padding).
MIN_AUDIO_SAMPLES = 400
INPUT_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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

    ``family``: the model family that ran (``"qwen3-omni"`` | ``"qwen2.5-omni"``): :meth:`table` prints that
    family's rows. ``codec_parts``: per codec part (Qwen2.5-Omni's Token2Wav: ``"DiT solve"``, ``"BigVGAN"``), its
    time in the calls that carried the request's codes / its codes (the ``codec_per_code`` rule, split); empty when
    the codec times no parts (Qwen3-Omni's Code2Wav).
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
    family: str = "qwen3-omni"
    codec_parts: dict = field(default_factory=dict)  # codec part -> seconds per code (Qwen2.5-Omni's Token2Wav)

    def table(self) -> list[tuple[str, str]]:
        """(row name, value) of the family's latency table: only what this family's pipeline times."""
        ms = lambda s: f"{s * 1e3:.1f} ms"  # noqa: E731
        if self.family == "qwen2.5-omni":
            return self._table25(ms)
        return [("preprocessing", ms(self.preprocessing)), ("thinker TTFT", ms(self.thinker_ttft)),
                ("talker TTFT", ms(self.talker_ttft)), ("MTP per frame", ms(self.mtp_per_frame)),
                ("codec per code", ms(self.codec_per_code)), ("first audio packet", ms(self.first_packet)),
                ("last audio packet", ms(self.last_audio)),
                ("thinker tokens/s", f"{self.thinker_tokens_per_s:.1f}"),
                ("talker tokens/s", f"{self.talker_tokens_per_s:.1f}"), ("RTF", f"{self.rtf:.3f}"),
                ("text tokens", str(self.text_tokens)), ("codec frames", str(self.frames)),
                ("audio", f"{self.audio_seconds:.2f} s"), ("total", ms(self.total))]

    def _table25(self, ms) -> list[tuple[str, str]]:
        """Qwen2.5-Omni: one codebook (no MTP), the talker timed per code, Token2Wav (DiT ODE solve, then
        BigVGAN) per code, whole and split."""
        steps = self.talker_tokens - 1  # decode steps (the first code comes from the prefill)
        parts = [(f"{name} per code", ms(sec)) for name, sec in self.codec_parts.items()]
        return [("preprocessing", ms(self.preprocessing)), ("thinker TTFT", ms(self.thinker_ttft)),
                ("talker TTFT", ms(self.talker_ttft)),
                ("talker per code", ms(self.talker_decode / steps if steps > 0 else 0.0)),
                ("Token2Wav per code", ms(self.codec_per_code)), *parts,
                ("first audio packet", ms(self.first_packet)), ("last audio packet", ms(self.last_audio)),
                ("thinker tokens/s", f"{self.thinker_tokens_per_s:.1f}"),
                ("talker tokens/s", f"{self.talker_tokens_per_s:.1f}"), ("RTF", f"{self.rtf:.3f}"),
                ("text tokens", str(self.text_tokens)), ("codec codes", str(self.frames)),
                ("audio", f"{self.audio_seconds:.2f} s"), ("total", ms(self.total))]


@dataclass
class Event:
    """What a pipeline's ``stream`` yields: a text delta (token ids; ``text`` decoded when a tokenizer is known),
    an audio chunk (``[S]`` float32 at 24 kHz), or the end of a request (with its timing)."""

    request: int
    kind: str  # "text" | "audio" | "done"
    token_ids: list[int] | None = None
    text: str | None = None
    audio: torch.Tensor | None = None
    timing: RequestTiming | None = None


# ----------------------------------------------------------------------------------------------- front ends
def _scores(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """fp32 ``logits / temperature`` (a new tensor: the caller's stays untouched; fp32 as transformers' ``generate``
    casts the logits), every NaN -inf and every +inf the largest finite fp32: a row with +inf draws among its +inf
    ids alone (a +inf in the softmax would make the whole row NaN, which ``torch.multinomial`` on CUDA answers with a
    device-side assert, as it does a NaN)."""
    s = logits.float() / temperature
    return s.nan_to_num(nan=float("-inf"), posinf=torch.finfo(torch.float32).max, neginf=float("-inf"))


def make_sampler(do_sample: bool, *, top_k: int = 50, top_p: float = 1.0, temperature: float = 1.0,
                 generator: torch.Generator | None = None):
    """logits ``[B, V]`` -> ids ``[B]``: greedy, or top-k / top-p sampling at ``temperature``.

    NaN logits follow the project's sampling rule (reference/sampling.py, as ``ops.sample``): a NaN is -inf, never
    drawn; a row of only NaN and -inf gives id 0. A +inf logit (an fp16 overflow) is the only candidate of its row
    (several: drawn among them). Scores are fp32, as transformers' ``generate`` casts the logits. Why not torch's behaviour (transformers'): ``argmax`` picks a NaN,
    and ``torch.multinomial`` over a NaN softmax raises on the CPU but trips a device-side assert on CUDA, which
    kills the server's CUDA context for every request, not just the one whose model overflowed. Rows without NaN
    draw exactly what they drew before (the same generator calls)."""
    if not do_sample:
        def greedy(logits: torch.Tensor) -> torch.Tensor:
            return _scores(logits).argmax(-1)  # a row of only -inf: id 0 (argmax's first maximum)

        greedy.do_sample = False
        return greedy

    def sample(logits: torch.Tensor) -> torch.Tensor:
        logits = _scores(logits, max(temperature, 1e-5))
        if top_k and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        # a row with nothing left to draw (only -inf): all its weight on id 0, not a NaN softmax
        dead = logits.amax(-1, keepdim=True) == float("-inf")
        logits = logits.masked_fill(dead & (torch.arange(logits.shape[-1], device=logits.device) == 0), 0.0)
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


# --------------------------------------------------------------------------------------------------- validation
def check_request(i: int, r, vocab: int) -> None:
    """A request's fields, before any work: clear errors naming ``requests[i].<field>``; ``vocab``: the thinker's
    text vocabulary size (token ids must lie below it)."""
    name = f"requests[{i}]"
    if not isinstance(r, Request):
        raise TypeError(f"{name} must be an omni_fast.models.Request, got {type(r).__name__}")
    if isinstance(r.text, (list, tuple)):
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

def check_stream_args(*, max_new_tokens, talker_max_new_tokens, first_chunk, chunk, left_context,
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


# ------------------------------------------------------------------------------------------------------- clocks
class Clocks:
    """The per-request clocks of one stream (see :class:`RequestTiming`): each row is charged the decode time of
    the batch steps it took part in (a row that finished idles on pad tokens and is not charged)."""

    def __init__(self, batch: int, t_start: float, family: str = "qwen3-omni"):
        self.t_start = t_start
        self.timings = [RequestTiming(family=family) for _ in range(batch)]
        self.thinker, self.talker, self.mtp, self.codec = ([0.0] * batch for _ in range(4))
        self.codec_parts = [{} for _ in range(batch)]  # per row: codec part -> seconds (codecs that time parts)
        self.last_text = [0.0] * batch  # seconds from the start to the row's last text token

    @staticmethod
    def charge(acc: list[float], dt: float, rows) -> None:
        for i in rows:
            acc[i] += dt

    def charge_parts(self, parts: dict, rows) -> None:
        """Charge a codec call's parts (name -> seconds) to ``rows``, as :meth:`charge` does its whole time."""
        for i in rows:
            for name, sec in parts.items():
                self.codec_parts[i][name] = self.codec_parts[i].get(name, 0.0) + sec

    def audio_out(self, rows, now: float) -> None:
        """Rows whose audio chunk reached the host at ``now`` (seconds from the start)."""
        for i in rows:
            tm = self.timings[i]
            tm.last_audio = now
            if math.isnan(tm.first_packet):
                tm.first_packet = now

    def finish(self, generated, codes_hist, n_frames, audio_len, stages: dict) -> list[RequestTiming]:
        """Every request's :class:`RequestTiming`, from its own clocks and what it produced."""
        for i, tm in enumerate(self.timings):
            tm.text_tokens = len(generated[i])
            tm.talker_tokens = len(codes_hist[i]) if codes_hist else 0
            tm.frames = n_frames[i] if n_frames else 0
            tm.mtp_per_frame = self.mtp[i] / tm.frames if tm.frames else 0.0
            tm.codec_per_code = self.codec[i] / tm.frames if tm.frames else 0.0
            tm.codec_parts = {name: sec / tm.frames if tm.frames else 0.0 for name, sec in self.codec_parts[i].items()}
            tm.thinker_decode, tm.talker_decode = self.thinker[i], self.talker[i]
            tm.thinker_tokens_per_s = (tm.text_tokens - 1) / self.thinker[i] if self.thinker[i] > 0 else 0.0
            tm.talker_tokens_per_s = (tm.talker_tokens - 1) / self.talker[i] if self.talker[i] > 0 else 0.0
            tm.audio_seconds = (audio_len[i] if audio_len else 0) / SAMPLE_RATE_OUT
            tm.last_text = self.last_text[i]
            tm.total = max(tm.last_text, 0.0 if math.isnan(tm.last_audio) else tm.last_audio)
            tm.rtf = tm.last_audio / tm.audio_seconds if tm.audio_seconds else float("nan")
            tm.stages = dict(stages)
        return self.timings
