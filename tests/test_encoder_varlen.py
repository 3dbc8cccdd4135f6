"""Patched audio / vision encoders: each attention layer is ONE varlen launch over all windows/frames.

transformers (5.x) calls a non-"flash" attention function once per window (``cu_seqlens.tolist()`` on the host);
``omni_fast.patch`` swaps the encoder attention forwards so the ``"omni_fast"`` function gets the whole clip with
``cu_seq_lens_q/k`` and runs :func:`omni_fast.ops.flash_attn_varlen` once. Tiny random configs, fp32, Triton
interpreter; expectations are transformers' eager attention (per window, and over the whole clip with an explicit
block-diagonal mask).
"""

import pytest
import torch

import omni_fast
from omni_fast import ops

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_5_omni import configuration_qwen2_5_omni as cfgs25  # noqa: E402
from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25  # noqa: E402
from transformers.models.qwen3_omni_moe import configuration_qwen3_omni_moe as cfgs3  # noqa: E402
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3  # noqa: E402

from omni_fast.reference import attention as ref  # noqa: E402

omni_fast.register_transformers()

ENCODER_ATTENTION = ("Qwen3OmniMoeAudioAttention", "Qwen3OmniMoeVisionAttention", "Qwen2_5OmniAudioAttention",
                     "Qwen2_5OmniVisionAttention")


