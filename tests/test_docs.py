"""The documentation against the code: what a new user copies from README.md and docs/ must run or exist.

- README.md's and docs/pipeline.md's Python snippets run (tiny shapes / the tiny random model, CPU, reference
  backend: the API they call is what is checked, the kernels have their own tests);
- BENCHMARKS.md's cost-model section is exactly what ``python -m omni_fast.bench.model --markdown`` makes of the
  committed ``bench/results/model/model.json`` (regenerate with ``--saved-only --update-benchmarks``);
- every fast path of :mod:`omni_fast.fast_paths` is in README.md with its environment variable, and every
  ``OMNI_FAST_*`` variable the docs name exists in the code;
- every repository path and relative link the docs give exists;
- docs/compat.md's signature tables are the compat functions' signatures (names, order, defaults, keyword-only).
"""

from __future__ import annotations

import ast
import enum
import inspect
import re
from pathlib import Path

import pytest
import torch

import omni_fast

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH_ROOTS = ("omni_fast/", "kernels/", "reference/", "bench/", "tests/", "scripts/", "docs/", ".ci/")


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_readme_snippet_runs():
    """README's ops example on CPU tensors; the names it leaves to the reader are bound to tiny tensors."""
    block = _python_blocks(ROOT / "README.md")[0].replace('device="cuda"', 'device="cpu"')
    T, E, H, inter = 1024, 128, 64, 32
    env = dict(q_norm_w=torch.rand(128) + 0.5, k_norm_w=torch.rand(128) + 0.5, router_logits=torch.randn(T, E),
               x=torch.randn(T, H), w13=torch.randn(E, 2 * inter, H) * 0.1, w2=torch.randn(E, H, inter) * 0.1,
               v=torch.randn(T, 4, 128, dtype=torch.bfloat16), max_len=600,
               cu_seqlens=torch.tensor([0, 600, T], dtype=torch.int32))
    with omni_fast.use_backend("reference"):
        exec(compile(block, "README.md", "exec"), env)  # noqa: S102 - the documented snippet itself
    assert env["weights"].dtype == torch.float32 and env["weights"].shape == (T, 8)
    assert env["ids"].dtype == torch.int32 and env["ids"].shape == (T, 8)
    assert env["y"].shape == (T, H) and env["out"].shape == (T, 32, 128)


def test_pipeline_snippet_runs():
    """docs/pipeline.md's ``Qwen3Omni.stream`` example on the tiny random model (no checkpoint), few tokens."""
    block = next(b for b in _python_blocks(ROOT / "docs" / "pipeline.md") if "Qwen3Omni" in b)
    block = re.sub(r'Qwen3Omni\.from_pretrained\("[^"]*"\)', 'Qwen3Omni.random("tiny")', block)
    block = block.replace("max_new_tokens=64", "max_new_tokens=2, talker_max_new_tokens=3")
    played: list = []
    with omni_fast.use_backend("reference"):
        exec(compile(block, "docs/pipeline.md", "exec"),  # noqa: S102
             dict(wave16k=torch.randn(8000) * 0.1, play=played.append, print=lambda *a: None))
    assert played and all(a.dim() == 1 and a.dtype == torch.float32 for a in played)


def test_benchmarks_cost_model_section_matches_model_json():
    import json

    from omni_fast.bench import model

    rows = json.loads((ROOT / "bench" / "results" / "model" / "model.json").read_text())["units"]
    assert model.markdown(rows) in (ROOT / "BENCHMARKS.md").read_text(), (
        "BENCHMARKS.md's cost-model section differs from model.json: "
        "python -m omni_fast.bench.model --saved-only --update-benchmarks")


def test_fast_paths_and_environment_variables_are_documented():
    readme = (ROOT / "README.md").read_text()
    for p in omni_fast.fast_paths.PATHS:
        assert f"`{p.name}`" in readme and f"{p.env}=1" in readme, p.name
    # whole names in the library's code (not a prefix of a longer name, not one only a test sets)
    code = set(re.findall(r"OMNI_FAST_[A-Z0-9_]+", "\n".join(
        f.read_text(errors="replace") for d in ("omni_fast", "kernels", "bench", "scripts")
        for f in (ROOT / d).rglob("*") if f.suffix in (".py", ".sh") and f.is_file())))
    for doc in DOCS:
        for var in set(re.findall(r"OMNI_FAST_[A-Z0-9_]+", doc.read_text())):
            assert var in code, f"{doc.name} names {var}, which no code reads"


