"""Qwen2.5-Omni Token2Wav DiT: the block-masked attention as one paged varlen flash-attention launch, against
transformers' rule (its mask through SDPA, as ``DiTDecoderLayer`` builds it) on the interpreter."""

import pytest
import torch

pytest.importorskip("transformers")

import omni_fast  # noqa: E402
from omni_fast.ops.dit import block_mask  # noqa: E402


def _hf_mask(S, bs, lb, la):
    """``DiTDecoderLayer``'s mask from ``Qwen2_5OmniToken2WavDiTModel._create_block_diff``."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25

    dit = q25.Qwen2_5OmniToken2WavDiTModel.__new__(q25.Qwen2_5OmniToken2WavDiTModel)
    dit.block_size, dit.num_attention_heads = bs, 1
    diff = q25.Qwen2_5OmniToken2WavDiTModel._create_block_diff(dit, torch.zeros(1, S, 1))[0, 0]
    return (diff >= -float(lb)) & (diff <= float(la))


@pytest.mark.parametrize("B,S,bs,H,Hk,lb,la", [(2, 48, 24, 2, 2, 1, 1), (1, 72, 24, 2, 1, 0, 1), (2, 50, 24, 2, 2, 1, 0),
                                               (1, 7, 24, 1, 1, 1, 1), (3, 1, 4, 2, 2, 0, 0), (1, 33, 5, 4, 2, 2, 1)])
def test_block_attention_matches_the_dit_rule(B, S, bs, H, Hk, lb, la):
    assert torch.equal(block_mask(S, bs, lb, la), _hf_mask(S, bs, lb, la))
    g = torch.Generator().manual_seed(S)
    q = torch.randn(B, S, H, 16, generator=g)
    k, v = (torch.randn(B, S, Hk, 16, generator=g) for _ in range(2))
    ke, ve = (t.repeat_interleave(H // Hk, dim=2) for t in (k, v))
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), ke.transpose(1, 2), ve.transpose(1, 2), attn_mask=block_mask(S, bs, lb, la)).transpose(1, 2)
    for backend in ("triton", "reference"):
        got = omni_fast.ops.block_attention(q, k, v, block_size=bs, look_backward=lb, look_ahead=la, backend=backend)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_block_attention_bad_input():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="block_size"):
        omni_fast.ops.block_attention(q, q, q, block_size=0)
    with pytest.raises(ValueError, match="k"):
        omni_fast.ops.block_attention(q, q[:, :7], q, block_size=4)
    with pytest.raises(ValueError, match="look_ahead"):
        omni_fast.ops.block_attention(q, q, q, block_size=4, look_ahead=-1)
