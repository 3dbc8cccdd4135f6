"""The pipeline's pluggable stages: the MTP code predictor frame step and the streaming Code2Wav decoder.

ONE place picks each implementation: :func:`pick` returns ``omni_fast.models.<Name>`` built from the transformers
module when omni-fast provides it (``<Name>.from_transformers(module)``), else the transformers-module version
written here. Both versions have the same small interface:

- code predictor: ``frame(past_hidden [B, 1, H], c0 [B] int64, sampler) -> (residual codes [B, Q-1] int64,
  summed codec embedding [B, 1, H])`` — one MTP frame step (prefill ``[past_hidden, emb(c0)]`` -> c1, then
  ``Q-2`` single-token steps), and the talker's next-step input (sum of all ``Q`` codebook embeddings);
- Code2Wav: ``decode(codes [B, Q, T] int64) -> wav [B, 1, S]`` plus ``total_upsample``; the streaming (left
  context, chunk schedule) lives in :class:`StreamingCodec`, outside the decoder.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .._cache_memory import record_copy_use
from ..backend import graph_capturable
from ..integrations.hf_compat import output_cache, with_cache

Sampler = Callable[[torch.Tensor], torch.Tensor]  # logits [B, V] float -> ids [B] int64


def pick(name: str, hf_module: nn.Module, fallback: Callable[[nn.Module], object]):
    """``omni_fast.models.<name>.from_transformers(hf_module)`` if omni-fast provides it, else ``fallback(...)``."""
    from .. import models

    impl = getattr(models, name, None)
    # A class opts in by declaring PIPELINE_STAGE = True (it then offers the interface in the module docstring).
    if impl is not None and getattr(impl, "PIPELINE_STAGE", False):
        return impl.from_transformers(hf_module)
    # omni_fast.models.CodePredictor / Code2Wav do not offer the stage interface yet (predict_frame samples with
    # its own RNG; Code2Wav streams exactly with stream()): the transformers modules run here, on the kernels
    # omni_fast.patch swapped into them (the whole Code2Wav vocoder included).
    return fallback(hf_module)


class HFCodePredictor:
    """The MTP frame step on transformers' ``Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration`` modules
    (the same computation its ``generate`` does inside the talker, without the generate machinery)."""

    name = "transformers code predictor (own frame loop)"

    def __init__(self, module: nn.Module, codec_embedding: nn.Module):
        self.module, self.codec_embedding = module, codec_embedding

    @torch.no_grad()
    def frame(self, past_hidden: torch.Tensor, c0: torch.Tensor, sampler: Sampler):
        from transformers.cache_utils import DynamicCache

        cp = self.module
        embeds = cp.model.get_input_embeddings()  # ModuleList: table g-1 embeds residual code g
        c0_embed = self.codec_embedding(c0[:, None])
        cache = DynamicCache(config=cp.config)
        out = cp.model(inputs_embeds=torch.cat([past_hidden, c0_embed], dim=1), **with_cache(cache),
                       use_cache=True)
        codes = [sampler(cp.lm_head[0](out.last_hidden_state[:, -1]).float())]
        total = c0_embed
        for g in range(2, len(cp.lm_head) + 1):
            emb = embeds[g - 2](codes[-1][:, None])
            total = total + emb
            out = cp.model(inputs_embeds=emb, **with_cache(output_cache(out)), use_cache=True)
            codes.append(sampler(cp.lm_head[g - 1](out.last_hidden_state[:, -1]).float()))
        total = total + embeds[len(cp.lm_head) - 1](codes[-1][:, None])
        return torch.stack(codes, dim=1), total


class HFCode2Wav:
    """transformers' ``Qwen3OmniMoeCode2Wav`` forward as the codec decoder."""

    name = "transformers Code2Wav"

    def __init__(self, module: nn.Module):
        self.module = module
        self.total_upsample = int(module.total_upsample)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.module(codes)


class StreamingCodec:
    """Streams a growing code sequence through a Code2Wav decoder in chunks with left context.

    The first chunk is ``first_chunk`` frames (small: it sets the first-packet latency), later ones ``chunk``
    frames; each chunk is decoded with up to ``left_context`` earlier frames and their samples are cut off, as
    transformers' ``chunked_decode`` does (``first_chunk == chunk == 300``, ``left_context == 25`` reproduces it).
    """

    def __init__(self, decoder, *, first_chunk: int = 1, chunk: int = 12, left_context: int = 25):
        self.decoder, self.first_chunk, self.chunk, self.left_context = decoder, first_chunk, chunk, left_context
        self.done = 0  # frames already turned into audio

    def ready(self, frames: int, final: bool) -> bool:
        """Whether ``frames`` decoded frames make a chunk now (or the rest, at the end)."""
        want = self.first_chunk if self.done == 0 else self.chunk
        return frames - self.done >= want or (final and frames > self.done)

    def step(self, codes: torch.Tensor) -> torch.Tensor:
        """Decode the frames of ``codes [B, Q, T]`` not decoded yet (with left context); returns ``[B, S]``."""
        start, end = self.done, codes.shape[-1]
        context = self.left_context if start - self.left_context > 0 else start
        wav = self.decoder.decode(codes[..., start - context:end])
        self.done = end
        return wav[..., context * self.decoder.total_upsample:].reshape(codes.shape[0], -1)


