"""The Qwen3-Omni stage adapter of the streaming scheduler (:mod:`omni_fast.pipeline.scheduler`).

Stages on transformers' ``Qwen3OmniMoeForConditionalGeneration`` modules (patched or not): the multimodal prompt
(left padded, TM-RoPE positions), the thinker prefill (optionally chunked, DeepStack rows per chunk), the talker's
prompt as transformers' ``generate`` builds it, the MTP code predictor's frame step, the streaming Code2Wav; decode
steps on omni-fast's :class:`~omni_fast.models.text_decoder.MoeTextDecoder` (graph replay on CUDA) or on
transformers' text models. The pipeline object (:class:`omni_fast.models.Qwen3Omni`) owns the model, the chosen
stage implementations and the leased decoders; this adapter reads them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ..models.components import ExactStreamingCodec, StreamingCodec
from ..models.positions import PositionSpec, rope_positions
from ..integrations.decode_takeover import prefill_forward
from ..integrations.hf_compat import output_cache, thinker_text_model, with_cache
from .device import entries_for, host_to_device, int_positions, lease_from, new_cache, to_device
from .multimodal import (audio_video_order, batch_audio_in_video, encode_audio, encode_visual, media_ids,
                         merge_visual)
from .requests import Event, check_request, check_stream_args
from .scheduler import StageAdapter, TextDecode


# Batch sizes whose Code2Wav streams the pipeline keeps for later requests (each: up to the most streams of that size
# that ran at once, with their states and, on CUDA, their graphs and memory pool): least recently used dropped first
MAX_CODEC_BATCH_SIZES = 8


def talker_ids(tcfg) -> dict:
    """The talker config's special token ids and ``position_id_per_seconds``, as :class:`PositionSpec` fields
    (they override the thinker's when the talker's TM-RoPE positions are computed)."""
    return dict(image_token_id=tcfg.image_token_id, video_token_id=tcfg.video_token_id,
                audio_token_id=tcfg.audio_token_id, vision_start_token_id=tcfg.vision_start_token_id,
                audio_start_token_id=tcfg.audio_start_token_id,
                position_id_per_seconds=tcfg.position_id_per_seconds)


def suppress_mask(tcfg, device) -> torch.Tensor:
    """The top 1024 codec ids but codec EOS are never sampled (transformers' ``suppress_tokens``)."""
    vocab = tcfg.text_config.vocab_size
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    mask[max(vocab - 1024, 0):] = True
    mask[tcfg.codec_eos_token_id] = False
    return mask

@dataclass
class Prompt:
    """The batch's prompt after preprocessing: ids / mask ``[B, S]`` (left padded) on the device and the host,
    the thinker's input embeddings and TM-RoPE positions ``[3, B, S]``, the visual rows, and the layout the
    talker's positions read again."""

    ids: torch.Tensor
    mask: torch.Tensor
    embeds: torch.Tensor
    positions: torch.Tensor
    deltas: torch.Tensor
    visual_mask: torch.Tensor | None
    deepstack: list | None
    layout: dict  # image_grid_thw, video_grid_thw, second_per_grids, audio_feature_lengths, use_audio_in_video


@dataclass
class ThinkerContext:
    """What the thinker prefill leaves: its transformers cache and last output (dropped once an omni-fast decoder
    holds the KV) and the two hidden states the talker reads (``{0: embeddings, accept_layer: hidden}``)."""

    cache: object
    out: object
    hidden_states: dict


class Qwen3Stages(StageAdapter):
    """The Qwen3-Omni adapter over the pipeline ``pipe`` (a :class:`omni_fast.models.Qwen3Omni`)."""

    family = "qwen3-omni"

    def __init__(self, pipe):
        self.pipe, self.model, self.config = pipe, pipe.model, pipe.config
        self.device, self.spec, self.has_talker = pipe.device, pipe.spec, pipe.has_talker
        self.text_eos = self.config.im_end_token_id
        self.codec_eos = self.config.talker_config.codec_eos_token_id if self.has_talker else None
        self.embeds_layer = self.model.thinker.get_input_embeddings()
        self.tokenizer, self.newline_id = pipe.tokenizer, pipe.newline_id

    # ------------------------------------------------------------------------------------------------ set-up
    def validate(self, reqs, opts) -> None:
        check_stream_args(max_new_tokens=opts.max_new_tokens, talker_max_new_tokens=opts.talker_max_new_tokens,
                          first_chunk=opts.first_chunk, chunk=opts.chunk, left_context=opts.left_context,
                          prefill_chunk=opts.prefill_chunk, talker_repetition_penalty=opts.talker_repetition_penalty)
        vocab = self.config.thinker_config.text_config.vocab_size
        for i, r in enumerate(reqs):
            check_request(i, r, vocab)

    def speaker_id(self, speaker: str) -> int:
        speakers = self.config.talker_config.speaker_id or {}
        sid = speakers.get(speaker.lower())
        if sid is None:
            raise ValueError(f"unknown speaker {speaker!r}; known: {sorted(speakers)}")
        return sid

    def begin(self) -> None:
        if self.pipe.fast_code2wav is not None:
            self.pipe._refresh_fast_stages()

    def text_event(self, i: int, ids: list[int]) -> Event:
        tok = self.tokenizer
        return Event(i, "text", token_ids=list(ids), text=tok.decode(ids) if tok is not None else None)

    # ------------------------------------------------------------------------------------------------ prompts
    def _encode_text(self, text) -> list[int]:
        if isinstance(text, (list, tuple)):
            return list(text)
        if self.tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer: pass token ids, or tokenizer= to the pipeline")
        return list(self.tokenizer.encode(text))

    def build_prompt(self, req, audio_tokens_n: int, image_tokens_n: int, video_tokens_n: int = 0, *,
                     video_grid: list[int] | None = None, seconds: float | None = None) -> list[int]:
        """``<im_start>user\\n [<audio_start><audio>*n<audio_end>] [<vision_start><image>*n<vision_end>]
        [<vision_start><video>*n<vision_end>] text <im_end>\\n<im_start>assistant\\n`` in token ids (``\\n`` is one
        text token). With ``req.audio_in_video`` the audio and video tokens share one block, interleaved by time
        (``video_grid`` ``(t, h, w)`` and ``seconds`` per temporal step then say where each video token sits)."""
        c, nl = self.config, [self.newline_id]
        kinds = audio_video_order(video_grid, seconds, audio_tokens_n, self.spec) if req.audio_in_video else None
        ids = [c.im_start_token_id, c.user_token_id] + nl
        ids += media_ids(c.thinker_config, audio_tokens_n, image_tokens_n, video_tokens_n, kinds)
        ids += self._encode_text(req.text) + [c.im_end_token_id] + nl
        ids += [c.im_start_token_id, c.assistant_token_id] + nl
        return ids


    # ----------------------------------------------------------------------------------------------- thinker
    def prepare(self, reqs) -> Prompt:
        """Mel + audio encoder, vision encoder, the prompt's embeddings and TM-RoPE positions."""
        dev = self.device
        in_video = batch_audio_in_video(reqs)  # (checks the batch before any work)
        audio_embeds, audio_lens, n_audio_tok = encode_audio(self.model, self.spec, dev, reqs)
        vis = encode_visual(self.model, dev, reqs)
        # grids on the host (the layout the positions read) and on the device (the vision encoders)
        image_grids, video_grids, seconds = vis["image_grid_host"], vis["video_grid_host"], vis["seconds"]
        vid_of = {i: j for j, i in enumerate(i for i, r in enumerate(reqs) if r.video is not None)}
        prompts = [self.build_prompt(r, n_audio_tok[i], vis["image_tokens"][i], vis["video_tokens"][i],
                                     video_grid=None if i not in vid_of else video_grids[vid_of[i]].tolist(),
                                     seconds=None if i not in vid_of else float(seconds[vid_of[i]]))
                   for i, r in enumerate(reqs)]
        B, S = len(reqs), max(map(len, prompts))
        ids_host = torch.zeros(B, S, dtype=torch.long)
        mask_host = torch.zeros(B, S, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding, as the Qwen3-Omni processor does
            ids_host[i, S - len(p):] = torch.tensor(p)
            mask_host[i, S - len(p):] = 1
        ids, mask = host_to_device(ids_host, dev), host_to_device(mask_host, dev)
        embeds = self.embeds_layer(ids)
        if audio_embeds is not None:
            amask = (ids == self.spec.audio_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(amask, audio_embeds.to(embeds.dtype))
        embeds, visual_mask, deepstack = merge_visual(self.spec, ids, embeds, vis)
        layout = dict(image_grid_thw=image_grids, video_grid_thw=video_grids, second_per_grids=seconds,
                      audio_feature_lengths=audio_lens, use_audio_in_video=in_video)
        # the layout from the host copies (no host sync); int64 positions unless a video's are fractional
        pos, deltas = rope_positions(ids_host, self.spec, attention_mask=mask_host, device=dev, integer=True,
                                     **layout)
        return Prompt(ids, mask, embeds, pos, deltas, visual_mask, deepstack, layout)

    def thinker_prefill(self, prompt: Prompt, opts):
        """The thinker prefill (in chunks of ``opts.prefill_chunk`` tokens when given) -> last logits ``[B, V]``."""
        thinker = self.model.thinker
        cache = new_cache(thinker.config.text_config, opts.static_cache,
                          prompt.ids.shape[1] + opts.max_new_tokens)
        accept = self.config.talker_config.accept_hidden_layer if self.has_talker \
            else len(thinker_text_model(thinker).layers)
        out, hidden_states = prefill_text_model(thinker_text_model(thinker), prompt.embeds, prompt.mask,
                                                prompt.positions, cache, prompt.visual_mask, prompt.deepstack,
                                                opts.prefill_chunk, accept)
        logits = thinker.lm_head(out.last_hidden_state[:, -1]).float()
        return logits, ThinkerContext(cache, out, hidden_states)

    def thinker_decode(self, prompt: Prompt, ctx: ThinkerContext, opts, graph: bool, lease) -> TextDecode:
        """The thinker's decode steps: with ``graph`` the prefill KV moves into a leased omni-fast decoder and
        transformers' cache is dropped."""
        B = prompt.ids.shape[0]
        next_pos = int_positions(prompt.deltas.view(B) + prompt.mask.sum(-1))  # the next TM-RoPE position
        thinker = self.model.thinker
        if not graph:
            return TextDecode(thinker_text_model(thinker), thinker.lm_head, next_pos, cache=ctx.cache,
                              mask=prompt.mask)
        dec = self._decoder("thinker", lease)
        dec.load_prefill(ctx.cache, prompt.mask, max_new_tokens=opts.max_new_tokens,
                         fractional_positions=next_pos.is_floating_point())
        ctx.cache = ctx.out = None  # (the prefill output references the cache too)
        return TextDecode(None, None, next_pos, decoder=dec)

    def embed(self, token: torch.Tensor) -> torch.Tensor:
        return self.embeds_layer(token[:, None])



    # ------------------------------------------------------------------------------------------------ talker
    def talker_prefill(self, prompt: Prompt, ctx: ThinkerContext, first_token, speaker_id: int, opts):
        """The talker prefill on its prompt (needs the prompt's hidden states and the first text token only)."""
        cfg, tcfg, talker, dev = self.config, self.config.talker_config, self.model.talker, self.device
        proj = talker.text_projection(self.embeds_layer(torch.tensor(
            [[cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id]], device=dev)))
        self.tts = proj.chunk(3, dim=1)  # tts_bos, tts_eos, tts_pad: [1, 1, D] each
        t_embeds, t_mask, t_ids = self.talker_prompt(prompt.ids, prompt.mask, ctx.hidden_states, speaker_id,
                                                     self.tts[0], self.tts[2], self.embed(first_token))
        t_pos, t_deltas = rope_positions(t_ids, PositionSpec(**{**self.spec.__dict__, **talker_ids(tcfg)}),
                                         attention_mask=t_mask, integer=True, **prompt.layout)
        t_cache = new_cache(talker.config.text_config, opts.static_cache,
                            t_embeds.shape[1] + opts.talker_max_new_tokens)
        # (transformers hands the MTP `hidden_states[-1]`, which is the final-norm output, i.e. last_hidden_state)
        # transformers' own forward: the pipeline's decoder takes the KV (patch's decode takeover would take it first)
        tout = prefill_forward(talker.model)(inputs_embeds=t_embeds, attention_mask=t_mask,
                                             position_ids=int_positions(t_pos), **with_cache(t_cache), use_cache=True)
        self.suppress = suppress_mask(tcfg, dev)
        logits = talker.codec_head(tout.last_hidden_state[:, -1])
        next_pos = int_positions(t_deltas.view(-1) + t_mask.sum(-1))
        return logits, tout.last_hidden_state[:, -1:], (output_cache(tout), t_mask, next_pos)

    def talker_decode(self, tctx, opts, graph: bool, lease) -> TextDecode:
        cache, mask, next_pos = tctx
        talker = self.model.talker
        if not graph:
            return TextDecode(talker.model, talker.codec_head, next_pos, cache=cache, mask=mask)
        dec = self._decoder("talker", lease)
        dec.load_prefill(cache, mask, max_new_tokens=opts.talker_max_new_tokens,
                         fractional_positions=next_pos.is_floating_point())
        return TextDecode(None, None, next_pos, decoder=dec)

    def frame(self, hidden, c0, sampler):
        """The MTP frame step: codebooks ``[B, Q]`` (c0 first) and the summed codec embedding ``[B, 1, H]``."""
        residual, summed = self.pipe.code_predictor.frame(hidden, c0, sampler)
        return torch.cat([c0[:, None], residual], dim=1), summed

    def codec(self, batch: int, lease, opts):
        pipe = self.pipe
        if pipe.fast_code2wav is not None:  # patched: exact stateful streaming, no re-decoded left context
            return ExactStreamingCodec(pipe.fast_code2wav, batch, first_chunk=opts.first_chunk, chunk=opts.chunk,
                                       stream=self._codec_stream(batch, lease))
        return StreamingCodec(pipe.code2wav, first_chunk=opts.first_chunk, chunk=opts.chunk,
                              left_context=opts.left_context)

    def talker_prompt(self, ids, mask, hidden_states, speaker_id, tts_bos, tts_pad, first_token_embed):
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

    def talker_input(self, step: int, generated: list, text_done: list) -> torch.Tensor:
        """The text input ``[B, 1, D]`` of talker step ``step`` (transformers' ``trailing_text_hidden``): per request
        the projected embedding of its text token ``step + 1``; once its text has ended (N tokens), tts_eos at step
        ``N - 2`` and tts_pad after. As in transformers' batch-1 generate, the final token (EOS, or the last one at
        ``max_new_tokens``) is never fed to the talker: its thinker embedding is never computed there."""
        embeds_layer, talker, (_, tts_eos, tts_pad) = self.embeds_layer, self.model.talker, self.tts
        ids, kind = [], []  # kind: 0 text token, 1 tts_eos, 2 tts_pad
        for g, done in zip(generated, text_done):
            eos_step = max(len(g) - 2, 0)
            k = 0 if not done or step < eos_step else (1 if step == eos_step else 2)
            kind.append(k)
            ids.append(g[step + 1] if k == 0 else 0)
        if all(k == 2 for k in kind):
            return tts_pad.expand(len(ids), -1, -1)
        dev = self.device
        text = talker.text_projection(embeds_layer(to_device(ids, dev)[:, None]))
        kind_t = to_device(kind, dev).view(-1, 1, 1)
        return torch.where(kind_t == 0, text, torch.where(kind_t == 1, tts_eos, tts_pad))

    def codec_pick(self, logits, history, sampler, penalty):
        """Codebook 0 of the next frame: suppressed ids masked, the repetition penalty over each row's history."""
        logits = logits.masked_fill(self.suppress, float("-inf"))
        if penalty != 1.0 and history and history[0]:
            width = max(map(len, history))  # rows that stopped are shorter: pad with a code they already have
            idx = torch.tensor([h + h[:1] * (width - len(h)) for h in history], device=logits.device)
            got = logits.gather(1, idx)
            logits = logits.scatter(1, idx, torch.where(got < 0, got * penalty, got / penalty))
        return sampler(logits)


    # -------------------------------------------------------------------------------------------------- leases
    def _decoder(self, part: str, lease):
        """A :class:`MoeTextDecoder` of the thinker or the talker that no live stream holds, leased to ``lease``.
        Decoders share the model's weight tensors and keep their caches and captured graphs between streams; they
        are rebuilt when the weights change, or when the ``fused_step`` fast path is switched (the phase-fused step
        where the decoder supports it: :func:`~omni_fast.models.text_decoder.opt_in_decoder`). Interleaved streams
        get one decoder each."""
        from .. import fast_paths
        from ..models.talker_step import weights_key
        from ..models.text_decoder import opt_in_decoder

        if part == "thinker":
            text_model, head = thinker_text_model(self.model.thinker), self.model.thinker.lm_head
        else:
            text_model, head = self.model.talker.model, self.model.talker.codec_head
        key = (weights_key(text_model, head), fast_paths.enabled("fused_step"),
               fast_paths.enabled("fused_pdl"))  # the PDL setting is captured in the decoder's graph
        decoders = self.pipe._decoders  # part -> (weights key, [[decoder, weakref to its lease], ...])
        got = decoders.get(part)
        if got is None or got[0] != key:
            decoders.pop(part, None)  # free the old decoders' caches before building a new one
            got = decoders[part] = (key, [])
        return lease_from(got[1], lease, lambda: opt_in_decoder(text_model, head, backend=self.pipe.backend))

    def _codec_stream(self, batch_size: int, lease):
        """A Code2Wav stream of ``batch_size`` rows that no live stream holds, leased to ``lease``: streams (their
        states and CUDA graphs) outlive requests, so new requests capture no graph after a stream's first reuse;
        dropped when the fast Code2Wav is rebuilt (new weights), and those of the least recently used batch sizes
        beyond :data:`MAX_CODEC_BATCH_SIZES` (when no live stream holds them)."""
        pipe = self.pipe
        code2wav = pipe.fast_code2wav
        if pipe._codec_streams is None or pipe._codec_streams[0] is not code2wav:
            pipe._codec_streams = (code2wav, {})
        entries = entries_for(pipe._codec_streams[1], batch_size, MAX_CODEC_BATCH_SIZES, pipe.device)
        return lease_from(entries, lease, lambda: ExactStreamingCodec.new_stream(code2wav, batch_size), code2wav.device)


def prefill_text_model(lm, inputs_embeds, mask, positions, cache, visual_mask, deepstack, chunk, accept_layer):
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
        owner = threading.get_ident()

        def keep(_module, _args, output):
            # the layer is shared: another thread's request running it meanwhile is not this prefill's
            if threading.get_ident() == owner:
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
            out = prefill_forward(lm)(inputs_embeds=inputs_embeds[:, s:e], attention_mask=mask[:, :e],
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
