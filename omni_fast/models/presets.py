"""Model configurations for random-weight Qwen-Omni models: ``"tiny"`` (CPU tests, the demo) and ``"full"``.

All are built from transformers' own config classes, so the models built from them are transformers' modules
(nothing is downloaded). Token ids are remapped into the tiny vocabularies; the structure (and every code path of
``generate``) stays that of the real model.

Constraints found while making ``"tiny"`` construct and generate (see ``configuration_qwen3_omni_moe.py``):

- the talker's ``generate`` suppresses the top 1024 codec ids (all but codec EOS), so the talker vocabulary must be
  ``>= 1024 +`` the codebook size and every codec special id must sit in that top range;
- ``talker.num_code_groups == code_predictor.num_code_groups == code2wav.num_quantizers``;
  ``code_predictor.vocab_size == code2wav.codebook_size``;
- ``mrope_section`` sums to ``head_dim // 2`` (thinker and talker), ``accept_hidden_layer <= thinker layers`` (tiny: below it,
  as in the real model, so the talker reads an inner layer's output).
"""

from __future__ import annotations

# Token ids of the tiny vocabularies (the real ones are 151644.. in a 152064 vocabulary).
TINY_TEXT_VOCAB = 160
TINY_IDS = dict(
    im_start_token_id=150, im_end_token_id=151, tts_pad_token_id=152, tts_bos_token_id=153, tts_eos_token_id=154,
    system_token_id=155, user_token_id=156, assistant_token_id=157,
)
# end markers are start + 1, as in the real vocabulary (audio 151669/151670, vision 151652/151653)
TINY_THINKER_IDS = dict(audio_token_id=140, image_token_id=141, video_token_id=142, audio_start_token_id=146,
                        vision_start_token_id=144,
                        user_token_id=156, position_id_per_seconds=13)
TINY_VISION_START = TINY_THINKER_IDS["vision_start_token_id"]
TINY_CODEBOOK = 64
TINY_GROUPS = 4
TINY_CODEC_VOCAB = TINY_CODEBOOK + 1024  # codebook-0 ids, then 1024 specials (suppressed in generation but EOS)
_CODEC_SPECIAL = TINY_CODEC_VOCAB - 16
TINY_CODEC_IDS = dict(codec_pad_id=_CODEC_SPECIAL + 0, codec_bos_id=_CODEC_SPECIAL + 1,
                      codec_eos_token_id=_CODEC_SPECIAL + 2, codec_nothink_id=_CODEC_SPECIAL + 7,
                      codec_think_bos_id=_CODEC_SPECIAL + 8, codec_think_eos_id=_CODEC_SPECIAL + 9)
# the real model's three voices (FULL_SPEAKERS), so every preset takes the same --speaker names
TINY_SPEAKERS = {"ethan": _CODEC_SPECIAL + 10, "chelsie": _CODEC_SPECIAL + 11, "aiden": _CODEC_SPECIAL + 12}
FULL_SPEAKERS = {"ethan": 2302, "chelsie": 2301, "aiden": 2303}  # Qwen3-Omni-30B-A3B's talker_config.speaker_id


def preset_speakers() -> list[str]:
    """The speaker names of the random presets (tiny and full have the real model's three)."""
    return sorted(FULL_SPEAKERS)


