"""The streaming scheduler: one loop for every model family, driving a stage adapter.

A :class:`StreamRun` is one ``stream()`` call: preprocessing, thinker prefill, then (with a talker) talker prefill
and the interleaved decode — one codec frame per talker step (the adapter's ``frame``: the MTP code predictor for
Qwen3-Omni), each frame streamed through the codec as soon as the schedule allows, the thinker stepped just far
enough ahead for the talker's next text input — and finally the text after the speech budget, read one step behind
the device. Every stage boundary reads the device clock (:func:`~omni_fast.pipeline.device.now`) so the per-request
:class:`~omni_fast.pipeline.requests.RequestTiming` holds stage times, not launch times.

The adapter (one per model family, e.g. :class:`omni_fast.pipeline.qwen3.Qwen3Stages`) offers:

- ``device``, ``has_talker``, ``text_eos``, ``codec_eos``; ``validate(reqs, opts)``; ``speaker_id(name)``;
  ``samplers(opts, generator) -> (text, codec, frame)``; ``graph_default()``; ``begin()`` (before any work);
- ``prepare(reqs) -> prompt`` (``prompt.ids`` / ``prompt.mask`` ``[B, S]`` on the device);
- ``thinker_prefill(prompt, opts) -> (logits [B, V], ctx)``;
  ``thinker_decode(prompt, ctx, opts, graph, lease) -> TextDecode``; ``embed(token [B]) -> [B, 1, D]``;
- ``talker_prefill(prompt, ctx, first_token [B], speaker_id, opts) -> (logits [B, V], hidden [B, 1, H], tctx)``;
  ``talker_decode(tctx, opts, graph, lease) -> TextDecode``;
- ``frame(hidden [B, 1, H], c0 [B], sampler) -> (codes [B, Q], feedback [B, 1, H])`` (the frame's codebooks and
  the talker's codec input for the next step); ``talker_input(step, generated, text_done) -> [B, 1, H]`` (the text
  side of talker step ``step``);
- ``codec(batch, lease, opts)`` (``ready(n_frames, final)``, ``step(codes [B, Q, T]) -> wav [B, S]``, ``done``;
  a codec with ``takes_lengths`` gets ``step(codes, frames_per_row)``); ``codec_pick(logits, history, sampler,
  penalty) -> [B]``;
- optional: ``text_ahead`` (default 1): talker step ``k`` needs text tokens ``0 .. k + text_ahead`` (Qwen2.5-Omni:
  2, its talker reads the thinker's hidden state of token ``k + 1``, known once token ``k + 2`` is); and
  ``codec_stop_ids`` (default ``(codec_eos,)``): the codec ids that end a row's speech; ``last_code_is_frame``
  (default False): the talker's last code is a whole frame (one codebook; Qwen3-Omni's needs an MTP pass);
  ``family`` (default ``"qwen3-omni"``: the latency table :meth:`RequestTiming.table` prints); ``frame_stage`` /
  ``codec_stage`` (default ``"MTP"`` / ``"Code2Wav"``): the names of the frame and codec stages in ``stages``. A
  codec with a ``parts`` dict (part name -> seconds of its last ``step``) has its time split into those parts
  (``stages``: ``"<codec_stage> <part>"``; per request: ``RequestTiming.codec_parts``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from ..integrations.hf_compat import output_cache, with_cache
from .device import AsyncHostCopy, Lease, now, to_device
from .requests import Clocks, Event


@dataclass
class StreamOptions:
    """The arguments of ``stream`` (see :meth:`omni_fast.models.Qwen3Omni.stream`)."""

    max_new_tokens: int = 32
    talker_max_new_tokens: int = 64
    talker_min_new_tokens: int = 0
    speaker: str = "ethan"
    do_sample: bool = False
    talker_do_sample: bool = False
    talker_repetition_penalty: float = 1.0
    first_chunk: int = 1
    chunk: int = 12
    left_context: int = 25
    prefill_chunk: int | None = None
    static_cache: bool = False
    graph_decode: bool | None = None
    seed: int = 0


class StageAdapter:
    """What every model family's stage adapter shares (``pipe``, ``model`` and ``device`` set by the subclass)."""

    def samplers(self, opts, gen):
        """The pipeline object's samplers (transformers' defaults for the family)."""
        return self.pipe.samplers(opts, gen)

    def graph_default(self) -> bool:
        """Patched now (patch() may have been called on the model after construction) and on CUDA."""
        return self.device.type == "cuda" and bool(self.model.__dict__.get("_omni_fast_patched", False))


