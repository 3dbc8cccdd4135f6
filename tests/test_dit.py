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


@pytest.mark.hf_free
def test_block_attention_bad_input():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="block_size"):
        omni_fast.ops.block_attention(q, q, q, block_size=0)
    with pytest.raises(ValueError, match="k"):
        omni_fast.ops.block_attention(q, q[:, :7], q, block_size=4)
    with pytest.raises(ValueError, match="look_ahead"):
        omni_fast.ops.block_attention(q, q, q, block_size=4, look_ahead=-1)


def _tiny_dit(seed: int):
    """(Token2Wav model, its DiT, the DiT config, a generator) of the tiny Qwen2.5-Omni preset, fp32, with the DiT's
    non-norm weights N(0, 0.05) from ``seed`` (the generator continues from there for the test's inputs)."""
    from omni_fast.models.presets import tiny_qwen2_5_omni_config
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25

    cfg = tiny_qwen2_5_omni_config().token2wav_config
    torch.manual_seed(0)
    t2w = q25.Qwen2_5OmniToken2WavModel._from_config(cfg, dtype=torch.float32).eval()
    dit = t2w.code2wav_dit_model
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return t2w, dit, cfg.dit_config, g


@pytest.mark.parametrize("codes", [3, 13])  # one partial block / two blocks, the second partial
def test_patched_dit_ode_solve_matches_transformers(codes, fast_path):
    """The whole flow-matching solve (RK4 steps, classifier-free guidance doubling the batch) with the DiT attention
    and the AdaLN modulations swapped: same noise (the seed before ``sample``) and steps, fp32 rounding-level
    agreement. One clip: CFG already runs the kernels on batch 2 (the guided and the null rows); a second clip of
    the same length doubled the interpreter programs for no new path (batch 2 and 3 clips: test_dit_solve.py's
    triton case and test_block_attention_seq_lens_equals_the_unpadded_sequence)."""
    from omni_fast.integrations import token2wav_synth

    fast_path("token2wav")  # opt-in until GPU-tested
    t2w, dit, dc, g = _tiny_dit(0)
    code = torch.randint(0, 290, (1, codes), generator=g)
    cond, ref_mel = torch.randn(1, dc.enc_emb_dim, generator=g), torch.randn(1, 10, dc.mel_dim, generator=g)

    def solve():
        # num_steps=2: one whole RK4 step, its 4 DiT evaluations (t0, +1/3, +2/3, t1: every stage of the 3/8 rule)
        # through the swapped pieces; further steps repeat those evaluations on the interpreter (the multi-step
        # loop is backend-independent: test_dit_solve.py's reference cases run 4 steps against transformers)
        torch.manual_seed(7)
        return dit.sample(cond, ref_mel, code, num_steps=2)

    want = solve()
    report = omni_fast.patch(t2w, backend="triton")
    try:
        assert any(r.startswith("[code2wav] DiTAttention") and "(x2)" in r for r in report.replaced)
        assert any("Qwen2_5_OmniAdaLayerNormZero: LayerNorm + shift/scale" in r and "(x2)" in r
                   for r in report.replaced)  # the fused AdaLN modulation (ops.ada_layer_norm) too
        assert any("Qwen2_5_OmniAdaLayerNormZero_Final:" in r for r in report.replaced)
        # buckets (4, 16): 3 codes -> 4 -> one padded 24-frame attention block (the default's smallest bucket, 16
        # codes, rounds up to 48 frames: twice the interpreter work for the same partial-block case); 13 codes ->
        # 16 -> 48 frames (two blocks, the second partial), as with the default buckets
        token2wav_synth.set_code_buckets(t2w, (4, 16))
        got = solve()
    finally:
        omni_fast.unpatch(t2w)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # measured max |diff| 2.4e-7 (values ~4)
    assert torch.equal(solve(), want)


@pytest.mark.parametrize("apply_cfg", [True, False])
def test_patched_dit_forward_runs_the_swapped_layers(apply_cfg, fast_path, monkeypatch):
    """The swapped ``DiTAttention.forward`` and AdaLN forwards as transformers' DiT ``forward`` reaches them (a caller
    with its own solver calls the DiT directly; the patched ``sample`` above runs dit_solve's own layer code, so it
    never executes these): one evaluation, 13 codes (26 frames: a full and a partial 24-frame block), batch 2."""
    fast_path("token2wav")
    t2w, dit, dc, g = _tiny_dit(1)
    codes = 13
    frames = codes * dit.repeats
    args = dict(hidden_states=torch.randn(2, frames, dc.mel_dim, generator=g),
                condition_vector=torch.randn(2, 10, dc.mel_dim, generator=g),
                speaker_embedding=torch.randn(2, frames, dc.enc_emb_dim, generator=g),
                quantized_code=torch.randint(0, 290, (2, codes), generator=g), time_step=torch.tensor(0.3),
                apply_cfg=apply_cfg)
    with torch.no_grad():
        want = dit(**args)
        omni_fast.patch(t2w, backend="triton")
        try:
            calls = []  # the omni-fast ops the swapped forwards launch, counted
            for name in ("block_attention", "ada_layer_norm"):
                op = getattr(omni_fast.ops, name)
                monkeypatch.setattr(omni_fast.ops, name,
                                    (lambda f, n: lambda *a, **k: calls.append(n) or f(*a, **k))(op, name))
            got = dit(**args)
        finally:
            omni_fast.unpatch(t2w)
    n = len(dit.transformer_blocks)
    assert calls.count("block_attention") == n and calls.count("ada_layer_norm") == n + 1  # + the final norm
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ AdaLN modulation
def _ada_transformers(x, shift, scale):
    """transformers' ``Qwen2_5_OmniAdaLayerNormZero_Final`` math (its LayerNorm module, then the modulation)."""
    norm = torch.nn.LayerNorm(x.shape[-1], elementwise_affine=False, eps=1e-6)
    return norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


