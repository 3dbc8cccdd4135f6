"""MTP code predictor: one audio frame (prefill + 14 decode steps, sampling, next Talker input) per call.

Providers, at the real shapes (5 layers, hidden 1024, 16 q / 8 kv heads, d 128, SwiGLU 3072, 15 groups x 2048,
bf16, random weights): ``transformers`` (the code predictor's ``generate`` loop plus the codec-embedding sum,
exactly as the Talker runs it), ``eager`` (omni-fast's reference frame with a static KV cache), ``compile``
(``torch.compile(mode="reduce-overhead")`` of that reference frame), ``omni_fast`` (the whole frame replayed as one
CUDA graph, Triton ops, the fused GEMV layer kernels: 5 launches per layer), ``omni_fast_unfused`` (the same graph
with cuBLAS matmuls and the small fused ops: 9 launches per layer), so fused vs cuBLAS shows side by side, and
``persistent`` (issue 16: the whole frame as ONE launch of the persistent kernel, replayed from a graph).
``bytes`` is the weights read per step x 15 steps, so % of roofline is the HBM floor.

Batches: the issue's B in {1, 4, 16, 64} is the "full" preset (``python -m omni_fast.bench mtp --preset full``); the default
"quick" preset runs B = 1 and 16 only.
"""

from __future__ import annotations

import torch

from omni_fast.bench.case import Case, dtype_name
from omni_fast.bench.cases._compile import compiled

H, INTER, LAYERS, NQ, NKV, D, VOCAB, GROUPS, CODEC_VOCAB = 1024, 3072, 5, 16, 8, 128, 2048, 16, 3072
# Per preset: the code predictor's config (transformers' keyword names; the real one is the config class default
# but for the groups and RoPE, which _build sets), dtype and batches. "smoke": 1 layer of a tiny predictor, fp32.
REAL = dict(cfg={}, dtype=torch.bfloat16)
TINY = dict(cfg=dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, num_code_groups=4), dtype=torch.float32)
MODELS = {"quick": REAL, "full": REAL, "smoke": TINY}
BATCHES = {"quick": (1, 16), "full": (1, 4, 16, 64), "smoke": (1, 3)}


def _dims(cfg_kw: dict) -> tuple[int, ...]:
    """(hidden, intermediate, layers, q heads, kv heads, head_dim, vocab, groups) of a config's keywords."""
    c = cfg_kw
    return (c.get("hidden_size", H), c.get("intermediate_size", INTER), c.get("num_hidden_layers", LAYERS),
            c.get("num_attention_heads", NQ), c.get("num_key_value_heads", NKV), c.get("head_dim", D),
            c.get("vocab_size", VOCAB), c.get("num_code_groups", GROUPS))


def _step_params(cfg_kw: dict | None = None) -> int:
    h, inter, layers, nq, nkv, d, vocab, _ = _dims(cfg_kw or {})
    per_layer = (nq + 2 * nkv) * d * h + h * nq * d + 3 * inter * h
    return layers * per_layer + vocab * h  # + one lm_head per step


