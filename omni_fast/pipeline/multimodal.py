"""Multimodal front ends of the Qwen-Omni pipelines: audio (mel + encoder), images and videos (patchify + vision
encoder), their embeddings scattered into the prompt, and the order of an audio-in-video block's tokens."""

from __future__ import annotations

import torch

from ..models.positions import PositionSpec, audio_tokens
from .requests import mel_features


def rows_of(features) -> torch.Tensor:
    """Per-item feature rows as one tensor: transformers returns a tuple/list split per image/video in some
    versions and one tensor in others."""
    return features if isinstance(features, torch.Tensor) else torch.cat(tuple(features), dim=0)


def audio_video_order(grid, seconds: float, n_audio: int, spec: PositionSpec) -> list[bool]:
    """Token kinds (True = audio) of an audio-in-video block, in the order of their temporal positions: video tokens
    at ``i * seconds * position_id_per_seconds`` (``h * w / merge**2`` per temporal step), audio tokens at 0, 1, ...;
    video first on ties (the order ``get_rope_index``'s merge assigns positions in)."""
    gt, gh, gw = grid
    per_step = gh * gw // spec.spatial_merge_size ** 2
    video_t = (torch.arange(gt) * torch.tensor(seconds, dtype=torch.float32) * spec.position_id_per_seconds).float()
    keys = torch.cat([video_t.repeat_interleave(per_step), torch.arange(n_audio, dtype=torch.float32)])
    order = torch.sort(keys, stable=True).indices
    return (order >= gt * per_step).tolist()


def chunk_sizes(values: list[int], per_chunk: int) -> list[int]:
    """Lengths of the runs ``get_chunked_index`` (Qwen2.5-Omni's processor and ``get_rope_index``) cuts the
    non-decreasing temporal positions ``values`` into: a new run starts at the first value >= ``k * per_chunk``,
    ``k`` counting up by one per cut (a jump over several chunk widths still cuts once at that value)."""
    sizes, start, k = [], 0, 1
    for i, v in enumerate(values):
        if v >= k * per_chunk:
            sizes.append(i - start)
            start, k = i, k + 1
    sizes.append(len(values) - start)
    return sizes


def chunked_audio_video_order(grid, seconds: float, n_audio: int, merge: int, position_id_per_seconds: float,
                              seconds_per_chunk: float) -> list[bool]:
    """Token kinds (True = audio) of a Qwen2.5-Omni audio-in-video block, as its processor lays them out and its
    ``get_rope_index`` reads them: chunks of ``seconds_per_chunk`` seconds, each the chunk's video tokens (at
    temporal position ``int(i * seconds * position_id_per_seconds)``, ``h * w / merge**2`` per step) then its audio
    tokens (at 0, 1, ...). (Qwen3-Omni interleaves token by token instead: :func:`audio_video_order`.)"""
    gt, gh, gw = grid
    per_step = gh * gw // merge ** 2
    steps = (torch.arange(gt) * torch.tensor(seconds, dtype=torch.float32) * position_id_per_seconds).long()
    per_chunk = int(position_id_per_seconds * seconds_per_chunk)
    video = chunk_sizes(steps.repeat_interleave(per_step).tolist(), per_chunk)
    audio = chunk_sizes(list(range(n_audio)), per_chunk)
    kinds: list[bool] = []
    for j in range(max(len(video), len(audio))):
        kinds += [False] * (video[j] if j < len(video) else 0) + [True] * (audio[j] if j < len(audio) else 0)
    return kinds


def media_ids(t, n_audio: int, n_image: int, n_video: int, av_kinds: list[bool] | None = None) -> list[int]:
    """The user turn's media blocks in token ids (both families; ``t``: the thinker config, its ``*_token_id``
    names): ``[<audio_start><audio>*n<audio_end>] [<vision_start><image>*n<vision_end>]
    [<vision_start><video>*n<vision_end>]`` (end markers are start + 1). ``av_kinds`` (audio-in-video: the block's
    token kinds in order, True = audio) replaces the audio and video blocks by one
    ``<vision_start><audio_start> ... <audio_end><vision_end>`` block."""
    vs, as_ = t.vision_start_token_id, t.audio_start_token_id
    ids: list[int] = []
    if av_kinds is not None:
        ids += [vs, as_] + [t.audio_token_id if k else t.video_token_id for k in av_kinds] + [as_ + 1, vs + 1]
        n_audio = n_video = 0
    if n_audio:
        ids += [as_] + [t.audio_token_id] * n_audio + [as_ + 1]
    if n_image:
        ids += [vs] + [t.image_token_id] * n_image + [vs + 1]
    if n_video:
        ids += [vs] + [t.video_token_id] * n_video + [vs + 1]
    return ids


