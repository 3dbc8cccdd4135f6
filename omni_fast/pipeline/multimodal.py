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

def encode_visual(model, device: torch.device, reqs):
    """Patchify images (``[3, H, W]``) and videos (``[F, 3, H, W]``), run the vision encoder once per kind."""
    vcfg = model.config.thinker_config.vision_config
    merge, dtype = vcfg.spatial_merge_size, model.thinker.dtype
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
            pv, grid = patchify(frames.to(device), vcfg.patch_size, vcfg.temporal_patch_size, merge)
            patches.append(pv)
            grids.append(grid)
            out[f"{kind}_tokens"][i] = grid[0] * grid[1] * grid[2] // merge ** 2
        grid_thw = torch.tensor(grids, device=device)
        pixels = torch.cat(patches).to(dtype)
        thinker = model.thinker
        get = thinker.get_image_features if kind == "image" else thinker.get_video_features
        out[kind] = get(pixels, grid_thw, return_dict=True)
        out[f"{kind}_grid"] = grid_thw
        out[f"{kind}_grid_host"] = torch.tensor(grids)
        if kind == "video":  # seconds per temporal grid step: temporal_patch_size frames at video_fps
            out["seconds"] = torch.tensor([vcfg.temporal_patch_size / reqs[i].video_fps for i, _ in items])
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