def _rope(section):
    return {"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(section), "interleaved": True}


def tiny_qwen3_omni_config(layers: int = 2):
    """A tiny ``Qwen3OmniMoeConfig`` (thinker + talker + code predictor + Code2Wav, ~0.39M parameters).

    Thinker: hidden 32, ``layers`` MoE layers (8 experts, top-2), 2 q / 1 kv heads, head_dim 16, vocab 160;
    audio encoder 1 layer d 32 on 128 mel bins; vision encoder 1 layer, patch 16; talker hidden 32, MoE with a shared
    expert; code predictor 1 layer, 4 code groups of 64 codes; Code2Wav 1 layer hidden 32, decoder dim 32, the real
    upsampling (1920 samples per code, 24 kHz).
    """
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeConfig

    h = 32
    text = dict(hidden_size=h, intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                vocab_size=TINY_TEXT_VOCAB, rope_parameters=_rope((4, 2, 2)), norm_topk_prob=True,
                max_position_embeddings=4096)
    thinker = dict(
        text_config=text,
        audio_config=dict(d_model=h, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=h,
                          num_mel_bins=128, downsample_hidden_size=8, max_source_positions=1500),
        vision_config=dict(depth=1, hidden_size=h, intermediate_size=64, num_heads=2, out_hidden_size=h,
                           deepstack_visual_indexes=[0], num_position_embeddings=256),
        **TINY_THINKER_IDS,
    )
    talker_text = dict(text, vocab_size=TINY_CODEC_VOCAB, num_experts_per_tok=2, norm_topk_prob=True,
                       shared_expert_intermediate_size=40)
    talker = dict(
        text_config=talker_text, thinker_hidden_size=h, num_code_groups=TINY_GROUPS, accept_hidden_layer=layers - 1,
        spatial_merge_size=2, speaker_id=dict(TINY_SPEAKERS), audio_token_id=140, image_token_id=141,
        video_token_id=142, vision_start_token_id=TINY_VISION_START, audio_start_token_id=146,
        position_id_per_seconds=13,
        code_predictor_config=dict(hidden_size=h, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=16, vocab_size=TINY_CODEBOOK,
                                   num_code_groups=TINY_GROUPS),
        **TINY_CODEC_IDS,
    )
    code2wav = dict(codebook_size=TINY_CODEBOOK, hidden_size=h, num_attention_heads=2, num_key_value_heads=2,
                    intermediate_size=48, num_hidden_layers=1, num_quantizers=TINY_GROUPS, decoder_dim=32,
                    sliding_window=72)
    return Qwen3OmniMoeConfig(thinker_config=thinker, talker_config=talker, code2wav_config=code2wav, **TINY_IDS)


def full_qwen3_omni_config(thinker_layers: int | None = None):
    """The Qwen3-Omni-30B-A3B shapes (``/work/shared/qwen-omni-facts.md``); ``thinker_layers`` < 48 trims the thinker.

    Memory (bf16 weights, counted on the meta device): 35.3B parameters = 65.7 GiB: thinker text model 56.3 GiB
    (1.16 GiB per layer), lm_head 0.6, audio encoder 1.2, vision 1.0, talker 6.2 (code predictor 0.26 of it),
    Code2Wav 0.4. Add a few GiB for KV caches and activations: ~72 GiB free runs all 48 layers.
    """
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeConfig

    rope = _rope((24, 20, 20))
    text = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                num_hidden_layers=thinker_layers or 48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                vocab_size=152064, rope_parameters=rope, norm_topk_prob=True, intermediate_size=768)
    thinker = dict(
        text_config=text,
        audio_config=dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                          output_dim=2048, num_mel_bins=128, downsample_hidden_size=480, n_window=50,
                          n_window_infer=800),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=2048,
                           deepstack_visual_indexes=[8, 16, 24], patch_size=16, temporal_patch_size=2),
        position_id_per_seconds=13, audio_start_token_id=151669, vision_start_token_id=151652,
    )
    talker_text = dict(hidden_size=1024, num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=2,
                       head_dim=128, moe_intermediate_size=384, num_experts=128, num_experts_per_tok=6,
                       norm_topk_prob=True, shared_expert_intermediate_size=768, vocab_size=3072,
                       rope_parameters=rope, intermediate_size=2048)
    talker = dict(
        text_config=talker_text, thinker_hidden_size=2048, num_code_groups=16, accept_hidden_layer=min(
            24, thinker_layers or 48), spatial_merge_size=2, position_id_per_seconds=13,
        codec_eos_token_id=2150, codec_nothink_id=2155, codec_think_bos_id=2156, codec_think_eos_id=2157,
        codec_pad_id=2148, codec_bos_id=2149, speaker_id=dict(FULL_SPEAKERS),
        code_predictor_config=dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=5,
                                   num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=2048,
                                   num_code_groups=16),
    )
    code2wav = dict(codebook_size=2048, hidden_size=1024, num_attention_heads=16, num_key_value_heads=16,
                    intermediate_size=3072, num_hidden_layers=8, num_quantizers=16, decoder_dim=1536,
                    sliding_window=72)
    return Qwen3OmniMoeConfig(thinker_config=thinker, talker_config=talker, code2wav_config=code2wav)