class TextDecode:
    """One decode step of a decoder-only text model (thinker or talker) after its prefill: on omni-fast's decoder
    (own static KV cache, one graph replay per step on CUDA) when ``decoder`` is given, else on transformers'
    ``text_model`` with its cache ``cache`` and the growing attention ``mask`` ``[B, S]``. ``next_pos`` ``[B]``:
    the next (M-)RoPE position, the same in all three rows."""

    def __init__(self, text_model, head, next_pos: torch.Tensor, *, decoder=None, cache=None, mask=None):
        self.text_model, self.head, self.decoder = text_model, head, decoder
        self.next_pos, self.cache, self.mask = next_pos, cache, mask

    def step(self, embeds: torch.Tensor):
        """``embeds [B, 1, D]`` -> (logits ``[B, V]``, last hidden ``[B, 1, D]``); advances the position."""
        if self.decoder is not None:
            logits, hidden = self.decoder.step(embeds[:, 0], self.next_pos)
            hidden = None if hidden is None else hidden[:, None]
        else:
            B = embeds.shape[0]
            self.mask = torch.cat([self.mask, self.mask.new_ones(B, 1)], dim=1)
            p = self.next_pos.view(1, B, 1).expand(3, B, 1)
            out = self.text_model(inputs_embeds=embeds, attention_mask=self.mask, position_ids=p,
                                  **with_cache(self.cache), use_cache=True)
            self.cache = output_cache(out)  # (the same cache object, under either transformers' field name)
            hidden = out.last_hidden_state[:, -1:]
            logits = self.head(hidden[:, 0])
        self.next_pos = self.next_pos + 1
        return logits, hidden


