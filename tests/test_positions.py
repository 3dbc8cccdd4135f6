"""The TM-RoPE position builder equals transformers' ``get_rope_index`` of Qwen3-Omni on random prompt layouts."""

import functools
import random
import types

import pytest
import torch

pytest.importorskip("transformers")
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3  # noqa: E402

from omni_fast.models.positions import PositionSpec, audio_tokens, rope_positions  # noqa: E402
from omni_fast.models.presets import tiny_qwen3_omni_config  # noqa: E402

CFG = tiny_qwen3_omni_config().thinker_config
SPEC = PositionSpec.from_config(CFG)
AUDIO_END, VISION_END = SPEC.audio_start_token_id + 1, SPEC.vision_start_token_id + 1


def _hf(input_ids, mask, images, videos, audio_lens, seconds, use_audio_in_video):
    """transformers' own get_rope_index (a method that reads only ``config`` and ``spatial_merge_size``)."""
    owner = q3.Qwen3OmniMoePreTrainedModelForConditionalGeneration
    fake = types.SimpleNamespace(config=CFG, spatial_merge_size=SPEC.spatial_merge_size)
    fake.get_llm_pos_ids_for_vision = functools.partial(owner.get_llm_pos_ids_for_vision, fake)
    return owner.get_rope_index(
        fake, input_ids, image_grid_thw=images, video_grid_thw=videos, attention_mask=mask,
        use_audio_in_video=use_audio_in_video, audio_seqlens=audio_lens, second_per_grids=seconds)


def _layout(rng, use_audio_in_video, grids, audio_lens, seconds):
    """One prompt row: text runs between audio / image / video / audio-in-video segments."""
    ids = [rng.randrange(100) for _ in range(rng.randrange(1, 4))]
    kinds = ["audio", "image", "video_in" if use_audio_in_video else "video"]
    for _ in range(rng.randrange(1, 4)):
        kind = rng.choice(kinds)
        if kind in ("audio", "video_in"):
            frames = rng.randrange(1, 330)
            audio_lens.append(frames)
            n_audio = audio_tokens(frames, SPEC.n_window)
        if kind != "audio":
            g = (rng.randrange(1, 4) if kind != "image" else 1, 2 * rng.randrange(1, 4), 2 * rng.randrange(1, 4))
            n_vis = g[0] * g[1] * g[2] // 4
        if kind == "audio":
            ids += [SPEC.audio_start_token_id] + [SPEC.audio_token_id] * n_audio + [AUDIO_END]
        elif kind == "image":
            grids["image"].append(g)
            ids += [SPEC.vision_start_token_id] + [SPEC.image_token_id] * n_vis + [VISION_END]
        else:
            grids["video"].append(g)
            seconds.append(rng.choice([0.5, 1.0, 2.0, 0.3]))
            if kind == "video":
                ids += [SPEC.vision_start_token_id] + [SPEC.video_token_id] * n_vis + [VISION_END]
            else:
                ids += ([SPEC.vision_start_token_id, SPEC.audio_start_token_id] + [SPEC.video_token_id] * n_vis
                        + [SPEC.audio_token_id] * n_audio + [AUDIO_END, VISION_END])
        ids += [rng.randrange(100) for _ in range(rng.randrange(0, 4))]
    return ids


@pytest.mark.parametrize("use_audio_in_video", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_matches_transformers_on_random_layouts(seed, use_audio_in_video):
    rng = random.Random(seed * 2 + use_audio_in_video)
    grids, audio_lens, seconds = {"image": [], "video": []}, [], []
    rows = [_layout(rng, use_audio_in_video, grids, audio_lens, seconds) for _ in range(rng.randrange(1, 4))]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):  # left padding
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    images = torch.tensor(grids["image"]).view(-1, 3) if grids["image"] else None
    videos = torch.tensor(grids["video"]).view(-1, 3) if grids["video"] else None
    if images is None and videos is None:
        images = torch.zeros(0, 3, dtype=torch.long)
    lens = torch.tensor(audio_lens) if audio_lens else None
    secs = torch.tensor(seconds) if seconds else None
    want_pos, want_delta = _hf(ids, mask, images, videos, lens, secs, use_audio_in_video)
    got_pos, got_delta = rope_positions(ids, SPEC, attention_mask=mask, image_grid_thw=images,
                                        video_grid_thw=videos, audio_feature_lengths=lens, second_per_grids=secs,
                                        use_audio_in_video=use_audio_in_video)
    torch.testing.assert_close(got_pos, want_pos, rtol=0, atol=0)
    torch.testing.assert_close(got_delta, want_delta.to(got_delta.dtype), rtol=0, atol=0)


def test_text_and_audio_only_match_transformers():
    ids = torch.tensor([[1, 2, SPEC.audio_start_token_id, SPEC.audio_token_id, SPEC.audio_token_id, AUDIO_END, 3],
                        [0, 0, 4, 5, 6, 7, 8]])
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    want = _hf(ids, mask, None, None, torch.tensor([20]), None, False)
    got = rope_positions(ids, SPEC, attention_mask=mask, audio_feature_lengths=[20])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.to(g.dtype), rtol=0, atol=0)


def test_audio_token_count_matches_transformers():
    lens = torch.arange(1, 700)
    want = q3._get_feat_extract_output_lengths(lens, 50)
    assert [audio_tokens(int(n)) for n in lens] == want.tolist()


def test_bad_input():
    with pytest.raises(ValueError, match="input_ids"):
        rope_positions(torch.zeros(5, dtype=torch.long), SPEC)
