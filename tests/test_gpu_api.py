"""The Triton and torch APIs that only CUDA code paths touch, checked on the installed versions from a CPU.

CI runs these with the venv's Triton and torch; ``scripts/test_compat.sh`` runs them again with the GPU image's
Triton (3.6), so a launch keyword, compiled-kernel field or signature the GPU paths rely on and a pinned version
lacks fails here instead of in a lent GPU session. (torch 2.11, the image's, was checked by reading its sources:
see BENCHMARKS.md, "GPU-only APIs against the image's versions".)
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import types

import pytest
import torch
import triton

from omni_fast.models.persistent import co_resident_grid

# --- Triton --------------------------------------------------------------------------------------------------------


def test_launch_options_the_gpu_paths_pass_exist():
    """``pdl_meta`` adds ``launch_pdl=True`` on sm_90 (an unknown launch keyword is a KeyError in Triton's
    binder); ``pdl_enter`` emits ``gdc_wait`` / ``gdc_launch_dependents``."""
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra import cuda

    assert {"launch_pdl", "num_warps", "num_stages"} <= set(CUDAOptions.__dataclass_fields__)
    assert callable(cuda.gdc_wait) and callable(cuda.gdc_launch_dependents)


def test_compiled_kernel_sets_the_register_count_when_it_loads():
    """``co_resident_grid`` reads ``CompiledKernel.n_regs`` of the kernel a launch returned: Triton sets it when the
    binary is loaded (``_init_handles``, run by the launch through the ``run`` property)."""
    from triton.compiler.compiler import CompiledKernel

    assert "self.n_regs" in inspect.getsource(CompiledKernel._init_handles)
    assert "_init_handles" in inspect.getsource(inspect.getattr_static(CompiledKernel, "run").fget)


_COMPILE = """
import json, triton, triton.language as tl
from triton.backends.compiler import GPUTarget

@triton.jit
def k(x, y, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y + i, tl.load(x + i) * 2)

src = triton.compiler.ASTSource(fn=k, signature={"x": "*fp32", "y": "*fp32", "N": "constexpr"}, constexprs={"N": 64},
                                attrs={(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]})
c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
print(json.dumps({"num_warps": c.metadata.num_warps, "shared": c.metadata.shared, "ptx": "ptx" in c.asm,
                  "version": triton.__version__}))
"""


def test_compiled_kernel_metadata_fields(tmp_path):
    """The fields the persistent frame (``co_resident_grid``) and the static checks read: ``metadata.num_warps``,
    ``metadata.shared``, ``asm["ptx"]``; compiled for sm_90 on the CPU (no interpreter, as the static check)."""
    script = tmp_path / "compile_one.py"  # (triton.jit needs its function's source file)
    script.write_text(_COMPILE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    facts = json.loads(res.stdout.strip().splitlines()[-1])
    assert facts["version"] == triton.__version__  # the same Triton as this process (test_compat.sh's PYTHONPATH)
    assert facts["num_warps"] == 4 and isinstance(facts["shared"], int) and facts["ptx"]


def test_host_side_apis_the_gpu_paths_call():
    """``triton.testing.do_bench(fn, warmup=, rep=)`` (bench/tune_moe.py), ``triton.autotune(configs=, key=)``
    (kernels/launch.py), ``TensorDescriptor(base, shape, strides, block_shape)`` (kernels/tma.py)."""
    import triton.testing
    from triton.tools.tensor_descriptor import TensorDescriptor

    assert {"warmup", "rep"} <= set(inspect.signature(triton.testing.do_bench).parameters)
    assert {"configs", "key"} <= set(inspect.signature(triton.autotune).parameters)
    assert {"num_warps", "num_stages"} <= set(inspect.signature(triton.Config).parameters)
    assert list(inspect.signature(TensorDescriptor).parameters)[:4] == ["base", "shape", "strides", "block_shape"]


# --- torch ---------------------------------------------------------------------------------------------------------


def test_torch_cuda_apis_the_gpu_paths_call():
    """Graph capture (models/cuda_graphs.py, dit_solve.py, code2wav.py), events, stream checks and the custom-op
    registration (ops/_dispatch.py): present with the keywords passed."""
    graph_params = inspect.signature(torch.cuda.graph.__init__).parameters
    assert {"pool", "capture_error_mode"} <= set(graph_params)
    for name in ("CUDAGraph", "graph_pool_handle", "is_current_stream_capturing", "set_sync_debug_mode",
                 "mem_get_info", "get_device_capability", "get_device_properties", "Stream", "stream"):
        assert callable(getattr(torch.cuda, name)), name
    assert "enable_timing" in inspect.signature(torch.cuda.Event.__new__).parameters
    assert "mutates_args" in inspect.signature(torch.library.custom_op).parameters
    assert callable(torch.compiler.is_compiling) and callable(torch._debug_has_internal_overlap)


# --- the persistent frame's grid -------------------------------------------------------------------------------------


@pytest.fixture
def h100(monkeypatch):
    props = types.SimpleNamespace(multi_processor_count=132, regs_per_multiprocessor=65536,
                                  max_threads_per_multi_processor=2048, shared_memory_per_multiprocessor=233472)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)


def _frame(compiled):
    return types.SimpleNamespace(_compiled=compiled, schedule=types.SimpleNamespace(items=range(100_000)))


def test_co_resident_grid_from_the_compiled_kernel(h100):
    full = types.SimpleNamespace(n_regs=255, metadata=types.SimpleNamespace(num_warps=4, shared=0))
    assert co_resident_grid(_frame(full), "cuda") == 132 * 2  # 255 registers x 128 threads: 2 programs per SM
    assert co_resident_grid(_frame(None), "cuda") == 132  # before the first launch: one program per SM


def test_co_resident_grid_without_a_register_count_is_one_program_per_sm(h100):
    """A compiled kernel whose register count is unknown (not loaded yet, or a Triton that moved the field) keeps
    one program per SM; taken as 1 register the thread limit alone gave 16 programs per SM, which a 255-register
    kernel cannot have resident: the spin-waiting grid would deadlock."""
    meta = types.SimpleNamespace(num_warps=4, shared=0)
    for compiled in (types.SimpleNamespace(metadata=meta), types.SimpleNamespace(n_regs=None, metadata=meta),
                     types.SimpleNamespace(n_regs=0, metadata=meta), types.SimpleNamespace(n_regs=255)):
        assert co_resident_grid(_frame(compiled), "cuda") == 132