class StreamRun:
    """The state of one ``stream()`` call over ``adapter``; :meth:`events` yields its :class:`Event` s."""

    def __init__(self, adapter, reqs: list, opts: StreamOptions):
        adapter.validate(reqs, opts)
        self.a, self.reqs, self.o = adapter, reqs, opts
        self.dev, self.B = adapter.device, len(reqs)
        self.graph = adapter.graph_default() if opts.graph_decode is None else opts.graph_decode
        adapter.begin()
        # Held by this generator while it runs: the decoders it loads are its own until it ends or is dropped, so
        # interleaved streams never share a decoder's KV cache.
        self.lease = Lease()
        self.speaker_id = adapter.speaker_id(opts.speaker) if adapter.has_talker else None
        gen = torch.Generator(device=self.dev).manual_seed(opts.seed)
        self.text_sampler, self.codec_sampler, self.frame_sampler = adapter.samplers(opts, gen)
        self.thinker_time, self.thinker_steps = 0.0, 0
        self.text_ahead = getattr(adapter, "text_ahead", 1)
        self.codec_stops = set(getattr(adapter, "codec_stop_ids", (adapter.codec_eos,)))
        self._stop_ids = None  # the stop ids as a device tensor, made at the first talker_min_new_tokens mask

    # ------------------------------------------------------------------------------------------------- thinker
    def events(self) -> Iterator[Event]:
        a, o, B, dev = self.a, self.o, self.B, self.dev
        t_start = now(dev)
        self.clocks = clk = Clocks(B, t_start, getattr(a, "family", "qwen3-omni"))
        prompt = a.prepare(self.reqs)
        self.t_pre = now(dev)
        for tm in clk.timings:
            tm.preprocessing = self.t_pre - t_start
        logits, ctx = a.thinker_prefill(prompt, o)
        self.token = self.text_sampler(logits)
        self.t_first = now(dev)
        self.generated = [[int(x)] for x in self.token.tolist()]
        self.text_done = [g[0] == a.text_eos or o.max_new_tokens <= 1 for g in self.generated]
        for i in range(B):
            clk.timings[i].thinker_ttft = self.t_first - self.t_pre
            clk.last_text[i] = self.t_first - t_start
            yield a.text_event(i, self.generated[i])
        t0 = now(dev) if self.graph else 0.0  # graph decode: counted as decode time (a bucket's first batch also
        # captures the graph here)
        self.thinker = a.thinker_decode(prompt, ctx, o, self.graph, self.lease)
        if self.graph:
            dt = now(dev) - t0
            self.thinker_time += dt
            clk.charge(clk.thinker, dt, [i for i in range(B) if not self.text_done[i]])
        if not a.has_talker:  # a text-only checkpoint (enable_audio_output=False): no talker, no audio
            yield from self._thinker_tail()
            yield from self._finish(None, None, None, self._stages())
            return
        yield from self._talk(prompt, ctx)

    def _stages(self, **talker) -> dict:
        return {"preprocessing": self.t_pre - self.clocks.t_start, "thinker prefill": self.t_first - self.t_pre,
                "thinker decode": self.thinker_time, **talker}

    def _thinker_launch(self, done: torch.Tensor) -> torch.Tensor:
        """Queue one thinker step (no host sync); ``done`` bool ``[B]``: rows finished before it (they get EOS, as
        transformers pads finished rows). Returns the new ids on the device."""
        logits, _ = self.thinker.step(self.a.embed(self.token))
        nxt = self.text_sampler(logits.float())
        nxt = torch.where(done, torch.full_like(nxt, self.a.text_eos), nxt)
        self.token = nxt
        self.thinker_steps += 1
        return nxt

    def _thinker_read(self, ids: list[int]) -> list[Event]:
        """The host side of a step: stream the ids of unfinished rows, decide which rows stop."""
        events, t = [], time.perf_counter() - self.clocks.t_start  # (the ids are on the host: the step has run)
        for i, tid in enumerate(ids):
            if not self.text_done[i]:
                self.generated[i].append(tid)
                self.text_done[i] = tid == self.a.text_eos or len(self.generated[i]) >= self.o.max_new_tokens
                self.clocks.last_text[i] = t
                events.append(self.a.text_event(i, [tid]))
        return events

    def _thinker_step(self) -> list[Event]:
        """One step whose ids the talker needs now: read at once."""
        active = [i for i in range(self.B) if not self.text_done[i]]
        t0 = now(self.dev)
        nxt = self._thinker_launch(to_device(self.text_done, self.dev))
        dt = now(self.dev) - t0
        self.thinker_time += dt
        self.clocks.charge(self.clocks.thinker, dt, active)
        return self._thinker_read(nxt.tolist())

    def _thinker_tail(self) -> Iterator[Event]:
        """The text after the speech budget: nothing waits for these ids, so step k+1 is queued before step k's ids
        (copied to pinned memory without blocking) are read, and the stop check runs on the host one step behind
        the device; finished rows are tracked on the device meanwhile. The only cost: one step computed after the
        last row finished, and discarded (it draws from the text sampler's generator, which nothing uses
        afterwards)."""
        t0 = now(self.dev)
        done, pending = to_device(self.text_done, self.dev), None
        while not all(self.text_done):
            queued = None
            if self.thinker_steps < self.o.max_new_tokens - 1:  # useful while a row may still be unfinished
                nxt = self._thinker_launch(done)
                done = done | (nxt == self.a.text_eos)
                queued = AsyncHostCopy(nxt)
            if pending is None and queued is None:
                break
            if pending is not None:
                active = [i for i in range(self.B) if not self.text_done[i]]
                events = self._thinker_read(pending.tolist())
                dt = time.perf_counter() - t0  # (the consumer's time is not decode time)
                self.thinker_time += dt
                self.clocks.charge(self.clocks.thinker, dt, active)
                yield from events
                t0 = time.perf_counter()
            pending = queued
        self.thinker_time += now(self.dev) - t0  # (the discarded step: batch time, no row's)

    def _finish(self, codes_hist, n_frames, audio_len, stages) -> Iterator[Event]:
        """The "done" event of every request, with its own clocks."""
        for i, tm in enumerate(self.clocks.finish(self.generated, codes_hist, n_frames, audio_len, stages)):
            yield Event(i, "done", timing=tm)

    # -------------------------------------------------------------------------------------------------- talker
    def _codec_pick(self, logits: torch.Tensor, history: list[list[int]]) -> torch.Tensor:
        """The next codec id per row (``logits [B, V]``; ``history``: each row's codes so far, ``[]`` at the
        prefill). ``talker_min_new_tokens``: transformers' ``min_new_tokens`` for the talker: a row with fewer codes
        than that cannot pick a stop id (its logits are -inf), so a random-weight talker still speaks."""
        logits, o = logits.float(), self.o
        short = [len(history[i]) < o.talker_min_new_tokens if history else o.talker_min_new_tokens > 0
                 for i in range(logits.shape[0])]
        if any(short):
            if self._stop_ids is None:
                self._stop_ids = torch.tensor(sorted(self.codec_stops), device=logits.device)
            stops, rows = self._stop_ids, torch.tensor(short, device=logits.device)
            logits = logits.clone()
            logits[:, stops] = torch.where(rows[:, None], float("-inf"), logits[:, stops])
        return self.a.codec_pick(logits, history, self.codec_sampler, o.talker_repetition_penalty)

    def _talk(self, prompt, ctx) -> Iterator[Event]:
        """Talker prefill, then the interleaved decode: thinker tokens, talker frames, codec chunks."""
        a, o, B, dev, clk = self.a, self.o, self.B, self.dev, self.clocks
        yield from self._text_up_to(-1)
        t0 = now(dev)
        logits, hidden, tctx = a.talker_prefill(prompt, ctx, self.token, self.speaker_id, o)
        c0 = self._codec_pick(logits, [])
        talker_prefill = now(dev) - t0
        for tm in clk.timings:
            tm.talker_ttft = talker_prefill
        self.talker_time, self.frame_time, self.codec_time, self.codec_parts = 0.0, 0.0, 0.0, {}
        self.codes_hist = [[int(x)] for x in c0.tolist()]
        speech_done = [c in self.codec_stops for c in c0.tolist()]
        t0 = now(dev) if self.graph else 0.0
        talker = a.talker_decode(tctx, o, self.graph, self.lease)
        if self.graph:
            dt = now(dev) - t0
            self.talker_time += dt
            clk.charge(clk.talker, dt, [i for i in range(B) if not speech_done[i]])
        self.frames: list[torch.Tensor] = []  # [B, Q] per frame
        self.n_frames, self.audio_len = [0] * B, [0] * B
        self.codec = a.codec(B, self.lease, o)
        for step in range(o.talker_max_new_tokens - 1):
            if all(speech_done):
                break
            active = [i for i in range(B) if not speech_done[i]]
            t0 = now(dev)
            codes, feedback = a.frame(hidden, c0, self.frame_sampler)
            dt = now(dev) - t0
            self.frame_time += dt
            clk.charge(clk.mtp, dt, active)
            self.frames.append(codes.masked_fill(to_device(speech_done, dev)[:, None], 0))
            for i in active:
                self.n_frames[i] += 1
            yield from self._emit_audio(final=False)  # the frame needs no new text: audio goes out first
            yield from self._text_up_to(step)
            t0 = now(dev)
            text_in = a.talker_input(step, self.generated, self.text_done)
            logits, hidden = talker.step(feedback + text_in)
            c0 = self._codec_pick(logits, self.codes_hist)
            for i, c in enumerate(c0.tolist()):
                if not speech_done[i]:
                    self.codes_hist[i].append(c)
                    speech_done[i] = c in self.codec_stops
            dt = now(dev) - t0
            self.talker_time += dt
            clk.charge(clk.talker, dt, active)
        if getattr(a, "last_code_is_frame", False) and not all(speech_done):
            # one codebook (Qwen2.5-Omni): the last code is a whole frame, as in transformers' generate
            self.frames.append(c0[:, None].masked_fill(to_device(speech_done, dev)[:, None], 0))
            for i in range(B):
                self.n_frames[i] += not speech_done[i]
        yield from self._emit_audio(final=True)
        yield from self._thinker_tail()  # text longer than the speech budget (the RTF clock has stopped)
        yield from self._finish(self.codes_hist, self.n_frames, self.audio_len,
                                self._stages(**{"talker prefill": talker_prefill, "talker decode": self.talker_time,
                                                getattr(a, "frame_stage", "MTP"): self.frame_time,
                                                **self._codec_stages()}))

    def _codec_stages(self) -> dict:
        """The codec's batch seconds: one stage, or one per part when the codec times parts, plus the rest of its
        time (its host-side checks and assembly around the parts) as ``"<codec> other"``: the split adds up."""
        name = getattr(self.a, "codec_stage", "Code2Wav")
        if not self.codec_parts:
            return {name: self.codec_time}
        parts = {f"{name} {part}": sec for part, sec in self.codec_parts.items()}
        return {**parts, f"{name} other": max(self.codec_time - sum(self.codec_parts.values()), 0.0)}

    def _text_up_to(self, step: int) -> Iterator[Event]:
        """Run the thinker until talker step ``step`` (-1: its prefill) has its text input: the talker's step k
        reads text token k+1 (Qwen3-Omni: its embedding; ``text_ahead`` = 2: the thinker's hidden state there)."""
        while not all(self.text_done) and any(len(self.generated[i]) < step + 1 + self.text_ahead
                                              for i in range(self.B) if not self.text_done[i]):
            yield from self._thinker_step()

    def _emit_audio(self, final: bool) -> list[Event]:
        """The codec chunk the schedule allows now (if any), cut per row at the row's own frame count (rows that
        ended keep getting ignored frames)."""
        frames, codec = self.frames, self.codec
        if not frames or not codec.ready(len(frames), final):
            return []
        t0 = now(self.dev)
        start = codec.done
        codes = torch.stack(frames, dim=-1)
        wav = (codec.step(codes, list(self.n_frames)) if getattr(codec, "takes_lengths", False)
               else codec.step(codes)).float()
        dt = now(self.dev) - t0
        self.codec_time += dt
        parts = getattr(codec, "parts", None) or {}
        for part, sec in parts.items():
            self.codec_parts[part] = self.codec_parts.get(part, 0.0) + sec
        per_frame = wav.shape[-1] / max(len(frames) - start, 1)
        events, rows = [], []
        for i in range(self.B):
            keep = max(0, min(self.n_frames[i], len(frames)) - start)
            if keep == 0:
                continue
            n = wav.shape[-1] if self.n_frames[i] >= len(frames) else int(round(keep * per_frame))
            chunk_wav = wav[i, :n].cpu()
            self.audio_len[i] += chunk_wav.numel()
            rows.append(i)
            events.append(Event(i, "audio", audio=chunk_wav))
        self.clocks.audio_out(rows, time.perf_counter() - self.clocks.t_start)  # (the chunks are on the host)
        self.clocks.charge(self.clocks.codec, dt, rows)
        self.clocks.charge_parts(parts, rows)
        return events
