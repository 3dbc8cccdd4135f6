"""TM-RoPE position ids of a Qwen3-Omni prompt, built on the prompt's device.

:func:`rope_positions` returns what transformers' ``Qwen3OmniMoe...get_rope_index`` returns (``[3, B, S]`` float32
positions, ``[B, 1]`` deltas), for text, audio, image, video and audio-in-video prompts, with the same quirks:

- without image/video grids every token (audio included) takes the text position ``cumsum(mask) - 1`` on all three
  rows, padding takes 1 (audio positions are sequential, so an audio-only prompt is laid out like text);
- with grids, segments are ``text | <start> modality <end>``: audio ``st + arange(n)`` on the three rows; an image
  ``t = st + i * position_id_per_seconds``, ``h = st + row // merge``, ``w = st + col // merge``; a video the same
  with ``t = st + i * second_per_grid * position_id_per_seconds``; audio-in-video (``<vision_start><audio_start>``,
  two-token bos/eos) the video and audio positions merged by temporal position, video first on ties; the next
  segment starts at ``1 +`` the largest position of the *last piece* transformers appended (for audio-in-video that
  is the run of one modality that closes the merge, not always the overall maximum), padding takes 0.

How it is computed: the layout (where the ``<vision_start>``/``<audio_start>`` markers sit, the token after each
``<vision_start>``, grid sizes, audio lengths) is read on the host, since segment *lengths* decide tensor shapes:
from host copies of ``input_ids`` / ``attention_mask`` / the grids / the audio lengths, made once per batch (one
device-to-host copy each; none when the caller passes them on the CPU and the positions' ``device`` separately, as
the pipeline does for the thinker's prompt, which it builds on the host). The position *values* are built on
``device``: one vectorised ``arange``/broadcast per segment (no per-token Python loop; the audio-in-video merge is
a stable sort), the running start kept as a device scalar, each row written to a contiguous slice (left/right
padding; an index tensor for a mask with holes), so nothing else syncs. ``integer=True`` returns int64 positions
when they are all whole numbers, decided on the host from the layout (only image/video temporal steps can be
fractional), so the caller needs no device-side check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PositionSpec:
    """The token ids and constants ``get_rope_index`` reads from a Qwen3-Omni thinker (or talker) config."""

    image_token_id: int
    video_token_id: int
    audio_token_id: int
    vision_start_token_id: int
    audio_start_token_id: int
    position_id_per_seconds: float
    spatial_merge_size: int = 2
    n_window: int = 50

    @classmethod
    def from_config(cls, config) -> "PositionSpec":
        """From a ``Qwen3OmniMoeThinkerConfig`` (or the full ``Qwen3OmniMoeConfig``)."""
        config = getattr(config, "thinker_config", config)
        return cls(
            image_token_id=config.image_token_id, video_token_id=config.video_token_id,
            audio_token_id=config.audio_token_id, vision_start_token_id=config.vision_start_token_id,
            audio_start_token_id=config.audio_start_token_id,
            position_id_per_seconds=config.position_id_per_seconds,
            spatial_merge_size=config.vision_config.spatial_merge_size, n_window=config.audio_config.n_window)


def audio_tokens(feature_lengths: int, n_window: int = 50) -> int:
    """Audio-encoder output tokens for ``feature_lengths`` mel frames (transformers' ``_get_feat_extract_output_
    lengths``): 13 tokens per full 100-frame chunk, plus the three stride-2 convolutions' output of the rest."""
    chunk = n_window * 2
    rest = feature_lengths % chunk
    feat = (rest - 1) // 2 + 1
    return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (feature_lengths // chunk) * 13


def _arange3(n: int, start: torch.Tensor) -> torch.Tensor:
    """``[3, n]`` float32: ``start + arange(n)`` on every row."""
    return (torch.arange(n, device=start.device, dtype=torch.float32) + start).expand(3, n)


def _vision(t_index: torch.Tensor, grid_h: int, grid_w: int, merge: int, start: torch.Tensor) -> torch.Tensor:
    """``[3, T*h*w]`` float32 positions of a merged image/video grid (row-major over t, h, w) from ``start``."""
    h, w = grid_h // merge, grid_w // merge
    n_t = t_index.numel()
    dev = start.device
    t = t_index.view(-1, 1).expand(n_t, h * w).reshape(-1)
    hh = torch.arange(h, device=dev, dtype=torch.float32).view(1, -1, 1).expand(n_t, h, w).reshape(-1)
    ww = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, -1).expand(n_t, h, w).reshape(-1)
    return torch.stack([t, hh, ww]) + start


