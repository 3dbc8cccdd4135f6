"""The layering of docs/ARCHITECTURE.md: the low-level code (``kernels/``, ``reference/``, ``omni_fast/ops/``, the
device and cache-memory helpers) never imports the model layer (``omni_fast.models``, ``pipeline``, ``patch``,
``integrations``), neither at module top nor inside a function. Before, the kernels' and ops' caches imported their
memory helpers lazily from ``models/cuda_graphs`` (tile counters, suppress ranges, rvq table offsets, the zero
offset)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOW = ("kernels", "reference", "omni_fast/ops", "omni_fast/_device.py", "omni_fast/_cache_memory.py",
       "omni_fast/validation.py", "omni_fast/backend.py")
HIGH = ("models", "pipeline", "patch", "integrations")


def _imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, nested ones included; relative ones as written (``..models``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            out += [(node.lineno, name) for name in ([base] if node.module else [base + a.name for a in node.names])]
    return out


def _is_high(module: str) -> bool:
    """Whether ``module`` (absolute, or relative from a module one level below ``omni_fast``) is of the model layer."""
    if module.startswith("omni_fast."):
        rest = module.removeprefix("omni_fast.")
    elif module.startswith("."):
        rest = module.lstrip(".")
    else:
        return False  # (another distribution: torch, triton)
    return rest.split(".")[0] in HIGH


def test_low_level_code_never_imports_the_model_layer():
    files = [p for entry in LOW for p in ((ROOT / entry).rglob("*.py") if (ROOT / entry).is_dir() else [ROOT / entry])]
    assert len(files) > 20
    bad = [f"{p.relative_to(ROOT)}:{line}: {module}"
           for p in files for line, module in _imported(p) if _is_high(module)]
    assert not bad, bad


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from ..models.cuda_graphs import record_use\n    from .. import pipeline\n"
                   "import omni_fast.patch\nfrom ..kernels import launch\nimport models\n")
    high = sorted(m for _, m in _imported(src) if _is_high(m))
    assert high == ["..models.cuda_graphs", "..pipeline", "omni_fast.patch"]
