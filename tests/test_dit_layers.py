"""Qwen2.5-Omni Token2Wav DiT with few launches per layer (:mod:`omni_fast.models.dit_layers`): the fused pieces
(``gated_ada_layer_norm``, ``dit_qkv_rope``, ``block_attention`` plans, the fused weights) against their references
on the interpreter, the references against transformers' modules, and the whole fused forward against transformers'
``Qwen2_5OmniToken2WavDiTModel`` layers. (The whole ODE solve: tests/test_dit_solve.py.)"""

import pytest
import torch

pytest.importorskip("transformers")

import omni_fast  # noqa: E402
from omni_fast.models import dit_layers, dit_solve  # noqa: E402
from omni_fast.reference import dit as ref_dit  # noqa: E402
from omni_fast.testing import assert_matches_reference  # noqa: E402
from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25  # noqa: E402
from test_dit_solve import _dit as _tiny_dit  # noqa: E402  (one tiny random DiT for both files)

ops = omni_fast.ops


def _dit(layers=3):
    return _tiny_dit(layers=layers)


# ------------------------------------------------------------------------------------ gated residual + AdaLN
@pytest.mark.parametrize("B,T,C", [(2, 13, 24), (1, 1, 7), (3, 5, 130), (1, 0, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gated_ada_layer_norm_kernel_matches_reference(B, T, C, dtype):
    """Odd widths, one frame, an empty clip, batch > 1; gate / shift / scale as chunks of one modulation output
    (strided views, read in place)."""
    g = torch.Generator().manual_seed(B * 100 + T + C)
    x, delta = ((torch.randn(B, T, C, generator=g) * 3 + 1).to(dtype) for _ in range(2))
    mod = torch.randn(B, 6 * C, generator=g).to(dtype)
    shift, scale, gate = mod[:, :C], mod[:, C:2 * C], mod[:, 2 * C:3 * C]
    h, out = ops.gated_ada_layer_norm(x, delta, gate, shift, scale, backend="triton")
    assert h.shape == out.shape == x.shape and out.dtype == h.dtype == dtype
    h_ref, out_ref = ops.gated_ada_layer_norm(x, delta, gate, shift, scale, backend="reference")
    if B * T == 0:
        return
    torch.testing.assert_close(h, h_ref, atol=0, rtol=0) if dtype == torch.float32 else \
        torch.testing.assert_close(h, h_ref, atol=1e-2, rtol=1e-3)  # (fp16: an FMA may round once, not twice)
    xd = x.double() + gate.double()[:, None] * delta.double()
    exact = torch.nn.functional.layer_norm(xd, (C,), eps=1e-6) * (1 + scale.double()[:, None]) + shift.double()[:, None]
    assert_matches_reference(out, exact, out_ref, factor=2.0, atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_gated_reference_is_the_decoder_layers_math():
    """The reference is ``DiTDecoderLayer``'s ``hidden + gate_msa.unsqueeze(1) * attn`` then ``ff_norm`` and its
    modulation, bit for bit."""
    layer = q25.DiTDecoderLayer(_dit(1).config).eval()
    g = torch.Generator().manual_seed(3)
    h, attn = torch.randn(2, 7, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    gate, shift, scale = (torch.randn(2, 32, generator=g) for _ in range(3))
    want_h = h + gate.unsqueeze(1) * attn
    want = layer.ff_norm(want_h) * (1 + scale[:, None]) + shift[:, None]
    got_h, got = ops.gated_ada_layer_norm(h, attn, gate, shift, scale, eps=layer.ff_norm.eps, backend="reference")
    assert torch.equal(got_h, want_h) and torch.equal(got, want)


def test_gated_ada_layer_norm_bad_input():
    x, m = torch.randn(2, 3, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="delta"):
        ops.gated_ada_layer_norm(x, x[:, :2], m, m, m)
    with pytest.raises(ValueError, match="gate"):
        ops.gated_ada_layer_norm(x, x, torch.randn(1, 8), m, m)
    with pytest.raises(TypeError, match="delta"):
        ops.gated_ada_layer_norm(x, x.half(), m, m, m)


# -------------------------------------------------------------------------------------- q/k/v split + RoPE
def _hf_qkv(attn, x, cos, sin):
    """transformers' ``DiTAttention.forward`` up to the attention call: q, k, v ``[B, H, S, D]``."""
    B = x.shape[0]
    q, k, v = (lin(x).view(B, -1, attn.heads, attn.inner_dim // attn.heads).transpose(1, 2)
               for lin in (attn.to_q, attn.to_k, attn.to_v))
    q[:, :1], k[:, :1] = q25.apply_rotary_pos_emb(q25.deinterleave_head_dim(q[:, :1]),
                                                  q25.deinterleave_head_dim(k[:, :1]), cos, sin)
    return q, k, v


def test_qkv_rope_reference_matches_transformers_attention():
    dit = _dit(1)
    attn = dit.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 32, generator=g)
    cos, sin = dit.rotary_embed(x, torch.arange(9)[None].repeat(2, 1))
    with torch.no_grad():
        want = _hf_qkv(attn, x, cos, sin)
        w = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
        b = torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias])
        got = ops.dit_qkv_rope(torch.nn.functional.linear(x, w, b), cos, sin, heads=attn.heads, backend="reference")
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e.transpose(1, 2), atol=1e-6, rtol=1e-6)  # (one GEMM vs three: rounding)


@pytest.mark.parametrize("B,S,H,D", [(2, 7, 2, 16), (1, 1, 3, 6), (3, 5, 1, 8), (2, 0, 2, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qkv_rope_kernel_matches_reference(B, S, H, D, dtype):
    g = torch.Generator().manual_seed(B * 31 + S + D)
    qkv = torch.randn(B, S, 3 * H * D, generator=g).to(dtype)
    cos, sin = torch.randn(1, S, D, generator=g).to(dtype), torch.randn(1, S, D, generator=g).to(dtype)
    for c, s in ((cos, sin), (cos.expand(B, S, D), sin.expand(B, S, D).contiguous())):  # shared / per-row tables
        got = ops.dit_qkv_rope(qkv, c, s, heads=H, backend="triton")
        same = ops.dit_qkv_rope(qkv, c, s, heads=H, backend="reference")
        exact = ref_dit.qkv_rope(qkv.double(), c.double(), s.double(), H)
        for part, (o, e, r) in enumerate(zip(got, exact, same)):
            assert o.shape == (B, S, H, D) and o.is_contiguous() and o.dtype == dtype
            if part == 2:
                assert torch.equal(o, r)  # v: a copy
            assert_matches_reference(o, e, r, factor=2.0, atol=1e-6 if dtype == torch.float32 else None)


def test_qkv_rope_bad_input():
    qkv, t = torch.randn(1, 4, 24), torch.randn(1, 4, 4)
    with pytest.raises(ValueError, match="heads"):
        ops.dit_qkv_rope(qkv, t, t, heads=5)
    with pytest.raises(ValueError, match="heads"):
        ops.dit_qkv_rope(torch.randn(1, 4, 18), torch.randn(1, 4, 3), torch.randn(1, 4, 3), heads=2)  # odd D
    with pytest.raises(ValueError, match="cos"):
        ops.dit_qkv_rope(qkv, torch.randn(2, 4, 4), t, heads=2)
    with pytest.raises(TypeError, match="sin"):
        ops.dit_qkv_rope(qkv, t, t.double(), heads=2)


# ------------------------------------------------------------------------------------------ attention plans
def test_block_attention_plan_equals_rebuilding_it():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 12, 2, 8, generator=g) for _ in range(3))
    lens = torch.tensor([12, 7], dtype=torch.int32)
    plan = ops.block_attention_plan(2, 12, block_size=4, look_backward=1, look_ahead=0, seq_lens=lens)
    for backend in ("triton", "reference"):
        want = ops.block_attention(q, k, v, block_size=4, look_backward=1, seq_lens=lens, backend=backend)
        got = ops.block_attention(q, k, v, block_size=4, look_backward=1, seq_lens=lens, plan=plan, backend=backend)
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="plan"):  # built for another rule
        ops.block_attention(q, k, v, block_size=4, look_backward=0, seq_lens=lens, plan=plan)
    with pytest.raises(TypeError, match="plan"):
        ops.block_attention(q, k, v, block_size=4, look_backward=1, seq_lens=lens, plan=tuple(plan))
    with pytest.raises(ValueError, match="batch"):
        ops.block_attention_plan(2**25, 8, block_size=1)


# ------------------------------------------------------------------------------------------- fused weights
def test_fuse_weights_shares_storage_and_follows_updates():
    dit = _dit(2)
    before = {n: p.detach().clone() for n, p in dit.named_parameters()}
    fused = dit_layers.fuse_weights(dit)
    assert dit_layers.fuse_weights(dit) is fused  # idempotent, nothing rebuilt
    for n, p in dit.named_parameters():
        assert torch.equal(p, before[n]), n  # values unchanged
    attn = dit.transformer_blocks[1].attn
    w, b = fused.qkv[1]
    assert attn.to_k.weight.data_ptr() == w[attn.inner_dim:].data_ptr()  # a slice, not a copy
    assert dit.norm_out.linear.bias.data_ptr() == fused.mod_bias[-2 * 32:].data_ptr()
    with torch.no_grad():
        attn.to_v.weight.add_(1.0)  # an in-place update reaches the fused tensor
    assert torch.equal(w[2 * attn.inner_dim:], attn.to_v.weight)
    dit.double()  # new parameter tensors: rebuilt
    again = dit_layers.fuse_weights(dit)
    assert again is not fused and again.mod_weight.dtype == torch.float64


def test_fused_model_still_saves_and_loads(tmp_path):
    """Parameters that are slices of one storage survive transformers' save_pretrained / from_pretrained."""
    dit = _dit(2)
    dit_layers.fuse_weights(dit)
    dit.save_pretrained(tmp_path)
    back = q25.Qwen2_5OmniToken2WavDiTModel.from_pretrained(tmp_path)
    want = dit.state_dict()
    assert all(torch.equal(t, want[name]) for name, t in back.state_dict().items())


# ------------------------------------------------------------------------------------------- whole forward
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fused_forward_matches_transformers(backend):
    """One CFG DiT forward (``Qwen2_5OmniToken2WavDiTModel.forward`` with ``apply_cfg``) against the fused layers,
    unpadded (lens = S) and with the padded bucket (rows < L equal)."""
    dit = _dit(3)
    g = torch.Generator().manual_seed(4)
    B, n = 2, 5
    code = torch.randint(0, 300, (B, n), generator=g)
    x = torch.randn(B, n * dit.repeats, dit.mel_dim, generator=g)
    cond, ref = torch.randn(B, dit.config.enc_emb_dim, generator=g), torch.randn(B, 9, dit.mel_dim, generator=g)
    t = torch.tensor(0.4)
    with torch.no_grad():
        want = dit(x, ref, cond[:, None].repeat(1, n * dit.repeats, 1), code, t, apply_cfg=True)
        want = want[:B] + (want[:B] - want[B:]) * 0.5
        spk = dit.input_embed.spk_encoder(torch.cat([ref, torch.zeros_like(ref)]))
        L = n * dit.repeats
        for codes in (n, dit_solve._page_aligned(n, dit)):
            S = codes * dit.repeats
            pad_code = torch.nn.functional.pad(code, (0, codes - n))
            pad_x = torch.nn.functional.pad(x, (0, 0, 0, S - L))
            static = dit_solve._invariants(dit, pad_code, cond, spk, torch.full((B,), L, dtype=torch.int32), 0.5)
            assert static["fused"] is not None
            got = dit_solve._dit_forward(dit, pad_x, t, static, backend)
            torch.testing.assert_close(got[:, :L], want, atol=2e-5, rtol=2e-5)


def test_nine_launches_per_layer():
    """The fused forward issues 9 launches per layer (cost model's counter, interpreter)."""
    from omni_fast.bench.costmodel.counter import count_launches, summarize

    def total(layers):
        dit = _dit(layers)
        code = torch.randint(0, 300, (1, 4))
        with torch.no_grad():
            static = dit_solve._invariants(dit, code, torch.randn(1, 16), torch.randn(2, 16),
                                           torch.tensor([8], dtype=torch.int32), 0.5)
        x = torch.randn(1, 8, dit.mel_dim)

        def call():
            with torch.no_grad():
                return dit_solve._dit_forward(dit, x, torch.tensor(0.3), static, None)
        return summarize(count_launches(call))["total"]
    assert total(3) - total(2) == 9


@pytest.mark.gpu
def test_fused_pieces_on_cuda():
    """The two new kernels compiled for real (fp32 / fp16 / bf16) at the real DiT's widths (C 1024, 16 heads x 64)
    against their references. (The fused forward inside the captured solve: test_dit_solve's gpu test.)"""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x, delta = (torch.randn(2, 37, 1024, generator=g).to("cuda", dtype) for _ in range(2))
        mod = torch.randn(2, 6 * 1024, generator=g).to("cuda", dtype)
        args = (x, delta, mod[:, :1024], mod[:, 1024:2048], mod[:, 2048:3072])
        for got, want in zip(ops.gated_ada_layer_norm(*args, backend="triton"),
                             ops.gated_ada_layer_norm(*args, backend="reference")):
            torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=2e-2)
        qkv = torch.randn(2, 37, 3 * 1024, generator=g).to("cuda", dtype)
        cos, sin = (torch.randn(1, 37, 64, generator=g).to("cuda", dtype) for _ in range(2))
        for got, want in zip(ops.dit_qkv_rope(qkv, cos, sin, heads=16, backend="triton"),
                             ops.dit_qkv_rope(qkv, cos, sin, heads=16, backend="reference")):
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=1e-2)