def _merge_audio_video(video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``[3, Nv]`` video and ``[3, Na]`` audio positions by temporal position, video first on ties (what
    transformers' two-pointer loop does). Returns the merged ``[3, Nv+Na]`` and the last piece that loop appended
    (the closing run of one modality), whose maximum starts the next segment."""
    both = torch.cat([video, audio], dim=1)
    order = torch.sort(both[0], stable=True).indices  # stable: equal t keeps video (first in `both`) first
    merged = both[:, order]
    if merged.shape[1] == 0:
        return merged, merged
    is_audio = order >= video.shape[1]
    # the closing run: the longest suffix whose tokens come from the same modality as the last token; it is
    # returned masked (-inf before the run) rather than sliced, so its max needs no host sync
    differs = is_audio != is_audio[-1]
    idx = torch.arange(merged.shape[1], device=merged.device)
    run_start = torch.where(differs, idx + 1, torch.zeros_like(idx)).max()
    tail = merged.masked_fill((idx < run_start).expand(3, -1), float("-inf"))
    return merged, tail


def rope_positions(input_ids: torch.Tensor, spec: PositionSpec, *, attention_mask: torch.Tensor | None = None,
                   image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                   audio_feature_lengths: torch.Tensor | list[int] | None = None,
                   second_per_grids: torch.Tensor | list[float] | None = None,
                   use_audio_in_video: bool = False, device: torch.device | str | None = None,
                   integer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """TM-RoPE positions of a prompt batch, equal to transformers' ``get_rope_index`` of Qwen3-Omni.

    input_ids ``[B, S]`` int; attention_mask ``[B, S]`` (1 = token; None = all ones); grids ``[N, 3]`` int (t, h, w
    in patches); audio_feature_lengths: mel frames per audio (``feature_attention_mask.sum(-1)``);
    second_per_grids: seconds per temporal grid step per video. Returns positions ``[3, B, S]`` float32 and deltas
    ``[B, 1]`` (``max position + 1 - length``), on ``device`` (default ``input_ids.device``; layout inputs on the
    CPU with a GPU ``device``: no host sync at all). ``integer``: int64 positions and deltas when every position is
    a whole number (else float32 as above).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    dev = torch.device(device) if device is not None else input_ids.device
    if image_grid_thw is None and video_grid_thw is None:
        return _text_positions(input_ids, attention_mask, dev, integer)
    # the layout on the host: one copy per input for the whole batch (none for CPU inputs)
    ids_host = input_ids.cpu()
    mask_host = torch.ones_like(ids_host) if attention_mask is None else attention_mask.cpu()
    media = _Media(spec, image_grid_thw, video_grid_thw, audio_feature_lengths, second_per_grids, dev)
    positions = torch.zeros(3, *input_ids.shape, dtype=torch.float32, device=dev)
    deltas = []
    for row in range(input_ids.shape[0]):
        keep = mask_host[row] == 1
        ids = ids_host[row][keep]
        n = ids.numel()
        row_pos = _row_positions(ids, spec, media, use_audio_in_video, dev)
        at = torch.nonzero(keep).flatten()
        if n and at[-1] - at[0] + 1 == n:  # one contiguous block (left or right padding): a slice, no index
            positions[:, row, int(at[0]):int(at[0]) + n] = row_pos
        elif n:
            positions[:, row, at.to(dev, non_blocking=True)] = row_pos
        deltas.append(row_pos.max() + 1 - n if n else torch.zeros((), device=dev))
    deltas = torch.stack(deltas).view(-1, 1)
    if integer and media.whole:
        return positions.long(), deltas.long()
    return positions, deltas


def _text_positions(input_ids, attention_mask, dev, integer: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Without image/video grids: every kept token (audio included) at ``cumsum(mask) - 1`` on all three rows,
    padding at 1 (:func:`rope_positions`' result)."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    mask = mask.to(dev, non_blocking=True)
    pos = mask.float().cumsum(-1) - 1
    pos = pos.masked_fill(mask == 0, 1).unsqueeze(0).expand(3, -1, -1)
    deltas = pos.max(0)[0].max(-1, keepdim=True)[0] + 1 - mask.sum(-1, keepdim=True)
    return (pos.long(), deltas.long()) if integer else (pos, deltas)


class _Media:
    """The batch's images, videos and audios on the host, taken in prompt order (transformers' running indices),
    and whether every temporal position so far is a whole number (only temporal steps can be fractional)."""

    def __init__(self, spec: PositionSpec, image_grid_thw, video_grid_thw, audio_feature_lengths, second_per_grids,
                 dev: torch.device):
        self.images = [] if image_grid_thw is None else [tuple(int(v) for v in g) for g in image_grid_thw.tolist()]
        self.videos = [] if video_grid_thw is None else [tuple(int(v) for v in g) for g in video_grid_thw.tolist()]
        self.audios = ([] if audio_feature_lengths is None
                       else [int(a) for a in torch.as_tensor(audio_feature_lengths).tolist()])
        self.seconds = None if second_per_grids is None else torch.as_tensor(second_per_grids).cpu().float()
        self.merge, self.pps, self.n_window, self.dev = (spec.spatial_merge_size, spec.position_id_per_seconds,
                                                         spec.n_window, dev)
        self.image_idx = self.video_idx = self.audio_idx = 0
        self.whole = True

    def temporal(self, gt: int, *factors) -> torch.Tensor:
        """``[gt]`` float32 temporal positions ``i * factor * ...`` of a grid (multiplied in transformers' order),
        computed on the host, then moved to the device."""
        t = torch.arange(gt)
        for f in factors:
            t = t * f
        t = t.float()
        self.whole = self.whole and torch.equal(t, t.round())
        return t.to(self.dev, non_blocking=True)

    def audio(self, st_idx: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The next audio from ``st_idx``: (positions ``[3, tokens]``, tokens)."""
        a_len = audio_tokens(self.audios[self.audio_idx], self.n_window)
        self.audio_idx += 1
        return _arange3(a_len, st_idx), a_len

    def vision(self, st_idx: torch.Tensor, video: bool) -> tuple[torch.Tensor, int]:
        """The next image (or video) grid from ``st_idx``: (positions ``[3, tokens]``, tokens)."""
        if video:
            gt, gh, gw = self.videos[self.video_idx]
            t_index = self.temporal(gt, self.seconds[self.video_idx], self.pps)
            self.video_idx += 1
        else:
            gt, gh, gw = self.images[self.image_idx]
            t_index = self.temporal(gt, self.pps)
            self.image_idx += 1
        return _vision(t_index, gh, gw, self.merge, st_idx), gt * gh * gw // self.merge**2


def _row_positions(ids: torch.Tensor, spec: PositionSpec, media: _Media, use_audio_in_video: bool,
                   dev: torch.device) -> torch.Tensor:
    """``[3, n]`` float32 positions of one row's kept tokens ``ids`` ``[n]`` (host), transformers' segment walk."""
    n = ids.numel()
    # the layout (host): marker positions and the token after each <vision_start>
    vs_at = torch.nonzero(ids == spec.vision_start_token_id).flatten()
    after_vs = ids[(vs_at + 1).clamp_max(max(n - 1, 0))]
    as_at = torch.nonzero(ids == spec.audio_start_token_id).flatten()
    has = [bool((ids == t).any()) for t in (spec.image_token_id, spec.video_token_id, spec.audio_token_id)]
    vs_at, after_vs, as_at = vs_at.tolist(), after_vs.tolist(), as_at.tolist()
    has_vision_tokens, has_audio_tokens = has[0] or has[1], has[2]
    n_audio = len(as_at)
    n_image = sum(t == spec.image_token_id for t in after_vs)
    n_video = sum(t == (spec.audio_start_token_id if use_audio_in_video else spec.video_token_id) for t in after_vs)
    left_image, left_video, left_audio = n_image, n_video, n_audio
    segments = n_image + n_audio + (0 if use_audio_in_video else n_video)

    pieces: list[torch.Tensor] = []
    last = None  # the last piece transformers appended (its max starts the next run)
    st = 0
    zero = torch.zeros((), dtype=torch.float32, device=dev)

    def start_after(piece):
        return zero if piece is None else piece.max() + 1

    for _ in range(segments):
        st_idx = start_after(last)
        ed_vs = next((p for p in vs_at if p >= st), None) if has_vision_tokens and (
            left_video > 0 or left_image > 0) else None
        ed_as = next((p for p in as_at if p >= st), None) if has_audio_tokens and left_audio > 0 else None
        ed_vs = n + 1 if ed_vs is None else ed_vs
        ed_as = n + 1 if ed_as is None else ed_as
        min_ed = min(ed_vs, ed_as)
        text_len = min_ed - st
        if text_len:
            last = _arange3(text_len, st_idx)
            pieces.append(last)
            st_idx = st_idx + text_len
        in_video = min_ed == ed_vs and ed_vs + 1 == ed_as
        bos = eos = 2 if in_video else 1
        last = _arange3(bos, st_idx)
        pieces.append(last)
        st_idx = st_idx + bos
        token_after = after_vs[vs_at.index(ed_vs)] if ed_vs in vs_at else None
        if min_ed == ed_as:  # audio
            last, a_len = media.audio(st_idx)
            pieces.append(last)
            st += text_len + bos + a_len + eos
            left_audio -= 1
        elif token_after in (spec.image_token_id, spec.video_token_id):
            last, v_len = media.vision(st_idx, video=token_after != spec.image_token_id)
            pieces.append(last)
            st += text_len + bos + v_len + eos
            if token_after == spec.image_token_id:
                left_image -= 1
            else:
                left_video -= 1
        elif in_video:
            audio, a_len = media.audio(st_idx)
            video, v_len = media.vision(st_idx, video=True)
            merged, last = _merge_audio_video(video, audio)
            pieces.append(merged)
            st += text_len + bos + a_len + v_len + eos
            left_video -= 1
            left_audio -= 1
        last = _arange3(eos, start_after(last))
        pieces.append(last)
    if st < n:
        pieces.append(_arange3(n - st, start_after(last)))
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, device=dev)
