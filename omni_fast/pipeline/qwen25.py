"""The Qwen2.5-Omni stage adapter of the streaming scheduler (:mod:`omni_fast.pipeline.scheduler`).

Stages on transformers' ``Qwen2_5OmniForConditionalGeneration`` modules (patched or not), with the semantics of
its ``generate``:

- prompt: ``<im_start>user\\n [audio] [image] [video] text <im_end>\\n<im_start>assistant\\n`` (the media blocks of
  :func:`~omni_fast.pipeline.multimodal.media_ids`, shared with Qwen3-Omni; images and videos patchified by
  :func:`~omni_fast.pipeline.multimodal.patchify_visual`; with ``audio_in_video`` the video and its sound track share
  one block in Qwen2.5-Omni's processor order, chunks of ``seconds_per_chunk`` seconds:
  :func:`~omni_fast.pipeline.multimodal.chunked_audio_video_order`);
- thinker prefill: the thinker's own forward (audio and vision encoders, embeddings; M-RoPE positions from its
  ``get_rope_index`` with the grids, ``use_audio_in_video`` and seconds per grid that ``generate`` passes), keeping
  the two hidden states the talker reads (embeddings, final-norm output); decode steps on omni-fast's
  :class:`~omni_fast.models.text_decoder.MoeTextDecoder` (graph replay on CUDA) or transformers' text model; every
  step's final-norm hidden state + input embedding is kept (transformers' ``thinker_reply_part``);
- talker: its prompt as ``generate`` builds it (prompt hidden + embeddings with the multimodal rows zeroed, the
  speaker's text BOS, the first reply row; when generate passes the talker a mask
  (``hf_compat.generate_passes_mask``) codec pad / BOS embeddings added to the last two rows and positions from
  the talker's ``get_rope_index`` minus the left padding, else positions 0, 1, ...), then one codec token per
  step: input ``thinker_to_talker_proj(codec embedding + reply row k + 1)`` (text EOS embedding, then pad, once a
  row's text has ended). The talker's text model decodes on omni-fast's decoder when the model is patched
  (:mod:`omni_fast.integrations.qwen25_talker`), else on transformers';
- codec: Token2Wav (DiT ODE solve + BigVGAN), per row on that row's codes, as ``generate`` runs it, once the
  speech has ended (the DiT attends to neighbouring blocks in both directions: no exact streaming).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..integrations.hf_compat import (generate_passes_mask, output_cache, thinker_multimodal, thinker_text_model,
                                      with_cache)
from .device import host_to_device, int_positions, lease_from, new_cache, now
from .multimodal import batch_audio_in_video, chunked_audio_video_order, media_ids, patchify_visual
from .requests import Event, check_request, check_stream_args, mel_features
from .scheduler import StageAdapter, TextDecode

REAL_CHAT_IDS = dict(im_start=151644, im_end=151645, user=872, assistant=77091, newline=198)


def chat_ids(vocab: int) -> dict:
    """Chat-template ids: Qwen's vocabulary, or the tiny random preset's (``TINY_IDS``) in a small one."""
    if vocab > REAL_CHAT_IDS["im_start"]:
        return dict(REAL_CHAT_IDS)
    from ..models.presets import TINY_IDS

    return dict(im_start=TINY_IDS["im_start_token_id"], im_end=TINY_IDS["im_end_token_id"],
                user=TINY_IDS["user_token_id"], assistant=TINY_IDS["assistant_token_id"], newline=10)


@dataclass
class Prompt25:
    """The batch's prompt: ids / mask ``[B, S]`` (left padded), positions ``[3, B, S]``, deltas ``[B, 1]``;
    ``media``: the thinker forward's encoder inputs on the device (``input_features`` / ``feature_attention_mask``,
    ``pixel_values`` / ``image_grid_thw``, ``pixel_values_videos`` / ``video_grid_thw``, those present); ``layout``:
    the arguments after ``attention_mask`` of ``get_rope_index`` on the host (image grids ``[n, 3]``, video grids,
    ``use_audio_in_video``, mel frames per audio ``[n_audio]``, seconds per video grid step ``[n_video]``; None
    where absent), which the talker's positions read again."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    deltas: torch.Tensor
    media: dict
    layout: tuple


