"""The benchmark runner behind ``python -m omni_fast.bench`` (see ``bench/__main__.py`` for the command line).

On a GPU, once per run: the roofline of the device (device-to-device copy bandwidth counting read + write, and the
bf16 8192^3 matmul rate). Then per case and provider: warm-up, then the median of per-call CUDA-event times,
cycling through several input copies (together >= ~100 MB, at least 4, at most 64) so the L2 cache does not
flatter mid-size cases (decode-size inputs stay L2-resident, as q/k fresh from the QKV projection would be);
TFLOP/s, GB/s, % of the roofline the case is bound by, the speed-up of ``omni_fast`` over each other provider, and
for cases that declare ``units`` (``omni_fast.bench.case.Case``) the time per unit (e.g. ms per code), the real-time factor
and audio seconds per second. Rows stream to the terminal as they are measured; the run is saved as JSON, a
markdown table and a PNG.

On a CPU-only machine no timing is taken (it would say nothing about GPU speed): each case's ``check`` runs once
under the Triton interpreter, then the static sm_90a report is printed.

The ``smoke`` preset (:func:`run_smoke`, on a CPU or a GPU): every case built at its tiny shapes, every provider
called once, each reported ok / skipped (its setup says why it cannot run here) / FAILED (with the exception). No
timing, ever: it exists so a provider bug (a wrong keyword, a tensor on the wrong device, a peer's API change) shows
in CI on a CPU instead of in scarce GPU time.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

import torch

from omni_fast._layout import REPO_ROOT
from omni_fast.bench import peers
from omni_fast.bench.case import Case, Unavailable
from omni_fast.kernels.launch import file_safe

BENCH_DIR = Path(__file__).resolve().parent
# bench/results in a source checkout; ./bench_results where the suite runs from an installed wheel
RESULTS_DIR = BENCH_DIR / "results" if (BENCH_DIR.parent / ".git").exists() else Path.cwd() / "bench_results"
ROTATE_BYTES = 100e6  # input copies together at least this large (H100 L2: 50 MB)
MIN_COPIES, MAX_COPIES = 4, 64
TARGET_MS = 200.0  # measured time per provider and case (the rep count follows from it)

try:
    import nvtx as _nvtx

    def nvtx_range(name: str):
        """An NVTX range (visible in Nsight Systems); costs nothing when no profiler listens."""
        return _nvtx.annotate(name)
except Exception:  # the nvtx package is optional
    def nvtx_range(name: str):
        return contextlib.nullcontext()


# --- discovery -----------------------------------------------------------------------------------------------


def case_modules() -> list[str]:
    """Op families with a ``bench/cases/<family>.py``."""
    return sorted(p.stem for p in (BENCH_DIR / "cases").glob("*.py") if not p.stem.startswith("_"))


def discover(ops: Sequence[str] = (), preset: str = "quick") -> list[Case]:
    """Every case of ``preset`` whose op family (module name or ``Case.op``) is in ``ops`` (all when empty)."""
    known = case_modules()
    unknown = [o for o in ops if o not in known]
    if unknown:
        raise SystemExit(f"unknown op family {unknown}; known: {known}")
    found = []
    for stem in known:
        if ops and stem not in ops:
            continue
        module = importlib.import_module(f"omni_fast.bench.cases.{stem}")
        found += [c for c in module.cases(preset) if not ops or c.op in ops or stem in ops]
    return found


# --- timing --------------------------------------------------------------------------------------------------


def _sync():
    torch.cuda.synchronize()


BATCH = 32  # calls enqueued behind one GPU sleep (small enough for the launch queue of a multi-kernel provider)
# A sleep must outlast the host's launch work of its batch (so the GPU never waits for the host); host-heavy
# providers get smaller batches rather than a shorter sleep, which bounds the GPU idle time per sleep (what a
# provider that synchronises inside, a whole pipeline or transformers' generate, wastes) without breaking that.
MAX_SLEEP_MS = 25.0
GPU_CYCLES_PER_MS = 2.0e6  # >= the clock of current data-centre GPUs, so a sleep lasts at least as long as asked


def _gpu_sleep(ms: float) -> None:
    """Keep the GPU busy for about ``ms`` so the host can queue the next calls ahead of it."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is not None and ms > 0:
        sleep(int(ms * GPU_CYCLES_PER_MS))