def test_ada_layer_norm_reference_matches_transformers_module():
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25

    mod = q25.Qwen2_5_OmniAdaLayerNormZero(24).eval()
    x, emb = torch.randn(2, 7, 24), torch.randn(2, 24)
    with torch.no_grad():
        want, *_ = mod(x, emb=emb)
        shift, scale = mod.linear(mod.silu(emb)).chunk(6, dim=1)[:2]
        got = omni_fast.ops.ada_layer_norm(x, shift.contiguous(), scale.contiguous(), backend="reference")
    assert torch.equal(got, want)


@pytest.mark.hf_free
@pytest.mark.parametrize("B,T,C", [(2, 13, 24), (1, 1, 7), (3, 5, 130), (1, 0, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ada_layer_norm_kernel_matches_reference(B, T, C, dtype):
    """The fused kernel (interpreter) vs the reference: odd widths, one frame, an empty clip, batch > 1; the shift
    / scale rows follow each batch element."""
    from omni_fast.testing import assert_matches_reference

    g = torch.Generator().manual_seed(B * 100 + T + C)
    x = (torch.randn(B, T, C, generator=g) * 3 + 1).to(dtype)
    shift, scale = (torch.randn(B, C, generator=g).to(dtype) for _ in range(2))
    out = omni_fast.ops.ada_layer_norm(x, shift, scale, backend="triton")
    assert out.shape == x.shape and out.dtype == dtype
    if B * T == 0:
        return
    exact = _ada_transformers(x.double(), shift.double(), scale.double())
    same = omni_fast.ops.ada_layer_norm(x, shift, scale, backend="reference") if dtype == torch.float32 else \
        _ada_transformers(x.float(), shift.float(), scale.float()).to(dtype)
    assert_matches_reference(out, exact, same, factor=2.0, atol=1e-5 if dtype == torch.float32 else None)


@pytest.mark.hf_free
def test_ada_layer_norm_bad_input():
    x, m = torch.randn(2, 3, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="shift"):
        omni_fast.ops.ada_layer_norm(x, torch.randn(1, 8), m)
    with pytest.raises(ValueError, match="scale"):
        omni_fast.ops.ada_layer_norm(x, m, torch.randn(2, 9))
    with pytest.raises(TypeError, match="scale"):
        omni_fast.ops.ada_layer_norm(x, m, m.half())
    with pytest.raises(ValueError, match="eps"):
        omni_fast.ops.ada_layer_norm(x, m, m, eps=-1.0)
    with pytest.raises(ValueError, match="x"):
        omni_fast.ops.ada_layer_norm(x[0], m, m)


@pytest.mark.hf_free
@pytest.mark.parametrize("B,S,bs,lb,la,lens", [(2, 16, 4, 1, 1, (10, 7)), (1, 9, 4, 0, 1, (1,)), (3, 12, 5, 1, 0, (12, 5, 2))])
def test_block_attention_seq_lens_equals_the_unpadded_sequence(B, S, bs, lb, la, lens):
    """Padding past seq_lens[b] never reaches rows < seq_lens[b]: they equal the attention of the unpadded sequence;
    rows past it stay finite."""
    g = torch.Generator().manual_seed(S)
    q, k, v = (torch.randn(B, S, 2, 16, generator=g) for _ in range(3))
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    for backend in ("triton", "reference"):
        got = omni_fast.ops.block_attention(q, k, v, block_size=bs, look_backward=lb, look_ahead=la,
                                            seq_lens=seq_lens, backend=backend)
        assert torch.isfinite(got).all()
        for b, L in enumerate(lens):
            want = omni_fast.ops.block_attention(q[b:b + 1, :L].contiguous(), k[b:b + 1, :L].contiguous(),
                                                 v[b:b + 1, :L].contiguous(), block_size=bs, look_backward=lb,
                                                 look_ahead=la, backend="reference")
            torch.testing.assert_close(got[b:b + 1, :L], want, atol=2e-6, rtol=1e-5)
    with pytest.raises((TypeError, ValueError), match="seq_lens"):
        omni_fast.ops.block_attention(q, k, v, block_size=bs, seq_lens=seq_lens.float())
