"""Test helpers shared by the test suite and the benchmark's CPU correctness pass.

- :data:`DEVICE`: ``cuda`` when a GPU is present, else ``cpu`` (Triton then runs on the interpreter).
- :data:`KERNEL_DTYPES`: the dtypes kernels are checked in here. The interpreter's bf16 math is wrong, so on a
  CPU that is fp32 and fp16; on a GPU bf16 joins them.
- :func:`guarded_allocations`: tensors allocated inside a block get guard bytes before and after; writes out of
  bounds show up in ``violations()`` (memcheck for writes where no sanitizer runs).
- :func:`interpreter_loads`: every address a kernel's loads form on the interpreter, masked-off lanes included, to
  check a kernel that promises its gathers stay in bounds whatever the index values (reads have no guard bytes).
- :class:`HostSyncs`: counts, on any device, what a CUDA-graph capture of a block would fail on (host reads of
  device values; tensors made from host data), so the CPU suite can check a captured body before a GPU does.
- :func:`assert_matches_reference`: FlashAttention's rule. The kernel's error against an fp64 (or fp32) reference
  may be at most ``factor`` times the error of the reference run in the kernel's dtype, plus a small ``atol``
  for outputs whose reference error is zero.
"""

from __future__ import annotations

import contextlib

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16) if DEVICE.type == "cuda" else (torch.float32,
                                                                                             torch.float16)

# One unit in the last place at 1.0, per dtype: the floor for "the reference in this dtype was exact".
_ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}


def ulp(dtype: torch.dtype) -> float:
    """One unit in the last place at 1.0 for ``dtype`` (fp32, fp16, bf16 or fp64): e.g. 2**-7 for bf16."""
    return _ULP[dtype]


def assert_matches_reference(
    out: torch.Tensor,
    ref_exact: torch.Tensor,
    ref_same_dtype: torch.Tensor,
    *,
    factor: float = 2.0,
    atol: float | None = None,
    name: str = "output",
) -> None:
    """``max|out - exact| <= factor * max|ref_same_dtype - exact| + atol`` (all compared in fp64).

    ``ref_exact`` is the reference in fp64/fp32; ``ref_same_dtype`` the reference run in ``out``'s dtype.
    ``atol`` defaults to 2 ulp of ``out``'s dtype at the output's scale (covers exact-reference corner cases
    and the interpreter's truncating fp32 -> bf16 stores).
    """
    assert out.shape == ref_exact.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref_exact.shape)}"
    if out.numel() == 0:
        return
    o, e, r = out.double(), ref_exact.double(), ref_same_dtype.double()
    assert torch.isfinite(o).all() == torch.isfinite(e).all(), f"{name}: non-finite values differ from the reference"
    finite = torch.isfinite(e)
    err = (o - e)[finite].abs().max().item()
    ref_err = (r - e)[finite].abs().max().item()
    scale = max(e[finite].abs().max().item(), 1.0)
    if atol is None:
        atol = 2 * ulp(out.dtype) * scale
    bound = factor * ref_err + atol
    assert err <= bound, (
        f"{name}: max error {err:.3e} vs exact exceeds {factor} x reference-in-{out.dtype} error {ref_err:.3e} "
        f"+ atol {atol:.1e}"
    )


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``t`` filled with NaN (floats) or -7 (ints): unwritten outputs show up in checks."""
    if t.is_floating_point():
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, -7)


@torch.no_grad()
def randomize_(*modules: torch.nn.Module, std: float = 0.2) -> None:
    """Random weights for tiny test models, in place: every parameter ~ N(0, std), norm weights ~ 1 + N(0, std).
    transformers' init (std 0.02, norms at 1) is too small for a tiny model to route and attend non-trivially.
    Draws from torch's global generator (seed it first)."""
    for m in modules:
        for name, p in m.named_parameters():
            p.normal_(0, std)
            if "norm" in name:
                p.add_(1.0)