def time_ms(fns: Sequence[Callable[[], object]], *, label: str = "", target_ms: float | None = None) -> dict:
    """Per-call times of ``fns`` (one per input copy, cycled), in milliseconds.

    Returns ``{"ms": median GPU time per call, "host_ms": wall time per call with the host in the loop}``. GPU times
    come from CUDA events around each call. Each batch of calls is queued behind a GPU sleep that outlasts the host's
    launch work, so a small op's time is its GPU time, not the Python launch overhead (``host_ms`` shows that).
    """
    target_ms = TARGET_MS if target_ms is None else target_ms
    # Warm-up: compiles / autotunes on the first call; then the host-side cost per call, with syncs.
    for fn in fns:
        fn()
    _sync()
    t0 = time.perf_counter()
    n_est = max(len(fns), 5)
    for i in range(n_est):
        fns[i % len(fns)]()
    _sync()
    host_ms = max((time.perf_counter() - t0) * 1e3 / n_est, 1e-3)
    reps = int(min(max(target_ms / host_ms, 10), 2000))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    batch = max(1, min(BATCH, int(MAX_SLEEP_MS / (1.5 * host_ms))))
    for b in range(0, reps, batch):
        _gpu_sleep(1.5 * host_ms * min(batch, reps - b) + 0.05)
        for i in range(b, min(b + batch, reps)):
            with nvtx_range(label):  # one range per call, for Nsight Systems timelines
                starts[i].record()
                fns[i % len(fns)]()
                ends[i].record()
    _sync()
    return {"ms": statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)), "host_ms": host_ms}


def measure_roofline(device: torch.device) -> dict:
    """Copy bandwidth (GB/s, read + write) and bf16 dense matmul rate (TFLOP/s) of ``device``."""
    n = 1 << 30  # 1 GiB per buffer: far beyond L2
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms([lambda: dst.copy_(src)], label="roofline copy", target_ms=300)["ms"]
    del src, dst
    m = 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    mm_ms = time_ms([lambda: a @ b], label="roofline matmul", target_ms=500)["ms"]
    del a, b
    torch.cuda.empty_cache()
    return {"copy_gbps": 2 * n / copy_ms / 1e6, "matmul_tflops": 2 * m**3 / mm_ms / 1e9,
            "copy_bytes": 2 * n, "matmul_shape": [m, m, m]}


def n_copies(case: Case) -> int:
    """How many input copies the harness rotates through for ``case``: enough that together they exceed
    ``ROTATE_BYTES`` (L2 does not hold them), clamped to ``[MIN_COPIES, MAX_COPIES]``; ``MIN_COPIES`` without bytes."""
    if case.bytes <= 0:
        return MIN_COPIES
    return int(min(max(math.ceil(ROTATE_BYTES / case.bytes), MIN_COPIES), MAX_COPIES))


def resolve_bound(case: Case, roofline: dict) -> str:
    """``case.bound``, with ``"auto"`` resolved to the roof with the larger time floor on this device:
    ``bytes / copy bandwidth`` vs ``flops / matmul rate``."""
    if case.bound != "auto":
        return case.bound
    memory_ms = case.bytes / roofline["copy_gbps"] / 1e6
    compute_ms = case.flops / roofline["matmul_tflops"] / 1e9
    return "memory" if memory_ms >= compute_ms else "compute"


def bench_case(case: Case, device: torch.device, roofline: dict, providers: Sequence[str] = ()) -> list[dict]:
    """One row per provider of ``case``: time, TFLOP/s, GB/s, % of roofline, omni_fast speed-up over it."""
    copies = [case.setup(device) for _ in range(n_copies(case))]
    names = [p for p in copies[0] if not providers or p in providers]
    bound = resolve_bound(case, roofline)
    rows = []
    for prov in names:
        row = {"op": case.op, "case": case.name, "provider": prov, "params": case.params, "bound": bound,
               "flops": case.flops, "bytes": case.bytes, "copies": len(copies)}
        if case.units:
            row["units"] = dict(case.units)
        if isinstance(copies[0][prov], Unavailable):  # cannot run here: a row that says why
            row["skipped"] = copies[0][prov].reason
            rows.append(row)
            continue
        try:
            t = time_ms([c[prov] for c in copies], label=f"{case.name}/{prov}")
            ms = t["ms"]
            row.update(ms=ms, host_ms=t["host_ms"], tflops=case.flops / ms / 1e9, gbps=case.bytes / ms / 1e6)
            peak = roofline["copy_gbps"] if bound == "memory" else roofline["matmul_tflops"]
            row["pct_roofline"] = 100 * (row["gbps"] if bound == "memory" else row["tflops"]) / peak
            row.update(unit_fields(case.units, ms))
        except Exception as exc:  # a provider failing must not hide the others
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
    del copies
    ref = next((r for r in rows if r["provider"] == "omni_fast" and "ms" in r), None)
    for r in rows:
        if ref is not None and "ms" in r:
            r["omni_fast_speedup"] = r["ms"] / ref["ms"]
    return rows


