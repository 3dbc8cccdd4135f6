"""omni-fast as a transformers experts implementation: tiny Qwen3-Omni thinker and talker, same logits as eager."""

import pytest
import torch

import omni_fast
from omni_fast import ops

transformers = pytest.importorskip("transformers")
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: E402
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3  # noqa: E402
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (  # noqa: E402
    Qwen3OmniMoeTalkerConfig, Qwen3OmniMoeThinkerConfig)

ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3], "interleaved": True}
TEXT = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64,
            rope_parameters=ROPE, norm_topk_prob=True)


def _randomize(model, scale=0.15):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn_like(p) * scale)
    return model.eval()


@pytest.fixture
def fused_calls(monkeypatch):
    omni_fast.register_transformers()
    calls = []
    real = ops.fused_moe

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "fused_moe", spy)
    return calls


def _compare(model, run, calls):
    with torch.no_grad():
        model.config._experts_implementation = "eager"
        want = run()
        assert not calls
        model.config._experts_implementation = "omni_fast"
        got = run()
    assert calls, "the omni_fast experts forward did not run"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_registered_and_idempotent():
    omni_fast.register_transformers()
    omni_fast.register_transformers()
    assert "omni_fast" in ALL_EXPERTS_FUNCTIONS


def test_thinker_logits_match_eager(fused_calls):
    cfg = Qwen3OmniMoeThinkerConfig(
        text_config=TEXT,
        audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, output_dim=32,
                          num_mel_bins=16, downsample_hidden_size=8),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           deepstack_visual_indexes=[]))
    model = _randomize(q3.Qwen3OmniMoeThinkerForConditionalGeneration(cfg))
    ids = torch.randint(0, 64, (2, 9))
    _compare(model, lambda: model(input_ids=ids).logits, fused_calls)


def test_talker_logits_match_eager(fused_calls):
    text = dict(TEXT, num_experts_per_tok=3, shared_expert_intermediate_size=40)
    cfg = Qwen3OmniMoeTalkerConfig(
        text_config=text, thinker_hidden_size=32, spatial_merge_size=2,  # set by the full model config normally
        code_predictor_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=16, vocab_size=64, num_code_groups=4))
    model = _randomize(q3.Qwen3OmniMoeTalkerForConditionalGeneration(cfg))
    emb = torch.randn(1, 7, 32)
    pos = torch.arange(7).expand(3, 1, 7)
    _compare(model, lambda: model(inputs_embeds=emb, position_ids=pos).logits, fused_calls)


def test_training_mode_falls_back_to_eager(fused_calls):
    cfg = Qwen3OmniMoeThinkerConfig(text_config=TEXT)
    experts = q3.Qwen3OmniMoeThinkerTextExperts(cfg.text_config)
    _randomize(experts)
    experts.config._experts_implementation = "omni_fast"
    x = torch.randn(5, 32, requires_grad=True)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 5], [1, 2]])
    out = experts(x, ids, torch.rand(5, 2))
    out.sum().backward()
    assert x.grad is not None and not fused_calls
