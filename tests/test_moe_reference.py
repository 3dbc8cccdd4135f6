"""MoE reference vs transformers' Qwen3-Omni blocks (bit-exact), and the alignment reference's invariants."""

import pytest
import torch

from omni_fast.reference import moe as ref

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3  # noqa: E402
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (  # noqa: E402
    Qwen3OmniMoeTalkerTextConfig, Qwen3OmniMoeTextConfig)


def thinker_config(E=8, k=3, H=32, I=24, norm=True):
    cfg = Qwen3OmniMoeTextConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k,
                                 norm_topk_prob=norm, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                 num_hidden_layers=1, vocab_size=64)
    cfg._experts_implementation = "eager"
    return cfg


def talker_config(E=8, k=3, H=32, I=24, Is=40, norm=True):
    cfg = Qwen3OmniMoeTalkerTextConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k,
                                       norm_topk_prob=norm, num_attention_heads=2, num_key_value_heads=1,
                                       head_dim=16, num_hidden_layers=1, vocab_size=64,
                                       shared_expert_intermediate_size=Is)
    cfg._experts_implementation = "eager"
    return cfg


def randomize(module, dtype, scale=0.2):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return module.to(dtype)


def block_weights(block):
    """(gate_weight, w13, w2, shared_w13, shared_w2, shared_gate_weight) of a transformers sparse MoE block."""
    shared = getattr(block, "shared_expert", None)
    if shared is None:
        return block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj, None, None, None
    sw13 = torch.cat([shared.gate_proj.weight, shared.up_proj.weight])
    return (block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj, sw13, shared.down_proj.weight,
            block.shared_expert_gate.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("talker", [False, True])
def test_moe_block_matches_transformers(dtype, norm, talker):
    cfg = talker_config(norm=norm) if talker else thinker_config(norm=norm)
    cls = q3.Qwen3OmniMoeTalkerTextSparseMoeBlock if talker else q3.Qwen3OmniMoeThinkerTextSparseMoeBlock
    block = randomize(cls(cfg), dtype)
    x = torch.randn(2, 7, cfg.hidden_size, dtype=dtype)
    with torch.no_grad():
        want = block(x)
        g, w13, w2, sw13, sw2, sg = block_weights(block)
        got = ref.moe_block(x, g, w13, w2, cfg.num_experts_per_tok, norm, sw13, sw2, sg)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_router_matches_transformers(dtype):
    cfg = thinker_config(E=12, k=4)
    gate = randomize(q3.Qwen3OmniMoeThinkerTextTopKRouter(cfg), dtype)
    x = torch.randn(9, cfg.hidden_size, dtype=dtype)
    with torch.no_grad():
        _, w_hf, i_hf = gate(x)
        w, i = ref.router(x, gate.weight, cfg.num_experts_per_tok, True)
    torch.testing.assert_close(w, w_hf, rtol=0, atol=0)
    # bf16 logits tie often; torch.topk's tie order on CPU is unspecified, ours is lowest index first.
    canon = torch.empty_like(i_hf)
    for t in range(i_hf.shape[0]):
        order = sorted(range(i_hf.shape[1]), key=lambda j: (-float(w_hf[t, j]), int(i_hf[t, j])))
        canon[t] = i_hf[t, order]
    assert i.dtype == torch.int32 and torch.equal(i.long(), canon)
    if dtype == torch.float32:
        assert torch.equal(i.long(), i_hf)


def test_topk_softmax_ties_go_to_lowest_index():
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    w, i = ref.topk_softmax(logits, 2)
    assert i.tolist() == [[1, 2], [0, 1]]
    torch.testing.assert_close(w, torch.full((2, 2), 0.5))


def _check_alignment(ids, block_size, E, expert_map=None):
    sorted_ids, expert_ids, npost = ref.moe_align_block_size(ids, block_size, E, expert_map)
    n = ids.numel()
    flat = ids.reshape(-1).long()
    total = int(npost[0])
    assert sorted_ids.numel() % block_size == 0 and sorted_ids.numel() >= total
    assert expert_ids.numel() == sorted_ids.numel() // block_size
    assert sorted_ids.numel() == -(-ref.max_padded_tokens(n, E, block_size) // block_size) * block_size
    real = sorted_ids[sorted_ids < n].long()
    assert sorted(real.tolist()) == list(range(n))  # each pair exactly once
    assert bool((sorted_ids[total:] == n).all())
    for b in range(expert_ids.numel()):
        chunk = sorted_ids[b * block_size:(b + 1) * block_size].long()
        if b * block_size >= total:
            assert int(expert_ids[b]) == -1
            continue
        members = chunk[chunk < n]
        assert members.numel() > 0 and bool((flat[members] == flat[members[0]]).all())
        e = int(flat[members[0]])
        want = e if expert_map is None else int(expert_map[e])
        assert int(expert_ids[b]) == want
        assert members.tolist() == sorted(members.tolist())
    return sorted_ids, expert_ids, npost


@pytest.mark.parametrize("T,k,E,bs", [(0, 2, 4, 16), (1, 8, 128, 16), (13, 3, 6, 4), (40, 5, 5, 8), (7, 2, 9, 1)])
def test_align_invariants(T, k, E, bs):
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.int64)
    _check_alignment(ids.int(), bs, E)


def test_align_expert_map_marks_remote_blocks():
    E = 6
    ids = torch.stack([torch.randperm(E)[:3] for _ in range(11)]).int()
    emap = torch.tensor([0, -1, 1, -1, -1, 2], dtype=torch.int32)
    _, expert_ids, _ = _check_alignment(ids, 4, E, emap)
    assert (expert_ids == -1).any()


def test_fused_moe_expert_map_drops_remote_experts():
    T, H, I, E = 5, 16, 8, 4
    x = torch.randn(T, H, dtype=torch.float64)
    w13, w2 = torch.randn(E, 2 * I, H, dtype=torch.float64), torch.randn(E, H, I, dtype=torch.float64)
    w = torch.rand(T, 2, dtype=torch.float64)
    ids = torch.stack([torch.randperm(E)[:2] for _ in range(T)])
    emap = torch.tensor([1, -1, 0, -1], dtype=torch.int32)  # rank holds global experts 2 (local 0) and 0 (local 1)
    local = ref.fused_moe(x, w13[[2, 0]], w2[[2, 0]], w, ids, expert_map=emap)
    keep = (ids == 0) | (ids == 2)
    full = ref.fused_moe(x, w13, w2, w * keep, ids)
    torch.testing.assert_close(local, full)