def batch_audio_in_video(reqs) -> bool:
    """The batch's ``use_audio_in_video`` (one flag for the whole batch, as transformers' ``generate`` takes it):
    ValueError naming ``requests[i].audio_in_video`` when a request with audio or video disagrees with the others
    or sets it without both an audio track and a video."""
    in_video = any(r.audio_in_video for r in reqs)
    for i, r in enumerate(reqs):
        if r.audio_in_video and (r.audio is None or r.video is None):
            raise ValueError(f"requests[{i}].audio_in_video: audio_in_video needs both audio and video in the "
                             "request")
        if in_video and not r.audio_in_video and (r.video is not None or r.audio is not None):
            raise ValueError(f"requests[{i}].audio_in_video: audio_in_video applies to the whole batch (as "
                             "transformers' use_audio_in_video): every request with audio or video must set it, "
                             "or none")
    return in_video


def patchify(frames: torch.Tensor, patch: int, temporal: int, merge: int):
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


def encode_audio(model, spec: PositionSpec, device: torch.device, reqs):
    """Mel features and the audio encoder for the requests that carry audio (in request order)."""
    waves = [r.audio for r in reqs if r.audio is not None]
    counts = [0] * len(reqs)
    if not waves:
        return None, None, counts
    feats, fmask, lens = mel_features(waves, device, return_lengths=True)
    thinker = model.thinker
    feats = feats.to(thinker.dtype)
    emb = thinker.get_audio_features(feats, feature_attention_mask=fmask, return_dict=True)
    emb = emb.last_hidden_state
    j = 0
    for i, r in enumerate(reqs):
        if r.audio is not None:
            counts[i] = audio_tokens(int(lens[j]), spec.n_window)
            j += 1
    return emb, lens, counts

def patchify_visual(vcfg, device: torch.device, reqs) -> dict:
    """The requests' images (``[3, H, W]``) and videos (``[F, 3, H, W]``) as the vision encoders take them (both
    families' thinkers, Qwen2-VL patch layout; ``vcfg``: the thinker's ``vision_config``). Per kind: ``{kind}_pixels``
    (all items' patches ``[N, 3 * temporal * patch**2]`` float32 on ``device``, None without that kind),
    ``{kind}_grid`` ``[n_items, 3]`` int64 on ``device`` and ``{kind}_grid_host`` (the same on the host: what the
    positions read without a device sync), ``{kind}_tokens`` (LLM tokens per request, 0 without one); ``seconds``:
    seconds per temporal grid step of each video ``[n_videos]`` float32 (``temporal_patch_size / video_fps``, the
    processors' ``video_second_per_grid``)."""
    merge = vcfg.spatial_merge_size
    out = {"seconds": None}
    for kind in ("image", "video"):
        out.update({f"{kind}_tokens": [0] * len(reqs), f"{kind}_pixels": None, f"{kind}_grid": None,
                    f"{kind}_grid_host": None})
        items = [(i, getattr(r, kind)) for i, r in enumerate(reqs) if getattr(r, kind) is not None]
        if not items:
            continue
        patches, grids = [], []
        for i, x in items:
            frames = x[None] if kind == "image" else x
            pv, grid = patchify(frames.to(device), vcfg.patch_size, vcfg.temporal_patch_size, merge)
            patches.append(pv)
            grids.append(grid)
            out[f"{kind}_tokens"][i] = grid[0] * grid[1] * grid[2] // merge ** 2
        out[f"{kind}_pixels"] = torch.cat(patches)
        out[f"{kind}_grid"] = torch.tensor(grids, device=device)
        out[f"{kind}_grid_host"] = torch.tensor(grids)
        if kind == "video":
            out["seconds"] = torch.tensor([vcfg.temporal_patch_size / reqs[i].video_fps for i, _ in items])
    return out


def encode_visual(model, device: torch.device, reqs):
    """:func:`patchify_visual`, then the vision encoder once per kind (``out[kind]``: its output, with
    ``pooler_output`` and the DeepStack features; None without that kind)."""
    out = patchify_visual(model.config.thinker_config.vision_config, device, reqs)
    thinker = model.thinker
    for kind in ("image", "video"):
        out[kind] = None
        if out[f"{kind}_pixels"] is not None:
            get = thinker.get_image_features if kind == "image" else thinker.get_video_features
            out[kind] = get(out[f"{kind}_pixels"].to(thinker.dtype), out[f"{kind}_grid"], return_dict=True)
    return out


def merge_visual(spec: PositionSpec, ids, inputs_embeds, vis):
    """Image/video embeddings into their placeholder tokens; the DeepStack features of all visual tokens in
    prompt order (what transformers' thinker builds) and their mask."""
    masks, feats = [], []
    for kind, token in (("image", spec.image_token_id), ("video", spec.video_token_id)):
        if vis[kind] is None:
            continue
        m = ids == token
        emb = rows_of(vis[kind].pooler_output).to(inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(m.unsqueeze(-1).expand_as(inputs_embeds), emb)
        masks.append(m)
        feats.append([rows_of(f) for f in vis[kind].deepstack_features])
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