AUDIO_UNIT = "audio_s"  # Case.units key for seconds of audio produced per call


def unit_fields(units: dict, ms: float) -> dict:
    """Per-unit fields of a row timed at ``ms`` per call: ``ms_per_<unit>`` for each unit of ``Case.units``, and
    for ``audio_s`` the real-time factor ``rtf`` (time / audio seconds; < 1 is faster than real time) and
    ``audio_s_per_s`` (audio seconds produced per second, the throughput)."""
    out = {}
    for unit, n in units.items():
        if n <= 0:
            continue
        if unit == AUDIO_UNIT:
            out["rtf"] = ms / 1e3 / n
            out["audio_s_per_s"] = n / (ms / 1e3)
        else:
            out[f"ms_per_{unit}"] = ms / n
    return out


# --- output --------------------------------------------------------------------------------------------------

COLUMNS = [("case", "case", "{}"), ("provider", "provider", "{}"), ("us", "ms", "{:.2f}"),
           ("host us", "host_ms", "{:.1f}"),
           ("TFLOP/s", "tflops", "{:.3g}"), ("GB/s", "gbps", "{:.0f}"), ("% roof", "pct_roofline", "{:.1f}"),
           ("omni_fast x", "omni_fast_speedup", "{:.2f}"), ("per unit", "per_unit", "{}"), ("RTF", "rtf", "{:.3g}"),
           ("audio s/s", "audio_s_per_s", "{:.3g}")]
WIDTHS = [30, 14, 9, 8, 8, 8, 7, 11, 16, 7, 9]


def _per_unit(row: dict) -> str | None:
    """``ms_per_<unit>`` fields as e.g. ``0.123 ms/code`` (None when the case has no units)."""
    parts = [f"{v:.3g} ms/{k[len('ms_per_'):]}" for k, v in row.items() if k.startswith("ms_per_")]
    return ", ".join(parts) or None


def _cell(row: dict, key: str, fmt: str) -> str:
    if key == "ms" and "error" in row:
        return "error"
    if key == "ms" and "skipped" in row:
        return "skipped"
    if key == "per_unit":
        return _per_unit(row) or "-"
    v = row.get(key)
    if v is None:
        return "-"
    return fmt.format(v * 1e3 if key in ("ms", "host_ms") else v)


def format_row(row: dict) -> str:
    """One result row (a :func:`bench_case` dict) as a fixed-width console line under :func:`header`."""
    return "  ".join(f"{_cell(row, k, f):<{w}}" if i < 2 else f"{_cell(row, k, f):>{w}}"
                     for i, ((_, k, f), w) in enumerate(zip(COLUMNS, WIDTHS)))


def header() -> str:
    """The console table's header line (``COLUMNS``' headings at ``WIDTHS``)."""
    return "  ".join(f"{h:<{w}}" if i < 2 else f"{h:>{w}}" for i, ((h, _, _), w) in enumerate(zip(COLUMNS, WIDTHS)))