def test_documented_paths_and_links_exist():
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for code in re.findall(r"`([^`\n]+)`", text):
            m = re.fullmatch(r"([\w./-]+?)(?:::[\w\[\]{}, .-]+)?", code)
            path = m and m.group(1)
            if path and path.startswith(PATH_ROOTS) and not any(c in path for c in "*<") \
                    and not (ROOT / path).exists():
                missing.append(f"{doc.name}: `{code}`")
        for link in re.findall(r"\]\(([\w./-]+)(?:#[^)]*)?\)", text):  # file links (not math like `x[i](c_{g})`)
            if not link.startswith("http") and not (doc.parent / link).exists():
                missing.append(f"{doc.name}: link {link}")
    assert not missing, missing


def _split_top_level(inner: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in inner:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + ([cur.strip()] if cur.strip() else [])


def _check_signature(doc_sig: str, fn) -> list[str]:
    """Differences between a documented ``name(a, b=1, *, c=None)`` and ``fn``'s signature (``...`` = partial)."""
    real = {p.name: p for p in inspect.signature(fn).parameters.values()}
    parts = _split_top_level(doc_sig[doc_sig.index("(") + 1:doc_sig.rindex(")")])
    partial, kw_only, names, problems = "..." in parts, False, [], []
    for part in parts:
        if part in ("*", "..."):
            kw_only |= part == "*"
            continue
        name, _, default = (s.strip() for s in part.partition("="))
        names.append(name)
        p = real.get(name)
        if p is None:
            problems.append(f"{name}: not a parameter")
            continue
        if default:
            try:
                ok = ast.literal_eval(default) == p.default
            except ValueError:  # e.g. torch.bfloat16, or an enum member as MoEActivation.SILU
                ok = default == f"torch.{p.default}".replace("torch.torch.", "torch.") or (
                    isinstance(p.default, enum.Enum) and default == f"{type(p.default).__name__}.{p.default.name}")
            if not ok:
                problems.append(f"{name}: documented default {default}, code {p.default!r}")
        elif p.default is not inspect.Parameter.empty and not partial:
            problems.append(f"{name}: documented without a default, code {p.default!r}")
        if not partial and kw_only != (p.kind is inspect.Parameter.KEYWORD_ONLY):
            problems.append(f"{name}: keyword-only {kw_only} documented, code {p.kind}")
    order = [n for n in real if real[n].kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
    if not partial and names != order:
        problems.append(f"parameters {names}, code {order}")
    return problems


def test_compat_tables_are_the_signatures():
    """Every ``name(...)`` in the first column of docs/compat.md's tables, against the module of its section."""
    from omni_fast.compat import flash_attn, vllm, vllm_config, vllm_flash_attn

    sections = {"## FlashAttention-2": flash_attn, "## vLLM's FlashAttention fork": vllm_flash_attn,
                "## vLLM fused MoE": vllm, "| name (vLLM's signature)": vllm_config, "| native (": omni_fast.ops}
    module, checked, problems = None, 0, []
    for i, line in enumerate((ROOT / "docs" / "compat.md").read_text().splitlines(), 1):
        module = next((m for head, m in sections.items() if line.startswith(head)), module)
        if module is None or not line.startswith("| `"):
            continue
        for sig in re.findall(r"`([\w.]+\([^`]*\))`", line.split("|")[1]):
            fn = module
            for attr in sig[:sig.index("(")].split("."):
                fn = getattr(fn, attr, None)
            if fn is None:
                problems.append(f"compat.md:{i}: {sig[:50]} is not in {module.__name__}")
                continue
            checked += 1
            problems += [f"compat.md:{i}: {sig[:40]}...: {p}" for p in _check_signature(sig, fn)]
    assert checked >= 20 and not problems, problems


@pytest.mark.parametrize("doc_sig, ok", [("route_topk(router_logits, top_k, renormalize=True, *, backend=None)", True),
                                         ("route_topk(router_logits, top_k, renormalize=False, *, backend=None)", False),
                                         ("route_topk(router_logits, top_k, *, renormalize=True, backend=None)", False),
                                         ("route_topk(router_logits, top_k)", False),
                                         ("route_topk(router_logits, ...)", True)])
def test_signature_checker_catches_drift(doc_sig, ok):
    assert (not _check_signature(doc_sig, omni_fast.ops.route_topk)) == ok


def test_first_light_test_count_is_the_list():
    """BENCHMARKS.md's first-light table gives the number of tests in tests/gpu_first_light.txt (it said 56 while
    the list held 57)."""
    ids = [s for s in (ROOT / "tests" / "gpu_first_light.txt").read_text().splitlines()
           if s.strip() and not s.lstrip().startswith("#")]
    row = next(line for line in (ROOT / "BENCHMARKS.md").read_text().splitlines() if line.startswith("| 03_tests |"))
    assert f"({len(ids)} tests)" in row, (len(ids), row)