def seeded_weights_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Random weights for a tiny transformers model from a seeded generator (every parameter but the norms
    ~ N(0, scale), norms left at their init), in eval mode: the same model whatever ran before. Returns it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def run_unpatched_then_patched(model: torch.nn.Module, run, **patch_kwargs):
    """``run()`` on ``model`` as it is, then under ``omni_fast.patch(model, **patch_kwargs)`` (unpatched again
    afterwards, whatever happens); returns ``(unpatched result, patched result, PatchReport)``."""
    import omni_fast

    want = run()
    report = omni_fast.patch(model, **patch_kwargs)
    try:
        got = run()
    finally:
        omni_fast.unpatch(model)
    return want, got, report


def assert_graph_replay_matches(run) -> None:
    """Run ``run()`` eagerly, capture it in a CUDA graph, replay, and assert the replayed output equals the eager one
    (the check every "captures in a CUDA graph" test makes; CUDA only)."""
    eager = run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    torch.testing.assert_close(out, eager)


# --- value checks as on CUDA ------------------------------------------------------------------------------------
@contextlib.contextmanager
def cuda_like_value_checks():
    """Inside: the ops' data-dependent input checks (a kernel + a host sync; run only on CPU tensors, see
    :func:`omni_fast.validation.values_checkable`) behave as on CUDA tensors: skipped unless a call passes
    ``check_values=True``. For what runs on a GPU without checks: the cost model's traces, :class:`HostSyncs`
    checks of CUDA-graph bodies on the CPU."""
    import sys

    from . import validation

    original = validation.values_checkable
    patched = [m for name, m in list(sys.modules.items())
               if name.startswith("omni_fast") and getattr(m, "values_checkable", None) is original]
    for m in patched:
        m.values_checkable = _cuda_values_checkable
    try:
        yield
    finally:
        for m in patched:
            m.values_checkable = original


def _cuda_values_checkable(t, check_values=None) -> bool:
    return bool(check_values)


# --- host syncs: what a CUDA-graph capture forbids, seen on the CPU -------------------------------------------------
# Ops whose output size (or result) is a device value: the host waits for it. masked_select / unique / bincount
# size their output from the data; boolean-mask indexing (``x[mask]``) and ``repeat_interleave`` without
# ``output_size`` are listed by host_sync_name (their other forms do not sync).
HOST_SYNC_OPS = frozenset({"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "allclose", "masked_select",
                           "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount"})


def host_sync_name(name: str, overload: str, args, kwargs) -> str | None:
    """The name HostSyncs counts an ATen call under, or None: a :data:`HOST_SYNC_OPS` op, ``index`` with a bool /
    uint8 index tensor (``x[mask]``: a nonzero inside) or ``repeat_interleave(repeats_tensor)`` with no
    ``output_size`` (the output length is ``repeats.sum()``)."""
    if name in HOST_SYNC_OPS:
        return name
    if name == "index" and len(args) > 1:
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ()):
            return "index (bool mask)"
    if name == "repeat_interleave" and "Tensor" in overload and kwargs.get("output_size") is None:
        return "repeat_interleave (no output_size)"
    return None


class HostSyncs:
    """``with HostSyncs() as s: ...``: ``s.count`` (a Counter by ATen op name) of the ops inside the block that read
    device values on the host (:data:`HOST_SYNC_OPS`: ``.item()``, ``int(t)``, ``bool(t)``, ``nonzero``,
    ``torch.equal``, ops whose output size is data (``x[mask]``, ``masked_select``, ``unique``, ``bincount``,
    ``repeat_interleave`` without ``output_size``): a stream sync on CUDA, an error inside a capture) and, with ``host_data=True``, of
    ``lift_fresh`` (a tensor made from host data, ``torch.tensor(...)``: a host-to-device copy on CUDA, which waits
    for the stream and so fails a capture too); ``s.where`` holds the first stack of each. Runs on any device (a
    ``TorchDispatchMode``): the CPU suite checks a CUDA-graph body with it. Not seen: ``.tolist()`` / ``.cpu()`` of a
    CPU tensor (no ATen op runs); the GPU tests' ``torch.cuda.set_sync_debug_mode("error")`` sees those."""

    def __init__(self, host_data: bool = False):
        from collections import Counter

        self.ops = HOST_SYNC_OPS | ({"lift_fresh"} if host_data else set())
        self.count: Counter = Counter()
        self.where: dict[str, str] = {}
        self._mode = None

    def __enter__(self) -> "HostSyncs":
        import traceback

        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func._schema.name.split("::")[-1]
                name = name if name in outer.ops else host_sync_name(name, func._overloadname, args, kwargs or {})
                if name is not None:
                    outer.count[name] += 1
                    outer.where.setdefault(name, "".join(traceback.format_stack(limit=14)[:-2]))
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    def report(self) -> str:
        return "\n".join(f"{name} x{n}, first at:\n{self.where[name]}" for name, n in self.count.items())