class ExactStreamingCodec:
    """:class:`StreamingCodec`'s interface on :meth:`omni_fast.models.Code2Wav.stream`: each step decodes only the
    new frames, carrying every layer's state instead of re-decoding ``left_context`` frames, and returns exactly the
    samples that are final (their concatenation equals the one-shot decode: no seams).

    ``first_chunk`` and ``chunk`` set the schedule as in :class:`StreamingCodec`; there is no left context.
    ``stream``: a long-lived :meth:`new_stream` of this batch size to reuse (with its CUDA graphs: a new utterance
    then captures nothing, once the stream has been reused before); every row is reset, and the reset rows' lead zeros are dropped, so the audio is the
    same as a new stream's. Default: a new stream.
    """

    def __init__(self, code2wav, batch_size: int, *, first_chunk: int = 1, chunk: int = 12, stream=None):
        self.drop = 0  # samples to drop from the first push: a reused stream's lead zeros
        if stream is None:
            stream = self.new_stream(code2wav, batch_size)
        elif stream.frames > 0:
            stream.reset(torch.ones(batch_size, dtype=torch.bool, device=code2wav.device))  # every row, no copy
            self.drop = stream.lead_samples
        self.stream = stream
        self.first_chunk, self.chunk = first_chunk, chunk
        self.done = 0  # frames already pushed

    @staticmethod
    def new_stream(code2wav, batch_size: int):
        """A :class:`~omni_fast.models.code2wav.Code2WavStream` of ``batch_size`` rows, on CUDA graphs where they
        can run (a CUDA model on a capturable backend)."""
        return code2wav.stream(batch_size, cuda_graphs=code2wav.device.type == "cuda"
                               and graph_capturable(code2wav.backend))

    def ready(self, frames: int, final: bool) -> bool:
        want = self.first_chunk if self.done == 0 else self.chunk
        return frames - self.done >= want or (final and frames > self.done)

    def step(self, codes: torch.Tensor) -> torch.Tensor:
        """Push the frames of ``codes [B, Q, T]`` not pushed yet; returns the new final samples ``[B, S]``."""
        start, end = self.done, codes.shape[-1]
        wav = self.stream.push(codes[..., start:end].contiguous())
        if self.drop and wav.shape[-1]:  # (a push of no frame returns no sample, the lead comes later)
            wav, self.drop = wav[..., self.drop:], 0
        self.done = end
        return wav.reshape(codes.shape[0], -1)


class OmniCodePredictor:
    """The MTP stage on :meth:`omni_fast.models.CodePredictor.predict_frame`: static KV cache, fused layer kernels,
    one CUDA-graph replay per frame on a GPU. Same ``frame`` interface as :class:`HFCodePredictor`; the sampler's
    settings (see ``make_sampler``) are read from its attributes: greedy decoding gives the same codes, sampling
    draws from the same top-k / top-p distribution with omni-fast's counter-based RNG (a fresh seed per frame from
    the sampler's generator)."""

    name = "omni-fast CodePredictor (predict_frame)"

    def __init__(self, code_predictor, backend: str | None = None):
        self.cp, self.backend = code_predictor, backend

    @torch.no_grad()
    def frame(self, past_hidden: torch.Tensor, c0: torch.Tensor, sampler: Sampler):
        do_sample = bool(getattr(sampler, "do_sample", False))
        seed = int(torch.randint(0, 2**62, (), generator=getattr(sampler, "generator", None))) if do_sample else 0
        # the pipeline's stages may be swapped (new weights) mid-request, and a stream resumed on another CUDA
        # stream: recorded where it runs (once per stream; later frames one set check)
        record_copy_use(self.cp, self.cp.norm.device)
        codes, summed = self.cp.predict_frame(
            past_hidden[:, 0], c0, do_sample=do_sample, top_k=getattr(sampler, "top_k", 50),
            top_p=getattr(sampler, "top_p", 1.0), temperature=getattr(sampler, "temperature", 1.0), seed=seed,
            backend=self.backend)
        return codes[:, 1:], summed[:, None]
