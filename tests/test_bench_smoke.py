"""The benchmark's smoke preset: every case of every family built at tiny shapes on the CPU (Triton interpreter)
and every provider called once, so a provider bug (wrong keyword, CPU tensor on CUDA, a peer API change) shows here
and not in GPU time. A provider that cannot run on a CPU must say so (``Unavailable``: reported as skipped), never
raise. No timing is taken."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `bench` is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from omni_fast.bench import harness  # noqa: E402
from omni_fast.bench.case import Unavailable  # noqa: E402

FAMILIES = harness.case_modules()
# Providers that must run (not be skipped) on a CPU, per family: the omni-fast path and its eager baseline.
MUST_RUN = {"rope": {"omni_fast", "eager", "compile"}, "moe": {"omni_fast", "omni_fast_tma", "hf_eager"},
            "attention": {"omni_fast", "eager", "sdpa_math"}, "mtp": {"omni_fast", "eager", "transformers"},
            "code2wav": {"omni_fast", "transformers"}, "decode": {"eager", "transformers"},
            "pipeline": {"omni_fast", "eager", "transformers"}, "token2wav": {"omni_fast", "transformers"}}
# The compat part (scripts/test_compat.sh sets OMNI_FAST_COMPAT_PART=1: the GPU image's older transformers) calls, in
# these families, only the providers that run transformers' code: their others run omni-fast code alone on what the
# setup converted from transformers' modules (the setup still runs there: the conversion is what another transformers
# can break), the same under any transformers; the balance part (newest transformers) calls every provider. The
# families not listed run transformers' modules under omni-fast's providers too (token2wav's DiT, the pipeline's model).
COMPAT_PROVIDERS = {"mtp": ("transformers",), "code2wav": ("transformers", "transformers_chunked"),
                    "moe": ("hf_eager", "hf_grouped_mm", "hf_batched_mm")}


def test_every_family_has_a_smoke_preset():
    assert set(FAMILIES) == set(MUST_RUN), "a new bench family needs a MUST_RUN entry here"
    import importlib

    for fam in FAMILIES:
        module = importlib.import_module(f"omni_fast.bench.cases.{fam}")
        smoke, quick = module.cases("smoke"), module.cases("quick")
        assert len(smoke) == len(quick), fam  # the quick cases, at tiny shapes
        assert [c.op for c in smoke] == [c.op for c in quick]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run (on a GPU: python -m omni_fast.bench --preset smoke)")
@pytest.mark.parametrize("family", FAMILIES)
def test_smoke_preset_calls_every_provider(family):
    import importlib

    cases = importlib.import_module(f"omni_fast.bench.cases.{family}").cases("smoke")
    only = COMPAT_PROVIDERS.get(family, ()) if os.environ.get("OMNI_FAST_COMPAT_PART") == "1" else ()
    rows = harness.smoke(cases, torch.device("cpu"), providers=only)
    failed = [f"{r['case']} / {r['provider']}: {r['detail']}" for r in rows if r["status"] == "FAILED"]
    assert not failed, "\n".join(failed)
    for case in cases:
        ran = {r["provider"] for r in rows if r["case"] == case.name and r["status"] == "ok"}
        assert MUST_RUN[family] & ran == MUST_RUN[family] & {r["provider"] for r in rows if r["case"] == case.name}
        assert "omni_fast" in ran or family == "decode" or only, case.name  # decode's: a CUDA-graph replay
    assert set(only) <= {r["provider"] for r in rows}  # no stale names in COMPAT_PROVIDERS
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert all(r["detail"] for r in skipped)  # a skip says why


def test_the_compat_part_calls_the_transformers_providers_only():
    """scripts/test_compat.sh marks its run (COMPAT_PROVIDERS applies there only), and the names are providers."""
    assert "OMNI_FAST_COMPAT_PART=1" in (ROOT / "scripts" / "test_compat.sh").read_text()
    assert set(COMPAT_PROVIDERS) <= set(FAMILIES)


def test_smoke_reports_ok_skipped_and_failed(capsys):
    from omni_fast.bench.case import Case

    def setup(device):
        def broken():
            raise RuntimeError("wrong keyword")

        return {"ok": lambda: None, "gpu_only": Unavailable("needs CUDA"), "broken": broken}

    def bad_setup(device):
        raise ValueError("no such shape")

    cases = [Case(op="toy", name="toy", params={}, setup=setup), Case(op="toy", name="bad", params={}, setup=bad_setup)]
    assert harness.run_smoke(cases) == 1
    out = capsys.readouterr().out
    assert "toy" in out and "skipped  needs CUDA" in out
    rows = {(r["case"], r["provider"]): r for r in harness.smoke(cases, "cpu")}
    assert rows["toy", "ok"]["status"] == "ok" and rows["toy", "gpu_only"]["status"] == "skipped"
    assert rows["toy", "broken"]["status"] == "FAILED" and "RuntimeError: wrong keyword" in rows["toy", "broken"][
        "detail"] and "tests/test_bench_smoke.py:" in rows["toy", "broken"]["detail"]
    assert rows["bad", "(setup)"]["status"] == "FAILED" and "no such shape" in rows["bad", "(setup)"]["detail"]
    assert harness.run_smoke(cases[:1], providers=("ok", "gpu_only")) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU path of the CLI")
def test_smoke_cli():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "-m", "omni_fast.bench", "rope", "--preset", "smoke", "--providers", "omni_fast",
                          "omni_fast_cuda"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "Smoke run on cpu" in out and "FAILED" not in out.replace("0 FAILED", "")
    assert "thinker rope T=17" in out and "omni_fast_cuda" in out and "skipped" in out


def test_decode_smoke_byte_count_matches_the_tiny_config():
    """bench/cases/decode.py counts the smoke cases' bytes from TINY_SHAPES: they must be the tiny model's shapes."""
    from omni_fast.bench.cases import decode
    from omni_fast.models.presets import tiny_qwen3_omni_config

    cfg = tiny_qwen3_omni_config()
    for part, text in (("thinker", cfg.thinker_config.text_config), ("talker", cfg.talker_config.text_config)):
        want = (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
                text.head_dim, text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size,
                getattr(text, "shared_expert_intermediate_size", 0) if part == "talker" else 0, text.vocab_size)
        assert decode.TINY_SHAPES[part] == want, part


def test_sdpa_refusal_check_runs():
    """The SDPA backend pre-check the attention cases use on CUDA runs on this torch (its SDPAParams signature) and
    gives no verdict without a stated reason (a CPU-only torch refuses every CUDA backend silently)."""
    from torch.backends.cuda import SDPAParams

    from omni_fast.bench.cases.attention import sdpa_cuda_refusal

    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    SDPAParams(q, k, k, mask.float(), 0.0, False, True)  # the signature the check builds (torch >= 2.5)
    for name in ("flash", "efficient", "cudnn"):
        got = sdpa_cuda_refusal(name, q, k, k, mask, False, True)
        assert got is None or (isinstance(got, str) and got), name


def test_compile_providers_trace_only_in_smoke_runs(monkeypatch):
    """Timed CUDA runs compile with inductor (the caller's mode); a CPU, or the smoke run on any device, traces with
    aot_eager (no inductor code generation: seconds, not minutes)."""
    from omni_fast.bench.cases import _compile

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: kw)
    assert _compile.compiled(lambda: 1, "cuda", mode="reduce-overhead") == {"dynamic": False,
                                                                            "mode": "reduce-overhead"}
    assert _compile.compiled(lambda: 2, "cpu", mode="reduce-overhead") == {"dynamic": False, "backend": "aot_eager"}
    with _compile.tracing_only():
        assert _compile.compiled(lambda: 3, "cuda", dynamic=None) == {"dynamic": False, "backend": "aot_eager"}
    assert _compile.compiled(lambda: 4, "cuda", dynamic=None) == {"dynamic": None}