def markdown(result: dict) -> str:
    """A GPU run's report as markdown: device, date, commit, versions, preset, the measured roofline, a legend and
    one table row per (case, provider) of ``result["rows"]``."""
    rf = result["roofline"]
    lines = [f"# omni-fast benchmark: {result['device']}", "",
             f"{result['date']}, commit `{result['commit']}`, torch {result['torch']}, triton {result['triton']}, "
             f"preset `{result['preset']}`.", "",
             f"Roofline: copy {rf['copy_gbps']:.0f} GB/s (read + write), bf16 matmul {rf['matmul_tflops']:.0f} "
             f"TFLOP/s. `us`: median GPU time per call (CUDA events, host launch work hidden); `host us`: wall time per call "
             f"with the host in the loop. `omni_fast x` = this provider's time / omni_fast's (> 1: omni_fast faster). "
             f"`per unit`: time per unit of work (code = one 16-codebook frame of one stream, frame = one MTP "
             f"frame); `RTF`: time / audio seconds produced (< 1: faster than real time); `audio s/s`: audio "
             f"seconds produced per second.",
             "",
             "| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in result["rows"]:
        lines.append("| " + " | ".join(_cell(r, k, f) for _, k, f in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Grouped bars: % of roofline per case, one bar per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "pct_roofline" in r]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / max(len(provs), 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.25 * len(cases) * max(len(provs), 1) + 3), 5.5))
    for i, p in enumerate(provs):
        xs, ys = [], []
        for j, c in enumerate(cases):
            v = next((r["pct_roofline"] for r in rows if r["case"] == c and r["provider"] == p), None)
            if v is not None:
                xs.append(j + i * width)
                ys.append(v)
        ax.bar(xs, ys, width, label=p)
    ax.set_xticks([j + width * (len(provs) - 1) / 2 for j in range(len(cases))])
    ax.set_xticklabels(cases, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("% of roofline")
    ax.set_title(f"omni-fast on {result['device']} ({result['commit']}): % of copy bandwidth or bf16 matmul rate",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def git_commit() -> str:
    """The short HEAD commit of the benchmark's checkout, ``-dirty`` appended when tracked files changed;
    ``"unknown"`` when git cannot tell."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=BENCH_DIR,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def save(result: dict, out_dir: Path) -> Path:
    """Write ``<out>/<device>/<date>-<commit>.{json,md,png}``; returns the JSON path."""
    folder = out_dir / file_safe(result["device"])
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{result['commit']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    try:
        plot(result, stem.with_suffix(".png"))
    except Exception as exc:  # a missing matplotlib must not lose the measurements
        print(f"(no plot: {exc})")
    return stem.with_suffix(".json")


# --- the two modes -------------------------------------------------------------------------------------------


def run_metadata(device: torch.device, preset: str, roofline: dict) -> dict:
    """What a saved run records beside its rows: device, versions, commit, date, preset, peers, roofline."""
    import triton

    return {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "commit": git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "preset": preset,
            "peers": peers.versions(), "roofline": roofline}


def run_gpu(cases: list[Case], *, preset: str, providers: Sequence[str] = (), out_dir: Path = RESULTS_DIR,
            deadline_s: float | None = None) -> int:
    """Time every case on the GPU and save the run. ``deadline_s``: no case starts after that many seconds (the
    rest get one row each, skipped "deadline"); an interrupt (SIGINT, e.g. a time box running out) also ends the
    run early. Either way what was measured is saved, with ``"incomplete"`` saying why."""
    t0 = time.monotonic()
    device = torch.device("cuda")
    print(f"Device {torch.cuda.get_device_name(device)}; measuring the roofline ...", flush=True)
    roofline = measure_roofline(device)
    print(f"Roofline: copy {roofline['copy_gbps']:.0f} GB/s (read + write), bf16 matmul "
          f"{roofline['matmul_tflops']:.0f} TFLOP/s")
    print(header())
    tty = sys.stdout.isatty()
    rows, incomplete = [], None
    meta = run_metadata(device, preset, roofline)
    # rewritten after every case: a run killed mid-case (a time box) still leaves what it measured
    partial = out_dir / file_safe(meta["device"]) / f"partial-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    partial.parent.mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(cases, 1):
        if incomplete is None and deadline_s is not None and time.monotonic() - t0 > deadline_s:
            incomplete = f"deadline of {deadline_s:g} s reached before case {i} of {len(cases)}"
            print(f"({incomplete}: the remaining cases are skipped)", flush=True)
        if incomplete is not None:
            rows.append({"op": case.op, "case": case.name, "provider": "*", "params": case.params,
                         "skipped": incomplete})
            continue
        progress = f"[{i}/{len(cases)}] {case.name} ({n_copies(case)} input copies) ..."
        if tty:  # a progress line the rows then overwrite
            print(progress, end="\r", flush=True)
        else:
            print(progress, flush=True)
        try:
            case_rows = bench_case(case, device, roofline, providers)
        except KeyboardInterrupt:  # the time box ran out: keep what was measured
            incomplete = f"interrupted during case {i} of {len(cases)}"
            print(f"({incomplete})", flush=True)
            continue
        if tty:
            print("\x1b[2K", end="")
        for r in case_rows:
            print(format_row(r), flush=True)
        rows += case_rows
        partial.write_text(json.dumps(dict(meta, rows=rows, incomplete=f"cut off after case {i} of {len(cases)}")))
    result = dict(meta, rows=rows, **({"incomplete": incomplete} if incomplete is not None else {}))
    path = save(result, out_dir)
    partial.unlink(missing_ok=True)
    print(f"Saved {path} (+ .md, .png)")
    unknown = sorted(set(providers) - {r["provider"] for r in rows}) if incomplete is None else []
    if unknown:  # a mistyped --providers name must not pass as a clean (empty) run, as in run_smoke
        print(f"no case has the provider(s) {unknown}", flush=True)
    return 1 if unknown or any("error" in r for r in rows) else 0


def _describe(exc: BaseException) -> str:
    """``Type: first line of the message (at file:line)``: the innermost frame of the traceback in this repository
    (else the innermost frame), so a smoke failure names the code to fix."""
    frames = traceback.extract_tb(exc.__traceback__)
    root = REPO_ROOT
    ours = [f for f in frames if f.filename.startswith(root)]
    where = (ours or frames)[-1] if frames else None
    msg = (str(exc).strip().splitlines() or [""])[0][:200]
    cause = exc.__cause__
    if cause is not None:  # e.g. torch.compile's wrapper exceptions: the cause says what went wrong
        msg += f" <- {type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:200]}"
    loc = f" (at {Path(where.filename).relative_to(root) if where.filename.startswith(root) else where.filename}:" \
          f"{where.lineno})" if where else ""
    return f"{type(exc).__name__}: {msg}{loc}"


def smoke(cases: list[Case], device: torch.device | str | None = None, providers: Sequence[str] = (),
          echo: Callable[[dict], None] | None = None) -> list[dict]:
    """Build every case on ``device`` (default: CUDA when present, else the CPU) and call every provider once
    (``compile`` providers trace with ``aot_eager``, see :mod:`omni_fast.bench.cases._compile`).

    Returns one row per (case, provider): ``{"case", "provider", "status": "ok" | "skipped" | "FAILED", "detail"}``
    (a case whose setup raises gives one row with provider ``"(setup)"``). ``echo`` sees each row as it is made.
    No timing is taken."""
    from omni_fast.bench.cases._compile import tracing_only

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []

    def add(case, prov, status, detail=""):
        rows.append({"op": case.op, "case": case.name, "provider": prov, "status": status, "detail": detail})
        if echo is not None:
            echo(rows[-1])

    for case in cases:
        try:
            with tracing_only():  # compile providers: dynamo + aot_eager, not inductor (plumbing, in seconds)
                fns = case.setup(device)
        except Exception as exc:  # noqa: BLE001 - reported, and the other cases still run
            add(case, "(setup)", "FAILED", _describe(exc))
            continue
        for prov, fn in fns.items():
            if providers and prov not in providers:
                continue
            if isinstance(fn, Unavailable):
                add(case, prov, "skipped", fn.reason)
                continue
            try:
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()  # an asynchronous kernel fault belongs to this provider
                add(case, prov, "ok")
            except Exception as exc:  # noqa: BLE001 - a failing provider must not hide the others
                add(case, prov, "FAILED", _describe(exc))
        del fns
    return rows


def run_smoke(cases: list[Case], providers: Sequence[str] = ()) -> int:
    """The smoke run of ``python -m omni_fast.bench --preset smoke``: prints a line per (case, provider) and a summary;
    returns 1 when any provider (or setup) failed."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"Smoke run on {device}: {len(cases)} cases at tiny shapes, every provider called once (no timing).",
          flush=True)
    rows = smoke(cases, device, providers, echo=lambda r: print(
        f"  {r['case']:<36} {r['provider']:<24} {r['status']:<8} {r['detail']}".rstrip(), flush=True))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "FAILED")}
    print(f"Smoke: {counts['ok']} ok, {counts['skipped']} skipped, {counts['FAILED']} FAILED", flush=True)
    unknown = sorted(set(providers) - {r["provider"] for r in rows})
    if unknown:  # a mistyped --providers name must not pass as "nothing failed"
        print(f"Smoke: no case has the provider(s) {unknown}", flush=True)
    return 1 if counts["FAILED"] or unknown else 0


def run_cpu(cases: list[Case], static: bool = True) -> int:
    """No GPU: correctness checks under the interpreter, then (``static``) the static sm_90a report.

    Returns the exit status."""
    print("No CUDA GPU found: speed needs a GPU, so no timings are taken here (CPU or interpreter times say "
          "nothing about GPU speed).")
    print(f"Checking {len(cases)} cases against their references once under the Triton interpreter:")
    results: dict[int, str | None] = {}
    failed = 0
    for case in cases:
        if case.check is None:
            print(f"  {case.name:<40} (no check)")
            continue
        key = id(case.check)  # cases sharing one check run it once
        if key not in results:
            try:
                case.check()
                results[key] = None
            except Exception as exc:
                results[key] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        err = results[key]
        failed += err is not None
        print(f"  {case.name:<40} {'pass' if err is None else 'FAIL ' + err}", flush=True)
    print(f"Checks: {'all passed' if not failed else f'{failed} FAILED'}", flush=True)
    if not static:
        return 1 if failed else 0
    from omni_fast.bench import static_check

    static_rc = static_check.main()
    return 1 if failed or static_rc else 0