def _init(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean = 1.0 if (p.dim() == 1 and "norm" in name) else 0.0
            p.copy_(mean + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture
def varlen_calls(monkeypatch):
    """Records every ``ops.flash_attn_varlen`` call (cu_seqlens, max_seqlen_q) and every attention-function call."""
    from omni_fast.integrations import hf_attention

    calls = {"varlen": [], "function": 0}
    real = ops.flash_attn_varlen

    def spy(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls["varlen"].append((cu_q.clone(), max_q))
        return real(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    monkeypatch.setattr(ops, "flash_attn_varlen", spy)
    real_fn = hf_attention.omni_fast_attention_forward

    def fn_spy(*a, **kw):
        calls["function"] += 1
        return real_fn(*a, **kw)

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "omni_fast", fn_spy)
    return calls


def _out(o):
    return o.last_hidden_state if hasattr(o, "last_hidden_state") else o[0]


def _patched_vs_eager(model, run):
    """(eager output, patched output, report); the model is unpatched again afterwards."""
    model.config._attn_implementation = "eager"
    want = run(model)
    report = omni_fast.patch(model)
    try:
        got = run(model)
    finally:
        omni_fast.unpatch(model)
    assert model.config._attn_implementation == "eager"
    assert not any("forward" in m.__dict__ or "_omni_fast_forward" in m.__dict__ for m in model.modules())
    assert torch.equal(run(model), want)  # unpatch restores transformers' exact path
    return want, got, report


def _audio3(layers=2):
    cfg = cfgs3.Qwen3OmniMoeAudioEncoderConfig(d_model=32, encoder_attention_heads=2, encoder_layers=layers,
                                               encoder_ffn_dim=32, num_mel_bins=16, n_window=50, n_window_infer=200,
                                               downsample_hidden_size=8, output_dim=16, max_source_positions=64)
    return _init(q3.Qwen3OmniMoeAudioEncoder(cfg))


# Two clips, 250 and 400 mel frames: 100-frame chunks -> 13 tokens each (50-frame tail: 7); windows of 2 chunks
# (26 tokens): cu_seqlens [0, 26, 33, 59, 85].
AUDIO_LENS = torch.tensor([250, 400])
AUDIO_CU = [0, 26, 33, 59, 85]


@torch.no_grad()
def test_qwen3_audio_encoder_one_launch_per_layer(varlen_calls):
    model = _audio3()
    feats = torch.randn(16, int(AUDIO_LENS.sum()), generator=torch.Generator().manual_seed(1))

    def run(m):
        return _out(m(input_features=feats, feature_lens=AUDIO_LENS))

    want, got, report = _patched_vs_eager(model, run)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # one varlen launch per layer over all 4 windows, no max_seqlen (no host sync to get it)
    assert len(varlen_calls["varlen"]) == model.config.encoder_layers == varlen_calls["function"]
    for cu, max_q in varlen_calls["varlen"]:
        assert cu.tolist() == AUDIO_CU and max_q is None
    assert any("Qwen3OmniMoeAudioAttention: attention over all windows/frames -> one omni_fast flash_attn_varlen"
               in r and r.startswith("[audio]") and "(x2)" in r for r in report.replaced)


@torch.no_grad()
def test_qwen3_audio_attention_matches_block_diagonal_eager():
    """The patched attention layer == eager over the WHOLE clip with an explicit block-diagonal window mask
    (FlashAttention's result); attending over the whole clip (transformers' 4.57-era SDPA path) differs."""
    model = _audio3(layers=1)
    attn = model.layers[0].self_attn
    cu = torch.tensor(AUDIO_CU, dtype=torch.int32)
    h = torch.randn(85, 32, generator=torch.Generator().manual_seed(2))
    T, H, D = 85, 2, 16
    q, k, v = (p(h).reshape(T, H, D).transpose(0, 1)[None] for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    block = ref.varlen_mask(cu, cu)
    add = torch.zeros(T, T).masked_fill(~block, torch.finfo(torch.float32).min)[None, None]
    windowed, _ = q3.eager_attention_forward(attn, q, k, v, add, attn.scaling)
    whole_clip, _ = q3.eager_attention_forward(attn, q, k, v, None, attn.scaling)
    want = attn.out_proj(windowed.reshape(T, -1))
    omni_fast.patch(model)
    try:
        got = attn(h, cu_seqlens=cu)
    finally:
        omni_fast.unpatch(model)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, attn.out_proj(whole_clip.reshape(T, -1)), atol=1e-3)


@torch.no_grad()
def test_qwen3_vision_encoder_one_launch_per_layer(varlen_calls):
    cfg = cfgs3.Qwen3OmniMoeVisionEncoderConfig(depth=2, hidden_size=48, intermediate_size=32, num_heads=2,
                                                patch_size=2, temporal_patch_size=2, spatial_merge_size=2,
                                                out_hidden_size=16, num_position_embeddings=16,
                                                deepstack_visual_indexes=[0])  # head_dim 24: padded like 72
    model = _init(q3.Qwen3OmniMoeVisionEncoder(cfg))
    grid = torch.tensor([[2, 4, 4], [1, 2, 4]])  # frames of 16, 16 and 8 patches
    x = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 2 * 2, generator=torch.Generator().manual_seed(3))
    want, got, report = _patched_vs_eager(model, lambda m: _out(m(x, grid_thw=grid)))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(varlen_calls["varlen"]) == 2 == varlen_calls["function"]
    assert all(cu.tolist() == [0, 16, 32, 40] for cu, _ in varlen_calls["varlen"])
    assert any(r.startswith("[vision] Qwen3OmniMoeVisionAttention: attention over all windows/frames")
               for r in report.replaced)


@torch.no_grad()
def test_qwen2_5_audio_encoder(varlen_calls):
    cfg = cfgs25.Qwen2_5OmniAudioEncoderConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2,
                                               encoder_ffn_dim=32, output_dim=16, num_mel_bins=16, n_window=25,
                                               max_source_positions=64)
    model = _init(q25.Qwen2_5OmniAudioEncoder(cfg))
    lens = torch.tensor([130, 60])
    feats = torch.randn(16, int(lens.sum()), generator=torch.Generator().manual_seed(4))
    want, got, _ = _patched_vs_eager(model, lambda m: _out(m(input_features=feats, feature_lens=lens)))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(varlen_calls["varlen"]) == 2 == varlen_calls["function"]
    assert varlen_calls["varlen"][0][0].numel() > 3  # several 50-frame chunks in one launch


@torch.no_grad()
def test_qwen2_5_vision_encoder_windows_and_full_layers(varlen_calls):
    """Qwen2.5-Omni's vision encoder: window attention layers (cu_window_seqlens) and a full-attention layer."""
    cfg = cfgs25.Qwen2_5OmniVisionEncoderConfig(depth=2, hidden_size=32, intermediate_size=32, num_heads=2,
                                                patch_size=2, temporal_patch_size=2, spatial_merge_size=2,
                                                window_size=8, out_hidden_size=16, fullatt_block_indexes=[1])
    model = _init(q25.Qwen2_5OmniVisionEncoder(cfg))
    grid = torch.tensor([[1, 8, 8], [2, 4, 4]])
    x = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 2 * 2, generator=torch.Generator().manual_seed(5))
    want, got, _ = _patched_vs_eager(model, lambda m: _out(m(x, grid_thw=grid)))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(varlen_calls["varlen"]) == 2 == varlen_calls["function"]
    windows, frames = (cu.tolist() for cu, _ in varlen_calls["varlen"])
    assert frames == [0, 64, 80, 96] and len(windows) > len(frames)