class ReplyRecorder:
    """A thinker :class:`TextDecode` that keeps, per step, final-norm hidden + input embedding ``[B, 1, D]``."""

    def __init__(self, decode: TextDecode):
        self.decode, self.reply = decode, []

    def step(self, embeds: torch.Tensor):
        logits, hidden = self.decode.step(embeds)
        self.reply.append(hidden + embeds)
        return logits, hidden


class ProjectedDecode:
    """The talker's decode: its input (codec embedding + text row, thinker width) through
    ``thinker_to_talker_proj`` first, as transformers' talker forward does."""

    def __init__(self, decode: TextDecode, proj):
        self.decode, self.proj = decode, proj

    def step(self, embeds: torch.Tensor):
        return self.decode.step(self.proj(embeds))


# Per reply length, where the pipeline's BigVGAN runs when the model's Token2Wav is patched (fast path token2wav):
# a row of at most this many codes runs DiT solve + vocoder as ONE graph (dit_solve.synthesize: the vocoder on the
# padded bucket, no host step between them), a longer one the DiT's sample graph and then BigVGAN eagerly on the real
# mel (no padding computed, but ~261 launches from the host). PREDICTED by the cost model, calibrate on first light:
# `python -m omni_fast.bench.costmodel.token2wav_padding` (H100 constants, default CODE_BUCKETS; units
# bigvgan-padded-T500-S528 in the graph vs bigvgan-T500 eager) has the graph cheaper for 1-45 codes (45: 4.0 vs
# 4.6 ms; 25: 3.1 vs 4.6) and eager for every length from 46 to 1500 (46: 4.9 vs 4.6 ms); the eager side rests on
# the model's ~20 us of host per Triton launch, which no GPU has measured. docs/token2wav.md, "Where the vocoder runs".
GRAPHED_VOCODER_MAX_CODES = 45
ONE_GRAPH = "DiT solve + BigVGAN"  # the part name of rows run as one graph (the two parts cannot be split)


