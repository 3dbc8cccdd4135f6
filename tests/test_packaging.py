"""Packaging and ecosystem: the layout shadows no other distribution, the wheel ships everything the code reads,
``import omni_fast`` stays light, and the supported transformers range is enforced."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("kernels", "reference", "bench")


def _run(code: str, cwd=ROOT, **env):
    full = dict(os.environ, **env)
    full.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("folder", SOURCE_FOLDERS)
def test_source_folders_are_not_top_level_packages(folder):
    # a regular package named kernels/reference/bench at the root would shadow PyPI's for anything run from here
    assert (ROOT / folder).is_dir()
    assert not (ROOT / folder / "__init__.py").exists()
    assert (ROOT / "omni_fast" / folder / "__init__.py").exists()


def test_hf_kernels_package_imports_from_the_repository_root():
    pytest.importorskip("kernels")  # Hugging Face's, a transformers dependency since 5.24
    res = _run("import kernels, transformers.integrations.hub_kernels as h; print(kernels.__file__)")
    assert res.returncode == 0, res.stderr[-2000:]
    assert str(ROOT / "kernels") not in res.stdout


def test_subpackages_resolve_to_the_source_folders():
    import omni_fast.bench.harness
    import omni_fast.kernels.launch
    import omni_fast.reference.moe

    assert Path(omni_fast.kernels.launch.__file__).parent == ROOT / "kernels"
    assert Path(omni_fast.reference.moe.__file__).parent == ROOT / "reference"
    assert Path(omni_fast.bench.harness.__file__).parent == ROOT / "bench"


def test_import_does_not_import_dynamo():
    res = _run("import sys, omni_fast; print('torch._dynamo' in sys.modules)")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "False"


def test_context_backend_is_a_dynamo_constant():
    # omni_fast.backend sets the attribute torch.compiler.assume_constant_result sets, without importing dynamo
    from omni_fast import backend

    def probe():
        return None

    torch.compiler.assume_constant_result(probe)
    marks = {k: v for k, v in vars(probe).items()}
    assert marks == {backend.DYNAMO_CONSTANT_ATTR: True}
    assert getattr(backend._context_backend, backend.DYNAMO_CONSTANT_ATTR) is True


def test_use_backend_under_torch_compile_has_no_graph_break():
    import omni_fast
    from omni_fast.backend import requested_backend

    def f(x):
        return x + (1 if requested_backend() == "reference" else 2)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    with omni_fast.use_backend("reference"):
        assert compiled(torch.zeros(2)).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("version,ok", [("5.16.2", False), ("4.57.1", False), ("5.17.0", True), ("5.25.0", True),
                                        ("6.0.0.dev0", True)])
def test_transformers_floor(version, ok):
    from omni_fast.integrations.hf_compat import check_transformers_version

    if ok:
        check_transformers_version(version)
    else:
        with pytest.raises(RuntimeError, match=rf"transformers >= 5\.17.*transformers {version} is installed"):
            check_transformers_version(version)


def test_patch_refuses_an_old_transformers(monkeypatch):
    transformers = pytest.importorskip("transformers")
    import omni_fast

    monkeypatch.setattr(transformers, "__version__", "5.10.0")
    with pytest.raises(RuntimeError, match="5.10.0 is installed"):
        omni_fast.patch(torch.nn.Linear(2, 2))


def test_cache_keyword_matches_installed_transformers():
    transformers = pytest.importorskip("transformers")
    from omni_fast.integrations.hf_compat import _release, cache_keyword

    expected = "cache" if _release(transformers.__version__)[:2] >= (5, 24) else "past_key_values"
    assert cache_keyword() == expected


def test_version_single_sourced():
    import omni_fast
    from omni_fast._version import __version__

    assert omni_fast.__version__ == __version__
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and "omni_fast._version.__version__" in text


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    import shutil

    shutil.rmtree(ROOT / ".pybuild", ignore_errors=True)  # setuptools' scratch folder: no stale modules
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and "No module named" in res.stderr and "setuptools" in res.stderr:
        pytest.skip("no setuptools in this environment to build the wheel")
    assert res.returncode == 0, res.stderr[-3000:]
    (path,) = out.glob("omni_fast-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_ships_sources_data_and_metadata(wheel):
    names = set(wheel.namelist())
    for folder in SOURCE_FOLDERS:
        for src in (ROOT / folder).glob("*.py"):
            assert f"omni_fast/{folder}/{src.name}" in names, src
    for src in (ROOT / "kernels" / "cuda").iterdir():
        assert f"omni_fast/kernels/cuda/{src.name}" in names, src
    for src in (ROOT / "omni_fast" / "configs").rglob("*"):
        if src.is_file():
            assert f"omni_fast/{src.relative_to(ROOT / 'omni_fast').as_posix()}" in names, src
    assert "omni_fast/py.typed" in names and "omni_fast/bench/cases/moe.py" in names
    top = {n.split("/")[0] for n in names}
    assert top == {"omni_fast", next(n for n in top if n.endswith(".dist-info"))}  # nothing else at the top
    meta = next(n for n in names if n.endswith("dist-info/METADATA"))
    text = wheel.read(meta).decode()
    for field in ("License-Expression: MIT", "Requires-Python: >=3.10", "Project-URL:", "Classifier:",
                  "Provides-Extra: cuda", "Requires-Dist: cupy-cuda13x; extra == \"cuda\""):
        assert field in text, field
    assert any(n.endswith("licenses/LICENSE") for n in names)


def test_selftest_help_prints_usage_without_running(capsys, monkeypatch):
    """``python -m omni_fast.selftest --help`` ran every check (it took no arguments at all)."""
    from omni_fast import selftest

    monkeypatch.setattr(selftest, "_cases", lambda *a: pytest.fail("the checks ran"))
    with pytest.raises(SystemExit) as exc:
        selftest.main(["--help"])
    assert exc.value.code == 0 and "usage: python -m omni_fast.selftest" in capsys.readouterr().out