def test_patched_encoder_attention_path_makes_no_host_sync(monkeypatch):
    """omni-fast's Python path between the encoder layer and the kernel (the swapped forward, the attention
    function, the op's dispatch) reads no tensor value on the host; the kernel is stubbed, and the op's CPU-only
    value checks are off as they are for CUDA tensors. (A GPU test checks it with CUDA's sync debug mode.)"""
    from omni_fast.ops import attention as attn_ops

    model = _audio3(layers=1)
    attn = model.layers[0].self_attn
    cu = torch.tensor(AUDIO_CU, dtype=torch.int32)
    h = torch.randn(85, 32)
    monkeypatch.setattr(attn_ops, "values_checkable", lambda *a, **k: False)
    monkeypatch.setattr(attn_ops, "check_cu_seqlens", lambda name, cu, total, **k: cu.numel() - 1)

    launches = []

    def kernel_stub(q, k, v, *args):
        launches.append(args[2])  # max_seqlen_q as the op receives it (-1: unknown)
        return torch.zeros_like(q), q.new_zeros(q.shape[1], q.shape[0])

    monkeypatch.setattr(attn_ops._varlen_op, "_impls", {name: kernel_stub for name in attn_ops._varlen_op._impls})

    def no_sync(*a, **k):
        raise AssertionError("host sync")

    omni_fast.patch(model)
    try:
        with torch.no_grad(), monkeypatch.context() as m:
            for name in ("item", "tolist", "__int__", "__bool__", "__float__", "nonzero"):
                m.setattr(torch.Tensor, name, no_sync)
            m.setattr(torch, "nonzero", no_sync)
            with pytest.raises(AssertionError, match="host sync"):
                bool(cu[0])  # the trap is armed
            out = attn(h, cu_seqlens=cu)
    finally:
        omni_fast.unpatch(model)
    assert out.shape == (85, 32) and launches == [-1]


def test_autograd_and_other_implementations_take_transformers_path(varlen_calls):
    model = _audio3(layers=1)
    attn = model.layers[0].self_attn
    cu = torch.tensor(AUDIO_CU, dtype=torch.int32)
    h = torch.randn(85, 32)
    omni_fast.patch(model)
    try:
        attn(h, cu_seqlens=cu)  # grad enabled + parameters requiring grad: transformers' forward (per window)
        assert varlen_calls["function"] == 4 and not varlen_calls["varlen"]  # 4 windows, 4 calls
        with torch.no_grad():
            model.config._attn_implementation = "eager"  # changed by the user after the patch
            attn(h, cu_seqlens=cu)
            assert varlen_calls["function"] == 4
    finally:
        omni_fast.unpatch(model)


def test_full_model_patch_swaps_every_encoder_attention():
    from omni_fast.models.presets import tiny_qwen2_5_omni_thinker_config, tiny_qwen3_omni_config

    for model in (q3.Qwen3OmniMoeThinkerForConditionalGeneration(tiny_qwen3_omni_config().thinker_config),
                  q25.Qwen2_5OmniThinkerForConditionalGeneration(tiny_qwen2_5_omni_thinker_config())):
        report = omni_fast.patch(model)
        try:
            swapped = {type(m).__name__ for m in model.modules() if "_omni_fast_forward" in m.__dict__}
            replaced = "\n".join(report.replaced)
        finally:
            omni_fast.unpatch(model)
        encoders = {c for c in ENCODER_ATTENTION if any(type(m).__name__ == c for m in model.modules())}
        assert len(encoders) == 2 and encoders <= swapped
        assert "[audio]" in replaced and "[vision]" in replaced
        assert not any("_omni_fast_forward" in m.__dict__ for m in model.modules())


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["audio", "vision"])
@torch.no_grad()
def test_gpu_encoder_attention_no_host_sync_bf16(kind):
    """On CUDA, real head shapes: the patched attention layer runs without a host sync (CUDA sync debug mode
    "error") and matches transformers' eager per-window path in bf16. Audio: 20 heads x 64, 104-token windows and
    a short tail; vision: 16 heads x 72, frames of 1024/1024/300/77 patches."""
    if kind == "audio":
        cfg = cfgs3.Qwen3OmniMoeAudioEncoderConfig(d_model=1280, encoder_attention_heads=20, encoder_layers=1,
                                                   encoder_ffn_dim=64, output_dim=64)
        model = q3.Qwen3OmniMoeAudioEncoder(cfg)
        lens, extra = [104] * 9 + [37], {}
    else:
        cfg = cfgs3.Qwen3OmniMoeVisionEncoderConfig(depth=1, hidden_size=1152, intermediate_size=64, num_heads=16,
                                                    patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                                                    out_hidden_size=64, num_position_embeddings=64,
                                                    deepstack_visual_indexes=[])
        model = q3.Qwen3OmniMoeVisionEncoder(cfg)
        lens = [1024, 1024, 300, 77]
    model = model.to("cuda", torch.bfloat16).eval()
    attn = model.layers[0].self_attn if kind == "audio" else model.blocks[0].attn
    T = sum(lens)
    if kind == "vision":
        pos = torch.randn(T, 72, device="cuda")
        extra = {"position_embeddings": (pos.cos(), pos.sin())}
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0, dtype=torch.int32)
    h = torch.randn(T, cfg.d_model if kind == "audio" else cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    model.config._attn_implementation = "eager"
    want = attn(h, cu_seqlens=cu, **extra)
    omni_fast.patch(model)
    try:
        attn(h, cu_seqlens=cu, **extra)  # compile outside the checked region
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = attn(h, cu_seqlens=cu, **extra)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        omni_fast.unpatch(model)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