def _build(device, dtype=torch.bfloat16, cfg_kw=None):
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTalkerCodePredictorConfig

    kw = dict(num_code_groups=GROUPS, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    kw.update(cfg_kw or {})
    cfg = Qwen3OmniMoeTalkerCodePredictorConfig(**kw)
    torch.manual_seed(0)
    with torch.device(device):
        m = q3.Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration(cfg).to(dtype).eval()
        emb = torch.nn.Embedding(kw.get("vocab_size", VOCAB) + 1024, cfg.hidden_size).to(dtype)
    return m, emb


def _setup(B: int, model: dict = REAL):
    hidden, *_, vocab, groups = _dims(model["cfg"])

    def setup(device: torch.device):
        from omni_fast.models import CodePredictor

        m, emb = _build(device, model["dtype"], model["cfg"])
        cp = CodePredictor.from_transformers(m, emb)
        cp_persistent = CodePredictor.from_transformers(m, emb, persistent=True)  # issue 16: one launch per frame
        h = torch.randn(B, hidden, device=device, dtype=model["dtype"])
        c0 = torch.randint(0, vocab, (B,), device=device)
        seed = torch.tensor([1234], device=device)
        sampling = (True, 50, 0.8, 1.0)

        @torch.no_grad()
        def hf():
            last = emb(c0[:, None])
            r = m.generate(inputs_embeds=torch.cat((h[:, None], last), 1), max_new_tokens=groups - 1, do_sample=True,
                           top_k=50, top_p=0.8, output_hidden_states=True, return_dict_in_generate=True)
            mids = [hid[0] for hid in r.hidden_states[1:]]
            tail = m.get_input_embeddings()[-1](r.sequences[..., -1:])
            return torch.cat([last] + mids + [tail], 1).sum(1)

        @torch.no_grad()
        def eager():
            return cp.frame(h, c0, None, seed, sampling, "reference")

        compiled_frame = compiled(lambda: cp.frame(h, c0, None, seed, sampling, "reference"), device,
                                  mode="reduce-overhead", dynamic=None)

        def graph(fused: bool, model=cp):
            @torch.no_grad()
            def run():
                return model.predict_frame(h, c0, top_k=50, top_p=0.8, seed=seed, use_graph=True, backend="triton",
                                           fused=fused)

            return run

        # On a CPU the graph providers run predict_frame's CUDA-graph path emulated (same code, no capture).
        return {"transformers": hf, "eager": eager, "compile": compiled_frame, "omni_fast": graph(True),
                "omni_fast_unfused": graph(False), "persistent": graph(True, cp_persistent)}

    return setup


def _check():
    """Tiny config on the CPU: the Triton frame (fused and unfused layers) draws exactly the reference frame's codes
    (greedy and sampled)."""
    from omni_fast.models import CodePredictor

    small = dict(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, num_code_groups=4)
    m, emb = _build("cpu", torch.float32, small)
    cp = CodePredictor.from_transformers(m, emb)
    cp_persistent = CodePredictor.from_transformers(m, emb, persistent=True)
    h = torch.randn(2, 64)
    c0 = torch.randint(0, 32, (2,))
    for kw in (dict(do_sample=False), dict(top_k=8, top_p=0.8, seed=3)):
        a = cp.predict_frame(h, c0, backend="reference", **kw)
        for fused in (True, False):
            b = cp.predict_frame(h, c0, backend="triton", use_graph=False, fused=fused, **kw)
            if not torch.equal(a[0], b[0]):
                raise AssertionError(f"mtp: triton codes {b[0].tolist()} != reference {a[0].tolist()} ({kw}, "
                                     f"fused={fused})")
            torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-5)
        fused = cp.predict_frame(h, c0, backend="triton", use_graph=False, **kw)
        one = cp_persistent.predict_frame(h, c0, backend="triton", use_graph=False, **kw)
        if not (torch.equal(fused[0], one[0]) and torch.equal(fused[1], one[1])):
            raise AssertionError(f"mtp: the persistent frame differs from the fused one ({kw})")


def cases(preset: str) -> list[Case]:
    """The benchmark cases of one MTP frame per batch B of ``preset`` (bf16 real shapes; smoke: fp32, tiny); ``units``:
    frames."""
    model, batches = MODELS[preset], BATCHES[preset]
    step = _step_params(model["cfg"])
    hidden, _, layers, *_, groups = _dims(model["cfg"])
    elem = float(model["dtype"].itemsize)
    out = []
    for B in batches:
        out.append(Case(
            op="mtp", name=f"frame B={B}", params=dict(B=B, layers=layers, hidden=hidden, groups=groups,
                                                       dtype=dtype_name(model["dtype"])),
            setup=_setup(B, model),
            flops=2.0 * step * B * (groups - 1),
            bytes=elem * step * (groups - 1),
            bound="memory",
            check=_check if B == batches[0] else None,
            tags=("decode",),
            units={"frame": B},  # ms per frame (one frame per stream per call)
        ))
    return out
