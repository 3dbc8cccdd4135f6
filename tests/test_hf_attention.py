"""transformers integration: ``_attn_implementation="omni_fast"`` gives eager's outputs on tiny Qwen3-Omni parts."""

import pytest
import torch

import omni_fast

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402
from transformers.models.qwen3_omni_moe import configuration_qwen3_omni_moe as cfgs  # noqa: E402
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3  # noqa: E402

from omni_fast.integrations.hf_attention import omni_fast_attention_forward  # noqa: E402
from omni_fast.reference import attention as ref  # noqa: E402
from omni_fast.integrations.hf_compat import with_cache  # noqa: E402

omni_fast.register_transformers()

ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1], "interleaved": True}


def _init(model):
    """Deterministic random weights (some transformers modules leave parameters uninitialised at construction)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean = 1.0 if (p.dim() == 1 and "norm" in name) else 0.0
            p.copy_(mean + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _both(model, run, atol=1e-5):
    """Run ``run(model)`` with eager and with omni_fast attention; compare."""
    _init(model)
    model.config._attn_implementation = "eager"
    expect = run(model)
    model.config._attn_implementation = "omni_fast"
    got = run(model)
    model.config._attn_implementation = "eager"
    for e, g in zip(expect if isinstance(expect, tuple) else (expect,), got if isinstance(got, tuple) else (got,)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=atol)


def _text_cfg(cls, **kw):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, rope_parameters=ROPE)
    base.update(kw)
    return cls(**base)


def _prefill_then_decode(model, T=9, steps=2, batch=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, T, model.config.hidden_size, generator=g)
    steps_x = [torch.randn(batch, 1, model.config.hidden_size, generator=g) for _ in range(steps)]

    def run(m):
        cache = DynamicCache(config=m.config)
        outs = [m(inputs_embeds=x, **with_cache(cache), use_cache=True).last_hidden_state]
        for s in steps_x:
            outs.append(m(inputs_embeds=s, **with_cache(cache), use_cache=True).last_hidden_state)
        return tuple(outs)

    return run


@torch.no_grad()
def test_thinker_text_model_prefill_and_decode():
    cfg = _text_cfg(cfgs.Qwen3OmniMoeTextConfig, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    model = q3.Qwen3OmniMoeThinkerTextModel(cfg).eval()
    _both(model, _prefill_then_decode(model))


@torch.no_grad()
def test_thinker_text_model_chunked_prefill():
    """Chunked prefill through transformers: multi-token chunks (6, 4, 5 tokens) against a growing DynamicCache,
    then a decode step; every chunk's queries sit bottom-right against past + new keys."""
    cfg = _text_cfg(cfgs.Qwen3OmniMoeTextConfig, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    model = q3.Qwen3OmniMoeThinkerTextModel(cfg).eval()
    g = torch.Generator().manual_seed(2)
    chunks = [torch.randn(2, n, cfg.hidden_size, generator=g) for n in (6, 4, 5, 1)]

    def run(m):
        cache = DynamicCache(config=m.config)
        outs = []
        for x in chunks:
            outs.append(m(inputs_embeds=x, **with_cache(cache), use_cache=True).last_hidden_state)
        assert cache.get_seq_length() == 16
        return tuple(outs)

    _both(model, run)


@torch.no_grad()
def test_thinker_text_model_static_cache():
    from transformers import StaticCache

    cfg = _text_cfg(cfgs.Qwen3OmniMoeTextConfig, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    model = q3.Qwen3OmniMoeThinkerTextModel(cfg).eval()
    x, steps = torch.randn(2, 5, 32), [torch.randn(2, 1, 32) for _ in range(2)]

    def run(m):  # keys are the whole 12-slot cache; the unfilled slots must not be attended
        cache = StaticCache(config=m.config, max_cache_len=12)
        outs = [m(inputs_embeds=x, **with_cache(cache), use_cache=True).last_hidden_state]
        for s in steps:
            outs.append(m(inputs_embeds=s, **with_cache(cache), use_cache=True).last_hidden_state)
        return tuple(outs)

    _both(model, run)


@torch.no_grad()
def test_thinker_text_model_left_padding():
    cfg = _text_cfg(cfgs.Qwen3OmniMoeTextConfig, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    model = q3.Qwen3OmniMoeThinkerTextModel(cfg).eval()
    x = torch.randn(2, 7, 32)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding of the second prompt
    pos = (mask.cumsum(1) - 1).clamp(min=0)

    def run(m):
        out = m(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state
        return out[0], out[1, 3:]  # padded rows are meaningless (eager averages masked keys there)

    _both(model, run)


@torch.no_grad()
def test_thinker_text_model_padding_holes_and_decode():
    """A 2-D mask with holes (not only left/right padding), then two decode steps: the padded layout with the key
    padding mask gives eager's result on every real row (windows/causality count layout positions, as eager)."""
    cfg = _text_cfg(cfgs.Qwen3OmniMoeTextConfig, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    model = q3.Qwen3OmniMoeThinkerTextModel(cfg).eval()
    g = torch.Generator().manual_seed(3)
    x, steps = torch.randn(2, 8, 32, generator=g), [torch.randn(2, 1, 32, generator=g) for _ in range(2)]
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 2:4] = 0  # a hole
    mask[1, :3] = 0  # left padding

    def run(m):
        cache = DynamicCache(config=m.config)
        out = m(inputs_embeds=x, attention_mask=mask, **with_cache(cache), use_cache=True).last_hidden_state
        outs = [out[mask.bool()]]
        full = mask
        for s in steps:
            full = torch.cat([full, torch.ones(2, 1, dtype=torch.long)], 1)
            outs.append(m(inputs_embeds=s, attention_mask=full, **with_cache(cache),
                          use_cache=True).last_hidden_state)
        return tuple(outs)

    _both(model, run)


def test_padded_batch_path_makes_no_host_sync(monkeypatch):
    """A 2-D padding mask reaches the kernel with no host-value read in omni-fast's path (attention function, op
    dispatch; kernel stubbed, CPU-only value checks off as for CUDA tensors)."""
    from omni_fast.ops import attention as attn_ops

    class M(torch.nn.Module):
        is_causal = True

    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    monkeypatch.setattr(attn_ops, "values_checkable", lambda *a, **k: False)
    launches = []

    def kernel_stub(q, *args):
        launches.append(args[5])  # the key padding mask
        return torch.zeros_like(q), q.new_zeros(q.shape[0], q.shape[2], q.shape[1])

    monkeypatch.setattr(attn_ops._kvcache_op, "_impls", {name: kernel_stub for name in attn_ops._kvcache_op._impls})

    def no_sync(*a, **k):
        raise AssertionError("host sync")

    with torch.no_grad(), monkeypatch.context() as m:
        for name in ("item", "tolist", "__int__", "__bool__", "__float__", "nonzero"):
            m.setattr(torch.Tensor, name, no_sync)
        m.setattr(torch, "nonzero", no_sync)
        out, _ = omni_fast_attention_forward(M(), q, k, v, mask, scaling=0.25)
    assert out.shape == (2, 5, 4, 16) and len(launches) == 1 and launches[0].dtype == torch.bool


@torch.no_grad()
def test_thinker_text_model_packed_position_ids():
    cfg = _text_cfg(cfgs.Qwen3OmniMoeTextConfig, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    model = q3.Qwen3OmniMoeThinkerTextModel(cfg).eval()
    x = torch.randn(1, 9, 32)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2]])  # three sequences packed in one row

    def run(m):
        return m(inputs_embeds=x, position_ids=pos, use_cache=False).last_hidden_state

    _both(model, run)


@torch.no_grad()
def test_talker_model_decode():
    cfg = _text_cfg(cfgs.Qwen3OmniMoeTalkerTextConfig, num_attention_heads=8, num_key_value_heads=1, num_experts=4,
                    num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)
    model = q3.Qwen3OmniMoeTalkerModel(cfg).eval()
    _both(model, _prefill_then_decode(model, T=5, steps=2, batch=1))


@torch.no_grad()
def test_code_predictor_model():
    cfg = _text_cfg(cfgs.Qwen3OmniMoeTalkerCodePredictorConfig, num_attention_heads=4, num_key_value_heads=2,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6}, num_code_groups=4)
    model = q3.Qwen3OmniMoeTalkerCodePredictorModel(cfg).eval()
    _both(model, _prefill_then_decode(model, T=2, steps=3, batch=2))


@torch.no_grad()
def test_code2wav_pre_transformer_sliding_window():
    cfg = cfgs.Qwen3OmniMoeCode2WavConfig(hidden_size=32, intermediate_size=32, num_attention_heads=2,
                                          num_key_value_heads=2, num_hidden_layers=2, sliding_window=4,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    cfg.head_dim = 16
    model = q3.Qwen3OmniMoeCode2WavTransformerModel(cfg).eval()
    x = torch.randn(1, 11, 32)

    def run(m):
        return m(inputs_embeds=x).last_hidden_state

    _both(model, run)
    # The window really matters: a wider window changes the result.
    model.config._attn_implementation = "omni_fast"
    narrow = run(model)
    model.config.sliding_window = 64
    for layer in model.layers:
        layer.self_attn.sliding_window = 64
    assert not torch.allclose(narrow, run(model), atol=1e-4)


@torch.no_grad()
def test_vision_encoder():
    cfg = cfgs.Qwen3OmniMoeVisionEncoderConfig(depth=2, hidden_size=32, intermediate_size=32, num_heads=2,
                                               patch_size=2, temporal_patch_size=2, spatial_merge_size=2,
                                               out_hidden_size=16, num_position_embeddings=16,
                                               deepstack_visual_indexes=[0])
    model = q3.Qwen3OmniMoeVisionEncoder(cfg).eval()
    grid = torch.tensor([[2, 4, 4], [1, 2, 4]])  # two clips: 2 frames of 4x4 patches, 1 frame of 2x4
    n = int(grid.prod(-1).sum())
    x = torch.randn(n, 3 * 2 * 2 * 2)

    def run(m):
        out = m(x, grid_thw=grid)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    _both(model, run)


def _audio_block_diagonal_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention over the whole packed clip with an explicit block-diagonal window mask."""
    cu = kwargs["cu_seq_lens_q"]
    mask = ref.varlen_mask(cu, cu)
    add = torch.zeros(mask.shape, dtype=query.dtype).masked_fill(~mask, torch.finfo(query.dtype).min)
    return q3.eager_attention_forward(module, query, key, value, add[None, None], scaling, dropout)


@torch.no_grad()
def test_audio_attention_matches_block_diagonal_eager():
    cfg = cfgs.Qwen3OmniMoeAudioEncoderConfig(d_model=32, encoder_attention_heads=2, encoder_layers=1,
                                              encoder_ffn_dim=32)
    attn = q3.Qwen3OmniMoeAudioAttention(cfg).eval()
    cu = torch.tensor([0, 6, 12, 15], dtype=torch.int32)  # windows of 6 tokens, a short tail
    h = torch.randn(15, 32)
    cfg._attn_implementation = "eager"
    per_window = attn(h, cu_seqlens=cu)  # transformers' non-flash path: one call per window
    q = attn.q_proj(h).reshape(15, 2, 16).transpose(0, 1)[None]
    k = attn.k_proj(h).reshape(15, 2, 16).transpose(0, 1)[None]
    v = attn.v_proj(h).reshape(15, 2, 16).transpose(0, 1)[None]
    expect, _ = _audio_block_diagonal_eager(attn, q, k, v, None, attn.scaling, cu_seq_lens_q=cu)
    got, _ = omni_fast_attention_forward(attn, q, k, v, None, scaling=attn.scaling, is_causal=False,
                                         cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6, max_length_k=6)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
    cfg._attn_implementation = "omni_fast"
    torch.testing.assert_close(attn(h, cu_seqlens=cu), per_window, rtol=1e-4, atol=1e-5)
    # Full (non-block-diagonal) attention over the clip, what an SDPA call without the windows computes, differs.
    full, _ = omni_fast_attention_forward(attn, q, k, v, None, scaling=attn.scaling, is_causal=False)
    assert not torch.allclose(full, expect, atol=1e-3)


@torch.no_grad()
def test_audio_encoder_model():
    cfg = cfgs.Qwen3OmniMoeAudioEncoderConfig(d_model=32, encoder_attention_heads=2, encoder_layers=2,
                                              encoder_ffn_dim=32, num_mel_bins=16, n_window=50, n_window_infer=200,
                                              downsample_hidden_size=8, output_dim=16, max_source_positions=64)
    model = q3.Qwen3OmniMoeAudioEncoder(cfg).eval()
    feats = torch.randn(16, 250)  # 100-frame chunks -> 13 + 13 + 7 tokens; windows of 2 chunks: cu [0, 26, 33]
    lens = torch.tensor([250])

    def run(m):
        out = m(input_features=feats, feature_lens=lens)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    _both(model, run)


def test_four_d_mask_falls_back_to_masked_reference():
    class M(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 2

    q, k, v = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    mask = torch.rand(1, 1, 5, 5) > 0.3
    mask[..., 0] = True
    add = torch.zeros(1, 1, 5, 5).masked_fill(~mask, torch.finfo(torch.float32).min)
    expect, _ = q3.eager_attention_forward(M(), q, k, v, add, 0.25)
    got, _ = omni_fast_attention_forward(M(), q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(got, expect)
    got, _ = omni_fast_attention_forward(M(), q, k, v, add, scaling=0.25)
    torch.testing.assert_close(got, expect)


def test_registered_names():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from omni_fast.integrations.hf_attention import omni_fast_mask

    assert AttentionInterface()["omni_fast"] is omni_fast_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["omni_fast"] is omni_fast_mask


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_padded_batch_no_host_sync_bf16():
    """On CUDA: a left-padded batch (prefill, then a decode step against the grown keys) through the attention
    function runs without a host sync (CUDA sync debug mode "error") and matches eager on the real rows."""
    class M(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 8

    B, S, D = 3, 300, 128
    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(B, h, S, D, device=dev, dtype=dt) for h in (32, 4, 4))
    mask = torch.ones(B, S, dtype=torch.long, device=dev)
    mask[1, :100] = 0
    mask[2, :7] = 0
    real = mask.bool()
    allowed = torch.tril(torch.ones(S, S, dtype=torch.bool, device=dev)) & real[:, None, :]
    add = torch.zeros(B, 1, S, S, device=dev, dtype=dt).masked_fill(~allowed[:, None], torch.finfo(dt).min)
    want, _ = q3.eager_attention_forward(M(), q, k, v, add, D ** -0.5)
    for q_len in (S, 1):
        omni_fast_attention_forward(M(), q[:, :, -q_len:], k, v, mask, scaling=D ** -0.5)  # compile first
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got, _ = omni_fast_attention_forward(M(), q[:, :, -q_len:], k, v, mask, scaling=D ** -0.5)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        rows = real[:, -q_len:]
        torch.testing.assert_close(got[rows].float(), want[:, -q_len:][rows].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case", ["causal", "padded", "packed", "window"])
def test_autograd_runs_through_the_pure_pytorch_path(case):
    """The kernels have no backward: with autograd recording, the attention function gives eager's output AND
    eager's gradients (no mask / 2-D padding mask / packed cu_seqlens / sliding window)."""
    g = torch.Generator().manual_seed(3)
    B, Hq, Hk, S, D = (1 if case == "packed" else 2), 4, 2, 7, 8
    q, k, v = (torch.randn(B, h, S, D, generator=g, requires_grad=True) for h in (Hq, Hk, Hk))
    module = torch.nn.Module()
    module.is_causal = True
    kwargs, mask4 = {}, torch.ones(B, 1, S, S, dtype=torch.bool).tril()
    mask2 = None
    if case == "padded":
        mask2 = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
        mask4 = mask4 & mask2.bool()[:, None, None, :]
    elif case == "packed":
        cu = torch.tensor([0, 3, 7], dtype=torch.int32)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4, max_length_k=4)
        block = torch.zeros(S, S, dtype=torch.bool)
        block[:3, :3] = block[3:, 3:] = True
        mask4 = mask4 & block
    elif case == "window":
        kwargs = dict(sliding_window=3)
        mask4 = mask4 & torch.ones(S, S, dtype=torch.bool).triu(-2)
    out, _ = omni_fast_attention_forward(module, q, k, v, mask2, scaling=D ** -0.5, **kwargs)
    kk, vv = (t.repeat_interleave(Hq // Hk, dim=1) for t in (k, v))
    scores = (q @ kk.transpose(2, 3) * D ** -0.5).masked_fill(~mask4, torch.finfo(q.dtype).min)  # eager's rule
    expect = (torch.softmax(scores, dim=-1) @ vv).transpose(1, 2)
    real = torch.ones(B, S, dtype=torch.bool)
    if case == "padded":  # the padded query rows: meaningless either way, left out of the loss (as a loss masks them)
        real[0, :2] = False
    w = real[:, :, None, None].float()
    grads = torch.autograd.grad((out.square() * w).sum(), (q, k, v))
    torch.testing.assert_close(out * w, expect * w, rtol=1e-5, atol=1e-6)
    e_grads = torch.autograd.grad((expect.square() * w).sum(), (q, k, v))
    for got, want in zip(grads, e_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_cache_keyword_traces_without_a_dynamo_warning():
    """``torch.compile`` of a patched forward (which passes the cache by ``with_cache``) warned "Dynamo detected a
    call to a functools.lru_cache-wrapped function ... Silent incorrectness" at hf_compat.py: the keyword is a
    plain memo now."""
    import warnings

    from omni_fast.integrations.hf_compat import cache_keyword

    fn = torch.compile(lambda x: with_cache(x, a=1)[cache_keyword()] + 1, backend="eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.testing.assert_close(fn(torch.ones(2)), torch.full((2,), 2.0))
    assert not [w for w in seen if "lru_cache" in str(w.message)], [str(w.message)[:200] for w in seen]