class Token2WavCodec:
    """Token2Wav on each row's own codes once the speech has ended (``takes_lengths``: the scheduler passes the
    rows' frame counts). Codes outside the DiT's codec vocabulary raise ValueError naming ``codes``.

    Each row runs transformers' ``Qwen2_5OmniToken2WavModel.forward`` as its two calls, the DiT's ``sample`` (the
    ODE solve; patched: one CUDA graph per length bucket) then the BigVGAN vocoder on the row's real mel (patched:
    its AMP blocks and anti-aliased activations on omni-fast ops), with the device clock read between them:
    ``parts`` holds the last step's seconds of each (``"DiT solve"``, ``"BigVGAN"``), the pipeline's latency
    rows. On a patched Token2Wav a row of at most :data:`GRAPHED_VOCODER_MAX_CODES` codes runs both in ONE graph
    instead (the patched forward's, on the device; part ``"DiT solve + BigVGAN"``): the same waveform, the vocoder
    on the padded bucket (docs/token2wav.md, "Where the vocoder runs"). ``parts`` holds the parts the step used."""

    takes_lengths = True

    def __init__(self, token2wav, speaker: dict, num_steps: int):
        self.token2wav, self.speaker, self.num_steps, self.done = token2wav, speaker, num_steps, 0
        self.vocab = token2wav.config.dit_config.num_embeds
        self.parts: dict[str, float] = {}

    def ready(self, n_frames: int, final: bool) -> bool:
        return final

    def step(self, codes: torch.Tensor, frames_per_row: list[int]) -> torch.Tensor:
        rows, dev = [], codes.device
        cond = self.speaker["cond"].float()[None].to(dev)
        ref = self.speaker["ref_mel"].float()[None].to(dev)
        self.parts = {}
        for i, n in enumerate(frames_per_row):
            row = codes[i, 0, :n][None]
            if n and int(row.max()) >= self.vocab:
                raise ValueError(f"codes: the talker produced code {int(row.max())}, outside Token2Wav's codec "
                                 f"vocabulary [0, {self.vocab}) (dit_config.num_embeds): mismatched checkpoint parts")
            rows.append(self._row(row, cond, ref) if n else codes.new_zeros(0, dtype=torch.float32))
        self.done = codes.shape[-1]
        out = torch.zeros(len(rows), max((r.numel() for r in rows), default=0), device=codes.device)
        for i, r in enumerate(rows):
            out[i, :r.numel()] = r
        return out

    def _row(self, row: torch.Tensor, cond: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """One row's waveform (flat, fp32) from its codes ``[1, n]``, its parts' seconds added to ``parts``."""
        from ..integrations import token2wav_synth

        dev, t2w = row.device, self.token2wav
        t0 = now(dev)
        if row.shape[1] <= GRAPHED_VOCODER_MAX_CODES and token2wav_synth.patched(t2w):
            wav = token2wav_synth.graphed_waveform(t2w, row, cond, ref, self.num_steps)
            if wav is not None:  # (None: the graph refuses this call, e.g. autograd on; the pieces below run it)
                self._add(ONE_GRAPH, now(dev) - t0)
                return wav.reshape(-1).float()
        mel = t2w.code2wav_dit_model.sample(cond, ref, row, num_steps=self.num_steps)  # forward's first call
        t1 = now(dev)
        wav = t2w.code2wav_bigvgan_model(mel)  # ... and its second (.squeeze().cpu() of the clamped waveform)
        t2 = now(dev)
        self._add("DiT solve", t1 - t0)
        self._add("BigVGAN", t2 - t1)
        return wav.reshape(-1).float()

    def _add(self, part: str, seconds: float) -> None:
        self.parts[part] = self.parts.get(part, 0.0) + seconds


class Qwen25Stages(StageAdapter):
    """The Qwen2.5-Omni adapter over the pipeline ``pipe`` (a :class:`omni_fast.models.Qwen25Omni`)."""

    family = "qwen2.5-omni"
    frame_stage = "codec embedding"  # one codebook: the frame step only embeds the talker's code (no MTP)
    codec_stage = "Token2Wav"  # timed as its parts, "DiT solve" and "BigVGAN" or both in one graph (.parts)
    text_ahead = 2  # talker step k reads the thinker's hidden state at text token k + 1
    last_code_is_frame = True  # one codebook: talker_max_new_tokens codes, as transformers' generate

    def __init__(self, pipe):
        self.pipe, self.model, self.config = pipe, pipe.model, pipe.config
        self.device, self.has_talker, self.tokenizer = pipe.device, pipe.has_talker, pipe.tokenizer
        self.thinker = self.model.thinker
        self.tcfg = self.config.thinker_config
        self.text_eos = pipe.text_eos
        self.ids = chat_ids(self.tcfg.text_config.vocab_size)
        if pipe.newline_id is not None:
            self.ids["newline"] = pipe.newline_id
        if self.has_talker:
            talker = self.model.talker
            self.codec_eos = talker.codec_eos_token
            self.codec_stop_ids = (talker.codec_eos_token, talker.codec_pad_token)  # generate's [8292, 8294]
        else:
            self.codec_eos = None
        self.embeds_layer = self.thinker.get_input_embeddings()

    # ------------------------------------------------------------------------------------------------ set-up
    def validate(self, reqs, opts) -> None:
        check_stream_args(max_new_tokens=opts.max_new_tokens, talker_max_new_tokens=opts.talker_max_new_tokens,
                          first_chunk=opts.first_chunk, chunk=opts.chunk, left_context=opts.left_context,
                          prefill_chunk=opts.prefill_chunk, talker_repetition_penalty=opts.talker_repetition_penalty)
        for i, r in enumerate(reqs):
            check_request(i, r, self.tcfg.text_config.vocab_size)
        batch_audio_in_video(reqs)
        if self.has_talker:
            dit = self.config.token2wav_config.dit_config
            most = dit.max_position_embeddings // dit.repeats  # mel frames = repeats x codes, plus the reference
            if opts.talker_max_new_tokens > most:
                raise ValueError(f"talker_max_new_tokens must be <= {most} (Token2Wav's DiT takes at most "
                                 f"{dit.max_position_embeddings} mel frames, {dit.repeats} per code), got "
                                 f"{opts.talker_max_new_tokens}")

    def speaker_id(self, speaker: str) -> str:
        """The speaker's name as the model knows it (case-insensitive)."""
        names = {name.lower(): name for name in self.pipe.speakers}
        name = names.get(speaker.lower())
        if name is None:
            raise ValueError(f"speaker: unknown speaker {speaker!r}; known: {sorted(self.pipe.speakers)}")
        return name

    def begin(self) -> None:
        pass

    def text_event(self, i: int, ids: list[int]) -> Event:
        tok = self.tokenizer
        return Event(i, "text", token_ids=list(ids), text=tok.decode(ids) if tok is not None else None)

    # ----------------------------------------------------------------------------------------------- thinker
    def _encode_text(self, text) -> list[int]:
        if isinstance(text, (list, tuple)):
            return list(text)
        if self.tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer: pass token ids, or tokenizer= to the pipeline")
        return list(self.tokenizer.encode(text))

    def build_prompt(self, req, audio_tokens_n: int, image_tokens_n: int = 0, video_tokens_n: int = 0, *,
                     video_grid: list[int] | None = None, seconds: float | None = None) -> list[int]:
        """The prompt's token ids (module docstring). With ``req.audio_in_video``, ``video_grid`` ``(t, h, w)`` and
        ``seconds`` per temporal step place the video's tokens among its sound track's."""
        c, t = self.ids, self.tcfg
        kinds = None
        if req.audio_in_video:
            kinds = chunked_audio_video_order(video_grid, seconds, audio_tokens_n, t.vision_config.spatial_merge_size,
                                              t.position_id_per_seconds, t.seconds_per_chunk)
        ids = [c["im_start"], c["user"], c["newline"]]
        ids += media_ids(t, audio_tokens_n, image_tokens_n, video_tokens_n, kinds)
        ids += self._encode_text(req.text) + [c["im_end"], c["newline"], c["im_start"], c["assistant"], c["newline"]]
        return ids

    def _audio(self, reqs):
        """Mel features of the requests with audio: (thinker keywords, mel frames per audio on the host or None,
        audio tokens per request)."""
        waves = [r.audio for r in reqs if r.audio is not None]
        if not waves:
            return {}, None, [0] * len(reqs)
        feats, fmask, lens = mel_features(waves, self.device, return_lengths=True)
        n_tok = iter(thinker_multimodal(self.thinker).audio_tower._get_feat_extract_output_lengths(lens)[1].tolist())
        counts = [next(n_tok) if r.audio is not None else 0 for r in reqs]
        return dict(input_features=feats.to(self.thinker.dtype), feature_attention_mask=fmask), lens, counts

    def prepare(self, reqs) -> Prompt25:
        """Mel features, patchified images / videos, the prompt ids (left padded) and the thinker's M-RoPE
        positions (``get_rope_index`` with what ``generate`` passes it)."""
        dev, thinker = self.device, self.thinker
        in_video = batch_audio_in_video(reqs)
        media, lens, counts = self._audio(reqs)
        vis = patchify_visual(self.tcfg.vision_config, dev, reqs)
        for kind, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            if vis[f"{kind}_pixels"] is not None:
                media.update({pixels: vis[f"{kind}_pixels"], f"{kind}_grid_thw": vis[f"{kind}_grid"]})
        videos = iter(range(len(reqs)))
        video_of = [next(videos) if r.video is not None else None for r in reqs]
        prompts = [self.build_prompt(r, counts[i], vis["image_tokens"][i], vis["video_tokens"][i],
                                     video_grid=None if j is None else vis["video_grid_host"][j].tolist(),
                                     seconds=None if j is None else float(vis["seconds"][j]))
                   for i, (r, j) in enumerate(zip(reqs, video_of))]
        B, S = len(reqs), max(map(len, prompts))
        ids_host = torch.zeros(B, S, dtype=torch.long)
        mask_host = torch.zeros(B, S, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids_host[i, S - len(p):] = torch.tensor(p)
            mask_host[i, S - len(p):] = 1
        layout = (vis["image_grid_host"], vis["video_grid_host"], in_video, lens, vis["seconds"])
        pos, deltas = thinker_multimodal(thinker).get_rope_index(ids_host, *layout[:2], mask_host, *layout[2:])
        return Prompt25(host_to_device(ids_host, dev), host_to_device(mask_host, dev), int_positions(pos.to(dev)),
                        deltas.to(dev), media, layout)

    def thinker_prefill(self, prompt: Prompt25, opts):
        cache = new_cache(self.tcfg.text_config, opts.static_cache, prompt.ids.shape[1] + opts.max_new_tokens)
        out = self.thinker(input_ids=prompt.ids, attention_mask=prompt.mask, position_ids=prompt.positions,
                           use_cache=True, output_hidden_states=True, **with_cache(cache, **prompt.media))
        hidden = out.hidden_states
        return out.logits[:, -1].float(), {"cache": output_cache(out), "embeds": hidden[0], "hidden": hidden[-1]}

    def thinker_decode(self, prompt: Prompt25, ctx: dict, opts, graph: bool, lease) -> ReplyRecorder:
        B = prompt.ids.shape[0]
        next_pos = int_positions(prompt.deltas.view(B) + prompt.mask.sum(-1))
        lm, head = thinker_text_model(self.thinker), self.thinker.lm_head
        if not graph:
            self.recorder = ReplyRecorder(TextDecode(lm, head, next_pos, cache=ctx["cache"], mask=prompt.mask))
        else:
            dec = self._decoder(lease)
            dec.load_prefill(ctx["cache"], prompt.mask, max_new_tokens=opts.max_new_tokens,
                             fractional_positions=next_pos.is_floating_point())
            ctx["cache"] = None
            self.recorder = ReplyRecorder(TextDecode(None, None, next_pos, decoder=dec))
        return self.recorder

    def embed(self, token: torch.Tensor) -> torch.Tensor:
        return self.embeds_layer(token[:, None])

    # ------------------------------------------------------------------------------------------------ talker
    def talker_prefill(self, prompt: Prompt25, ctx: dict, first_token, speaker: str, opts):
        """The talker prefill on the prompt ``generate`` builds (see the module docstring)."""
        talker, dev = self.model.talker, self.device
        rec = self.recorder
        if not rec.reply:  # every row ended at its first token: the reply row of that token is still needed
            rec.step(self.embed(first_token))
        B, S = prompt.ids.shape
        t = self.tcfg
        multimodal = ((prompt.ids == t.audio_token_index) | (prompt.ids == t.image_token_index)
                      | (prompt.ids == t.video_token_index))
        embeds = ctx["embeds"].masked_fill(multimodal[..., None], 0)
        bos = self.pipe.speakers[speaker]["bos_token"]
        bos_ids = torch.full((B, 1), int(bos), dtype=torch.long, device=dev)
        inputs = torch.cat([ctx["hidden"] + embeds, self.embed(bos_ids[:, 0]), rec.reply[0]], dim=1)
        ctx["embeds"] = ctx["hidden"] = None
        codec = talker.get_input_embeddings()
        special = torch.tensor([talker.codec_pad_token, talker.codec_bos_token], device=dev)
        passes_mask = generate_passes_mask(prompt.mask)
        if passes_mask:
            # transformers' talker forward adds the codec pad / BOS embeddings only when it gets an attention mask,
            # and generate drops an all-ones mask on some releases (hf_compat): then a batch without padding runs
            # without them
            inputs[:, -2:] += codec(special)[None]
        text_ids = torch.cat([prompt.ids, bos_ids, first_token[:, None]], dim=1)
        mask = torch.cat([prompt.mask, prompt.mask.new_ones(B, 2)], dim=1)
        pos, deltas = self._talker_positions(prompt, text_ids, mask, passes_mask)
        cache = new_cache(talker.config, opts.static_cache, S + 2 + opts.talker_max_new_tokens)
        out = talker.model(inputs_embeds=talker.thinker_to_talker_proj(inputs), attention_mask=mask,
                           position_ids=int_positions(pos.to(dev)), use_cache=True, **with_cache(cache))
        hidden = out.last_hidden_state[:, -1:]
        next_pos = int_positions(deltas.view(B) + S + 2)
        self.tts = [self.embed(torch.full((B,), i, dtype=torch.long, device=dev))
                    for i in (talker.text_eos_token, talker.text_pad_token)]
        return talker.codec_head(hidden[:, 0]).float(), hidden, (output_cache(out), mask, next_pos)

    def _talker_positions(self, prompt: Prompt25, text_ids, mask, passes_mask: bool):
        """The talker prefill's M-RoPE positions ``[3, B, S + 2]`` and deltas ``[B, 1]`` (the next position is
        ``delta + S + 2``): its ``get_rope_index`` on the text ids (the prompt's media layout: grids, audio in
        video, seconds per grid), the left padding discounted, as transformers' talker forward computes them. That
        forward computes them only when it gets an attention mask: when ``generate`` drops an all-ones one
        (hf_compat) its text model counts positions 0, 1, ... instead, in all three rows, also for images and
        videos."""
        B, S2 = text_ids.shape
        if not passes_mask:
            pos = torch.arange(S2, device=self.device).view(1, 1, S2).expand(3, B, S2)
            return pos, torch.zeros(B, 1, dtype=torch.long, device=self.device)
        layout = prompt.layout
        pos, deltas = self.model.talker.get_rope_index(text_ids.cpu(), *layout[:2], mask.cpu(), *layout[2:])
        return pos, deltas.to(self.device) - (1 - mask).sum(-1, keepdim=True)  # the left padding discounted

    def talker_decode(self, tctx, opts, graph: bool, lease) -> ProjectedDecode:
        """transformers' talker text model with its cache: on omni-fast's decoder (one graph replay per step on
        CUDA) when the model is patched (the prefill handed it the KV), else transformers' own decode."""
        cache, mask, next_pos = tctx
        talker = self.model.talker
        return ProjectedDecode(TextDecode(talker.model, talker.codec_head, next_pos, cache=cache, mask=mask),
                               talker.thinker_to_talker_proj)

    def frame(self, hidden, c0, sampler):
        """One codebook: the frame is ``c0``; the talker's codec input is its embedding ``[B, 1, D]``."""
        return c0[:, None], self.model.talker.get_input_embeddings()(c0[:, None])

    def talker_input(self, step: int, generated: list, text_done: list) -> torch.Tensor:
        """The text row of talker step ``step`` ``[B, 1, D]``: the reply row of text token ``step + 1``; once a
        row's text has ended (N tokens), the text EOS embedding at step ``N - 2`` and the pad embedding after."""
        eos, pad = self.tts
        rows = []
        for i, (g, done) in enumerate(zip(generated, text_done)):
            eos_step = max(len(g) - 2, 0)
            if not done or step < eos_step:
                rows.append(self.recorder.reply[step + 1][i])
            else:
                rows.append((eos if step == eos_step else pad)[i])
        return torch.stack(rows)

    def codec(self, batch: int, lease, opts):
        return Token2WavCodec(self.model.token2wav, self.pipe.speakers[self.speaker_id(opts.speaker)],
                              self.pipe.token2wav_steps)

    def codec_pick(self, logits, history, sampler, penalty):
        """The next codec id: codec BOS suppressed, the repetition penalty over each row's codes so far (and the
        prompt's mask / pad / BOS codes, which transformers' penalty also sees)."""
        talker = self.model.talker
        logits = logits.clone()
        logits[:, talker.codec_bos_token] = float("-inf")
        if penalty != 1.0:
            prompt = [talker.codec_mask_token, talker.codec_pad_token, talker.codec_bos_token]
            rows = [prompt + list(h) for h in history] if history else [prompt] * logits.shape[0]
            width = max(map(len, rows))
            idx = torch.tensor([h + h[:1] * (width - len(h)) for h in rows], device=logits.device)
            got = logits.gather(1, idx)
            logits = logits.scatter(1, idx, torch.where(got < 0, got * penalty, got / penalty))
        return sampler(logits)

    def _decoder(self, lease):
        """A thinker :class:`MoeTextDecoder` no live stream holds (rebuilt when the weights change or the
        ``fused_step`` fast path is switched; Qwen2.5-Omni's dense thinker keeps the ops path under it)."""
        from .. import fast_paths
        from ..models.cuda_graphs import weights_key
        from ..models.text_decoder import opt_in_decoder

        lm, head = thinker_text_model(self.thinker), self.thinker.lm_head
        key = (weights_key(lm, head), fast_paths.enabled("fused_step"),
               fast_paths.enabled("fused_pdl"))  # the PDL setting is captured in the decoder's graph
        got = self.pipe._decoders.get("thinker")
        if got is None or got[0] != key:
            self.pipe._decoders.pop("thinker", None)
            got = self.pipe._decoders["thinker"] = (key, [])
        return lease_from(got[1], lease, lambda: opt_in_decoder(lm, head, backend=self.pipe.backend))