def tiny_qwen2_5_omni_thinker_config():
    """A tiny ``Qwen2_5OmniThinkerConfig`` (dense thinker, contiguous M-RoPE sections, q/k/v bias)."""
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniThinkerConfig

    text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=TINY_TEXT_VOCAB,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    return Qwen2_5OmniThinkerConfig(
        text_config=text,
        audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, output_dim=32,
                          num_mel_bins=128),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
        audio_token_index=140, image_token_index=141, video_token_index=142, audio_start_token_id=146,
        vision_start_token_id=144)


FULL_WEIGHTS_GIB = 65.7
THINKER_LAYER_GIB = 1.16
FULL_HEADROOM_GIB = 6.0  # KV caches, activations, allocator slack


# Everything but the thinker's decoder layers (lm_head, embeddings, encoders, talker, Code2Wav): 10.0 GiB.
FULL_REST_GIB = FULL_WEIGHTS_GIB - 48 * THINKER_LAYER_GIB
# The smallest "full" build: one thinker layer + the rest + headroom (17.2 GiB free).
FULL_MIN_FREE_GIB = FULL_REST_GIB + THINKER_LAYER_GIB + FULL_HEADROOM_GIB


def full_thinker_layers(free_gib: float) -> int | None:
    """Thinker depth for the ``"full"`` preset (bf16) in ``free_gib`` of device memory: None (all 48) when it fits,
    else the most layers that do, and 0 when not even one layer fits (below :data:`FULL_MIN_FREE_GIB`: use the tiny
    preset). Only the thinker is trimmed; every other part keeps its real shape."""
    if free_gib >= FULL_WEIGHTS_GIB + FULL_HEADROOM_GIB:
        return None
    if free_gib < FULL_MIN_FREE_GIB:
        return 0
    return max(1, min(47, int((free_gib - FULL_HEADROOM_GIB - FULL_REST_GIB) / THINKER_LAYER_GIB)))


def tiny_qwen2_5_omni_config():
    """A tiny ``Qwen2_5OmniConfig`` with talker and Token2Wav (DiT + BigVGAN) built, ~0.3M parameters."""
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniConfig

    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
    talker = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, vocab_size=300, embedding_size=32, rope_parameters=rope,
                  audio_token_index=140, image_token_index=141, video_token_index=142, vision_start_token_id=144,
                  audio_start_token_id=146, tts_codec_start_token_id=290, tts_codec_end_token_id=291,
                  tts_codec_pad_token_id=292, tts_codec_mask_token_id=293, tts_text_start_token_id=150,
                  tts_text_end_token_id=151, tts_text_pad_token_id=152)
    token2wav = dict(
        dit_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, emb_dim=16,
                        enc_emb_dim=16, enc_dim=16, enc_channels=[16, 16, 16, 16, 48], enc_attention_channels=8,
                        enc_se_channels=8, num_embeds=300, look_ahead_layers=[1], look_backward_layers=[0]),
        bigvgan_config=dict(upsample_initial_channel=16))
    return Qwen2_5OmniConfig(thinker_config=tiny_qwen2_5_omni_thinker_config().to_dict(), talker_config=talker,
                             token2wav_config=token2wav, enable_audio_output=True)