# --- guarded allocations: out-of-bounds writes caught without compute-sanitizer ------------------------------------
GUARD_BYTE = 0xA5
_GUARDED = ("empty", "zeros", "ones", "full", "empty_like", "zeros_like")


class GuardedAllocations:
    """What :func:`guarded_allocations` allocated: ``(base, guard elements, elements, label)`` per tensor."""

    def __init__(self, guard_bytes: int):
        self.guard_bytes = guard_bytes
        self.slabs: list[tuple[torch.Tensor, int, int, str]] = []

    def alloc(self, empty, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """A contiguous ``shape`` tensor in the middle of a slab whose guard bytes before and after are GUARD_BYTE."""
        shape = tuple(int(s) for s in shape)
        n = 1
        for s in shape:
            n *= s
        es = empty((), dtype=dtype).element_size()
        g = -(-self.guard_bytes // es)
        base = empty(g + n + g, dtype=dtype, device=device)
        base.view(torch.uint8).fill_(GUARD_BYTE)
        self.slabs.append((base, g, n, f"{list(shape)} {dtype} on {base.device}"))
        return base[g:g + n].view(shape)

    def violations(self) -> list[str]:
        """The slabs whose guards changed: a kernel wrote before the start or past the end of a tensor."""
        bad = []
        for base, g, n, label in self.slabs:
            b = base.view(torch.uint8)
            es = base.element_size()
            for side, part in (("before its start", b[:g * es]), ("past its end", b[(g + n) * es:])):
                if not bool((part == GUARD_BYTE).all()):
                    bad.append(f"a write {side}: tensor {label}")
        return bad


def _guarded_size(args) -> tuple:
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else tuple(args)


@contextlib.contextmanager
def guarded_allocations(guard_bytes: int = 4096, device_type: str | None = None):
    """Inside the block, ``torch.empty / zeros / ones / full / empty_like / zeros_like`` (contiguous, strided, no
    ``out=``; tensors on ``device_type`` if given) return views into slabs with ``guard_bytes`` of GUARD_BYTE before
    and after; yields a :class:`GuardedAllocations` whose ``violations()`` lists every tensor a kernel wrote outside.
    The check compute-sanitizer's memcheck makes for writes, where no sanitizer runs (the CPU interpreter, whose
    out-of-bounds stores land silently in host memory, and GPU machines whose sanitizer refuses the device).
    Reads out of bounds are not seen. Allocations made before the block (weights, caches) are not guarded."""
    rec = GuardedAllocations(guard_bytes)
    orig = {name: getattr(torch, name) for name in _GUARDED}
    empty = orig["empty"]

    def plain(kw) -> bool:
        return (kw.get("out") is None and kw.get("layout", torch.strided) == torch.strided and not
                kw.get("requires_grad") and not kw.get("pin_memory") and
                kw.get("memory_format") in (None, torch.contiguous_format))

    def wanted(device) -> bool:
        return device_type is None or torch.device(device if device is not None else "cpu").type == device_type

    def factory(name, fill):
        def alloc(*args, **kw):
            if (name == "full" and len(args) != 2) or "size" in kw or not plain(kw) or not wanted(kw.get("device")):
                return orig[name](*args, **kw)
            size, value = (tuple(args[0]), args[1]) if name == "full" else (_guarded_size(args), fill)
            dtype = kw.get("dtype") or (orig["full"]((), value).dtype if name == "full" else torch.get_default_dtype())
            t = rec.alloc(empty, size, dtype, kw.get("device"))
            return t if value is None else t.fill_(value)
        return alloc

    def like(name, fill):
        def alloc(t, **kw):
            if not (plain(kw) and t.is_contiguous() and t.layout == torch.strided) or not wanted(kw.get("device",
                                                                                                         t.device)):
                return orig[name](t, **kw)
            out = rec.alloc(empty, t.shape, kw.get("dtype") or t.dtype, kw.get("device") or t.device)
            return out if fill is None else out.fill_(fill)
        return alloc

    fns = {"empty": factory("empty", None), "zeros": factory("zeros", 0), "ones": factory("ones", 1),
           "full": factory("full", None), "empty_like": like("empty_like", None), "zeros_like": like("zeros_like", 0)}
    for name, fn in fns.items():
        setattr(torch, name, fn)
    try:
        yield rec
    finally:
        for name, fn in orig.items():
            setattr(torch, name, fn)
        _forget_dynamo_torch_map()


# --- loads on the interpreter: every lane's address, masked or not -----------------------------------------------
class InterpreterLoads:
    """What :func:`interpreter_loads` saw: ``(element dtype, byte addresses of every lane)`` per load."""

    def __init__(self):
        self.loads: list[tuple[object, object]] = []

    def outside(self, tensors, floating: bool = True) -> list[str]:
        """The loads of floating-point elements (``floating``; else of every element type) with a lane, MASKED OR
        NOT, whose element does not lie wholly inside one of ``tensors``' storage. For kernels that promise bounded
        addresses; an ordinary masked tail load forms addresses past the end and would be listed."""
        import numpy as np

        spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors]
        bad = []
        for dtype, addrs in self.loads:
            if floating and not dtype.is_floating():
                continue
            a = np.asarray(addrs, dtype=np.uint64).reshape(-1)
            inside = np.zeros(a.shape, dtype=bool)
            for lo, hi in spans:
                inside |= (a >= lo) & (a + dtype.primitive_bitwidth // 8 <= hi)
            if not inside.all():
                bad.append(f"{dtype} load: {int((~inside).sum())} of {a.size} lanes outside, e.g. address "
                           f"{int(a[~inside][0]):#x}")
        return bad


@contextlib.contextmanager
def interpreter_loads():
    """Inside the block, every load a Triton kernel issues on the interpreter (``TRITON_INTERPRET=1``; nothing is
    seen of a compiled kernel) is recorded with the address of each lane, masked-off lanes included (the interpreter
    dereferences only the active ones, so a masked lane's wild address goes unseen otherwise; on a GPU it would be
    safe only as long as the mask and the address agree). Yields an :class:`InterpreterLoads`."""
    from triton.runtime import interpreter

    rec = InterpreterLoads()
    builder = interpreter.interpreter_builder
    inner = builder.create_masked_load  # (its parameters differ between Triton versions: passed on as given)

    def load(ptrs, *args, **kw):
        rec.loads.append((ptrs.get_element_ty(), ptrs.data.copy()))
        return inner(ptrs, *args, **kw)

    own = "create_masked_load" in vars(builder)  # (already wrapped on the instance: nested blocks)
    builder.create_masked_load = load  # create_load goes through it too
    try:
        yield rec
    finally:
        if own:
            builder.create_masked_load = inner
        else:
            del builder.create_masked_load


def _forget_dynamo_torch_map() -> None:
    """torch.compile's table of torch functions is built once per process, at its first use: built inside the block
    it holds the wrappers, so after the block a compiled ``torch.empty(...)`` was "a function marked as skipped"
    (every later fullgraph compile of the process failed). Dropped here, so the next compile rebuilds it."""
    import sys

    rules = sys.modules.get("torch._dynamo.trace_rules")
    clear = getattr(rules, "clear_lru_cache", None)
    if clear is not None:
        clear()
