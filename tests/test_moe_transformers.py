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
    real = ops.moe_experts

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "moe_experts", spy)
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


def _ep_rank(full, rank: int, ep_size: int):
    """An experts module set up as transformers' expert parallelism leaves it on one rank: ``MoEParamShard``
    (transformers/distributed/expert_parallel.py) shards dim 0 of the weights, sets ``num_experts`` to the local
    count and ``_is_expert_parallel = True``."""
    import copy

    local = full.num_experts // ep_size
    shard = copy.deepcopy(full)
    with torch.no_grad():
        shard.gate_up_proj = torch.nn.Parameter(full.gate_up_proj[rank * local:(rank + 1) * local].clone())
        shard.down_proj = torch.nn.Parameter(full.down_proj[rank * local:(rank + 1) * local].clone())
    shard.num_experts = local
    shard._is_expert_parallel = True
    return shard


@pytest.mark.parametrize("ep_size,k", [(2, 2), (3, 2), (6, 4)])  # (6, 4): top_k > the local experts + 1
def test_expert_parallel_rank_matches_eager(fused_calls, ep_size, k):
    """transformers' AllReduceEP calls each rank's experts with local ids, the off-rank pairs given the sentinel id
    ``num_local_experts`` and weight 0; the omni_fast forward maps the sentinel to -1 through an expert_map. Per
    rank it matches the eager forward on the same inputs, and the ranks' outputs sum to the unsharded module's."""
    torch.manual_seed(0)
    cfg = Qwen3OmniMoeThinkerConfig(text_config=TEXT)
    full = _randomize(q3.Qwen3OmniMoeThinkerTextExperts(cfg.text_config))
    T, E = 11, full.num_experts
    x = torch.randn(T, 32)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    weights = torch.rand(T, k)
    total = torch.zeros(T, 32)
    with torch.no_grad():
        full.config._experts_implementation = "eager"
        want_full = full(x, ids, weights)
        for rank in range(ep_size):
            shard = _ep_rank(full, rank, ep_size)
            local = shard.num_experts
            # AllReduceEP's masking (transformers/distributed/expert_parallel.py), without the process group.
            off_rank = (ids // local) != rank
            local_ids = torch.where(off_rank, local, ids % local)
            local_w = weights.masked_fill(off_rank, 0.0)
            shard.config._experts_implementation = "eager"
            # The eager target gets a valid id with weight 0 for the off-rank pairs (the same sum: 0 x finite = 0);
            # transformers < 5.2x's eager forward rejects the sentinel id itself (one_hot over num_experts classes).
            want = shard(x, local_ids.masked_fill(off_rank, 0), local_w)
            shard.config._experts_implementation = "omni_fast"
            n_calls = len(fused_calls)
            got = shard(x, local_ids, local_w)
            assert len(fused_calls) == n_calls + 1, "the omni_fast experts forward did not run"
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            # Tokens whose experts all live elsewhere: exactly zero.
            assert bool((got[off_rank.all(dim=1)] == 0).all())
            total += got
    torch.testing.assert_close(total, want_full, rtol=1e-5, atol=1e-5)
