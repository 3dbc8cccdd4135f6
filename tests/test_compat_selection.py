"""The compat part (scripts/test_compat.sh) re-runs the transformers-facing test files under the GPU image's older
transformers, minus the tests marked ``hf_free``: a kernel checked against omni-fast's own reference gives the same
result under any transformers, so running it twice only costs time. This keeps the mark honest: a marked test, its
fixtures and the module-level helpers they call (transitively) name nothing of transformers, nor an omni-fast module
that imports it, nor ``patch`` / ``from_pretrained``. Static (names in the code objects), so it also holds for tests
that only run on a GPU."""

import importlib
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# omni-fast's packages and modules that import transformers (grep "transformers" omni_fast/): a marked test names none
HF_MODULES = ("transformers", "omni_fast.patch", "omni_fast.integrations", "omni_fast.models", "omni_fast.pipeline",
              "omni_fast.bench", "omni_fast.__main__")
HF_ATTRS = {"patch", "unpatch", "from_pretrained", "integrations", "models", "pipeline", "bench", "transformers"}


def _compat_files():
    text = (ROOT / "scripts" / "test_compat.sh").read_text()
    return sorted({m.split("::")[0] for m in re.findall(r"tests/test_\w+\.py(?:::\w+)?", text)})


def _codes(code):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _names_hf(module, fn, seen):
    """The transformers-facing names ``fn`` (and the module-level functions it names, transitively) uses."""
    fn = getattr(fn, "_get_wrapped_function", lambda: fn)()  # a pytest fixture: the function it wraps
    fn = getattr(fn, "__wrapped__", fn)
    if not isinstance(fn, types.FunctionType) or fn in seen:
        return []
    seen.add(fn)
    bad = []
    for code in _codes(fn.__code__):
        for name in code.co_names:
            if name.startswith(HF_MODULES) or name in HF_ATTRS:
                bad.append(f"{fn.__name__}: {name}")
                continue
            value = module.__dict__.get(name)
            owner = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", "") or ""
            if owner.startswith(HF_MODULES):
                bad.append(f"{fn.__name__}: {name} ({owner})")
            elif getattr(value, "__module__", None) == module.__name__:
                bad += _names_hf(module, value, seen)
    return bad


def _marked(fn, module):
    marks = [*getattr(fn, "pytestmark", [])]
    module_marks = getattr(module, "pytestmark", [])  # one mark or a list
    marks += module_marks if isinstance(module_marks, list) else [module_marks]
    return any(m.name == "hf_free" for m in marks)


def test_compat_run_skips_the_hf_free_tests():
    text = (ROOT / "scripts" / "test_compat.sh").read_text()
    assert "-m 'not hf_free'" in text or '-m "not hf_free"' in text


def _violations(module):
    """{test name: the transformers-facing names it reaches} for the module's hf_free tests."""
    out = {}
    for name, fn in vars(module).items():
        if not (name.startswith("test") and isinstance(fn, types.FunctionType) and _marked(fn, module)):
            continue
        bad = _names_hf(module, fn, set())
        for fixture in fn.__code__.co_varnames[:fn.__code__.co_argcount]:  # the module's fixtures (conftest's
            bad += _names_hf(module, module.__dict__.get(fixture), set())  # are transformers-free)
        if bad:
            out[name] = bad
    return out


@pytest.mark.parametrize("path", _compat_files())
def test_hf_free_tests_name_nothing_of_transformers(path):
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "tests"))  # (pytest's rootdir insertion does this too)
    assert _violations(importlib.import_module(Path(path).stem)) == {}


def test_the_check_sees_transformers_through_helpers_and_fixtures():
    module = types.ModuleType("fake_test_module")
    exec(
        "import pytest\n"
        "from omni_fast.reference import attention as ref\n"
        "import omni_fast\n"
        "def _helper():\n    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni\n"
        "def _indirect():\n    return _helper()\n"
        "@pytest.fixture\ndef model():\n    return omni_fast.patch(None)\n"
        "@pytest.mark.hf_free\ndef test_helper():\n    _indirect()\n"
        "@pytest.mark.hf_free\ndef test_fixture(model):\n    pass\n"
        "@pytest.mark.hf_free\ndef test_clean():\n    ref.attention\n"
        "def test_unmarked():\n    _helper()\n", module.__dict__)
    got = _violations(module)
    assert set(got) == {"test_helper", "test_fixture"}
    assert any("transformers.models" in b for b in got["test_helper"])
    assert any("patch" in b for b in got["test_fixture"])
