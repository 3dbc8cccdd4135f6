"""The project's size rule (small modules): no source file over 600 lines, no function over 80 code lines.

Counted with ``ast`` over every ``.py`` file under ``omni_fast/``, ``kernels/``, ``reference/`` and ``bench/``: a
file's lines as the editor shows them; a function's lines from ``def`` to its last line, less its docstring (the
docstrings of public ops carry the shapes and semantics and may be long). ``@triton.jit`` functions are exempt:
splitting a kernel into jit helpers must keep its sm_90a facts (registers, spills, shared memory), which only the
static check can tell, so a kernel stays long where a split would change them (each says why in a comment).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("omni_fast", "kernels", "reference", "bench")
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80

# Files / functions allowed past the limits, each with the reason; keep this empty where possible.
# "path" for a file, "path::function" (the qualified name, Class.method) for a function.
ALLOWED: dict[str, str] = {}


def _sources():
    for folder in FOLDERS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _is_jit(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(ast.unparse(d).split("(")[0].endswith("jit") for d in fn.decorator_list)


def _code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    lines = fn.end_lineno - fn.lineno + 1
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def _violations() -> list[str]:
    out = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        n = len(text.splitlines())
        if n > MAX_FILE_LINES and rel not in ALLOWED:
            out.append(f"{rel}: {n} lines (> {MAX_FILE_LINES})")
        for name, fn in _functions(ast.parse(text, filename=rel)):
            lines = _code_lines(fn)
            if lines > MAX_FUNCTION_LINES and not _is_jit(fn) and f"{rel}::{name}" not in ALLOWED:
                out.append(f"{rel}::{name}: {lines} code lines (> {MAX_FUNCTION_LINES})")
    return out


def test_no_file_or_function_over_the_size_limits():
    bad = _violations()
    assert not bad, "split these (or add them to ALLOWED with a reason):\n  " + "\n  ".join(bad)


def test_allow_list_entries_still_exist_and_still_need_it():
    """A stale entry (the file or function is gone or now fits) is removed, so the list only shrinks."""
    stale = []
    for key in ALLOWED:
        rel, _, name = key.partition("::")
        path = ROOT / rel
        if not path.is_file():
            stale.append(key)
            continue
        text = path.read_text()
        if not name:
            if len(text.splitlines()) <= MAX_FILE_LINES:
                stale.append(key)
            continue
        fns = dict(_functions(ast.parse(text)))
        if name not in fns or _code_lines(fns[name]) <= MAX_FUNCTION_LINES:
            stale.append(key)
    assert not stale, f"remove these from ALLOWED: {stale}"


def test_the_counter_sees_docstrings_and_jit_kernels():
    src = ('@triton.jit\ndef k(x):\n    pass\n\n\ndef f():\n    """Doc\n\n    more.\n    """\n    return 1\n')
    fns = dict(_functions(ast.parse(src)))
    assert _is_jit(fns["k"]) and not _is_jit(fns["f"])
    assert _code_lines(fns["f"]) == 2  # def + return; the 4-line docstring is not counted
