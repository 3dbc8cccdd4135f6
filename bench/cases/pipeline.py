"""The whole Qwen3-Omni pipeline (thinker -> talker -> MTP -> streaming Code2Wav) at concurrency 1, 4 and 6.

Two ways to run it:

- ``python -m omni_fast.bench pipeline`` (the harness): one Case per concurrency; providers ``omni_fast`` (the thin pipeline,
  patched: thinker/talker decode as CUDA-graph replays), ``omni_fast_eager_decode`` (patched, decode steps through
  transformers' text models), ``eager`` (the same pipeline on unpatched transformers modules), ``transformers`` and
  ``transformers_patched`` (transformers' own ``Qwen3OmniMoeForConditionalGeneration.generate``, greedy, unpatched
  and patched by ``omni_fast.patch``, on the same requests: the same prompt ids with their audio placeholders and
  the same mel features). The harness times a whole request batch per call.
- ``python -m omni_fast.bench.cases.pipeline [--concurrency 1 4 6] [--thinker-layers N] [--providers P...] [--out DIR]``: the latency breakdown
  of the technical report per request (first audio packet, thinker/talker TTFT, MTP per frame, codec per code,
  tokens/s, RTF, total) for the four providers ``omni_fast``, ``eager``, ``transformers``, ``transformers_patched``
  next to the report's numbers, written as JSON + markdown under ``bench/results/<device>/`` (what transformers'
  non-streaming ``generate`` cannot report is n/a, with the reason).

GPU only (the full 30B-A3B shapes with random weights need ~72 GiB free in bf16; with less free memory the thinker is
trimmed to fewer layers and the JSON says so). On a CPU, ``check`` runs the tiny pipeline once against transformers'
``generate`` (same text tokens and codes), and the ``smoke`` preset calls every provider once on the tiny pipeline
(omni-fast's ops on the reference backend there: plumbing only, see ``_setup``).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from omni_fast.bench.case import Case
from omni_fast.kernels.launch import file_safe

CONCURRENCY = {"quick": (1,), "full": (1, 4, 6), "smoke": (1,)}
# Qwen3-Omni technical report (single concurrency, and concurrency 6 where given), ms unless noted.
REPORT = {1: {"first_packet_ms": 234, "preprocessing_ms": 72, "thinker_ttft_ms": 88, "talker_ttft_ms": 57,
              "mtp_per_frame_ms": 14, "codec_per_code_ms": 3, "thinker_tokens_per_s": 75, "talker_tokens_per_s": 140,
              "rtf": 0.47},
          6: {"mtp_per_frame_ms": 18, "codec_per_code_ms": 5, "rtf": 0.66}}
TARGET = {"first_packet_ms": 100, "rtf": 0.1}  # the target on one H100/H200 at concurrency 1
TEXT_TOKENS, FRAMES = 32, 50  # per request: 32 text tokens, 50 codec frames (4 s of speech)
# Per preset: the model ("full" shapes, or the tiny CPU one in fp32), (text tokens, frames) per request (None: the
# module's TEXT_TOKENS, FRAMES) and seconds of audio per request.
PRESETS = {"quick": dict(tiny=False, sizes=None, audio_seconds=2.0),
           "full": dict(tiny=False, sizes=None, audio_seconds=2.0),
           "smoke": dict(tiny=True, sizes=(4, 3), audio_seconds=0.5)}


@functools.lru_cache(maxsize=1)
def _pipeline(device: str, thinker_layers: int | None = None):
    """The full-shape random-weight pipeline, built once per process (65.7 GiB of weights)."""
    from omni_fast.models import Qwen3Omni

    if thinker_layers is None:
        from omni_fast.models.presets import full_thinker_layers

        free = torch.cuda.mem_get_info()[0] / 2 ** 30
        thinker_layers = full_thinker_layers(free)
        if thinker_layers == 0:
            from omni_fast.models.presets import FULL_MIN_FREE_GIB

            raise RuntimeError(f"the full-shape pipeline needs ~{FULL_MIN_FREE_GIB:.1f} GiB free even with one thinker "
                               f"layer; {free:.1f} GiB free")
    pipe = Qwen3Omni.random("full", device=device, thinker_layers=thinker_layers, patch=False)
    pipe.thinker_layers = thinker_layers or 48
    return pipe


@functools.lru_cache(maxsize=1)
def _tiny_pipeline(device: str):
    """The tiny random-weight pipeline (fp32 on a CPU), for the smoke preset."""
    from omni_fast.models import Qwen3Omni

    return Qwen3Omni.random("tiny", device=device, dtype=torch.float32, patch=False)


def _requests(n: int, seconds: float = 2.0):
    from omni_fast.__main__ import synthetic_speech
    from omni_fast.models import Request

    return [Request(text=f"Request {i}: please describe what you heard.", audio=synthetic_speech(seconds, seed=i))
            for i in range(n)]


def _run(pipe, reqs, patched: bool, sizes: tuple[int, int] | None = None, **kwargs):
    text_tokens, frames = sizes or (TEXT_TOKENS, FRAMES)
    pipe.set_patched(patched)  # every stage follows: patched model, omni-fast MTP step and streaming Code2Wav
    return pipe.generate(reqs, max_new_tokens=text_tokens, talker_max_new_tokens=frames + 1, **kwargs)


def _transformers_inputs(pipe, reqs) -> dict:
    """transformers ``generate`` inputs for the same requests the pipeline gets: the same prompt ids (audio
    placeholders included, left padded), the mel features of the same waveforms (the pipeline's front end:
    transformers' ``WhisperFeatureExtractor`` built from its constructor, nothing downloaded) and their mask."""
    from omni_fast.models.positions import audio_tokens
    from omni_fast.models.qwen3_omni import mel_features

    dev = pipe.device
    feats, fmask = mel_features([r.audio for r in reqs], dev)
    n_audio = [audio_tokens(int(n), pipe.spec.n_window) for n in fmask.sum(-1).tolist()]
    prompts = [pipe.build_prompt(r, n, 0) for r, n in zip(reqs, n_audio)]
    S = max(map(len, prompts))
    ids = torch.zeros(len(reqs), S, dtype=torch.long, device=dev)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, S - len(p):] = torch.tensor(p, device=dev)
        mask[i, S - len(p):] = 1
    return dict(input_ids=ids, attention_mask=mask, input_features=feats.to(pipe.model.thinker.dtype),
                feature_attention_mask=fmask)


def _now(device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _transformers_generate(pipe, reqs, patched: bool = False, sizes: tuple[int, int] | None = None,
                           timed: bool = False):
    """transformers' own ``Qwen3OmniMoeForConditionalGeneration.generate`` (greedy) on the same requests as the
    pipeline (text + 2 s audio: :func:`_transformers_inputs`), unpatched or patched by ``omni_fast.patch``.

    ``timed``: returns per-request metrics in the pipeline's terms, measured from outside with forward hooks (the
    model is not changed): ``preprocessing`` = the mel front end (the audio encoder runs inside the thinker's first
    forward, so it is in thinker TTFT), ``thinker_ttft`` (the first thinker forward), ``talker_ttft`` (the talker's
    first forward, its prefill: it starts only after all the text), ``codec_per_code`` (``chunked_decode`` time /
    codes), ``first_packet`` = ``total`` (no streaming: the whole waveform comes out at the end), ``rtf`` = total /
    the request's audio duration. MTP per frame and tokens/s are not separable from outside ``generate``: None."""
    import omni_fast

    model = pipe.model
    if patched and not getattr(model, "_omni_fast_patched", False):
        omni_fast.patch(model)
    elif not patched and getattr(model, "_omni_fast_patched", False):
        omni_fast.unpatch(model)
    text_tokens, frames = sizes or (TEXT_TOKENS, FRAMES)
    dev = pipe.device
    marks: dict[str, float] = {}
    codec = [0.0, 0]  # seconds, codes

    def mark(name):
        def hook(*_):
            if name not in marks:  # the first call only (no extra sync on later decode steps)
                marks[name] = _now(dev)
        return hook

    hooks = []
    real_decode = model.code2wav.chunked_decode
    if timed:
        hooks = [model.thinker.register_forward_hook(mark("thinker_first")),
                 model.talker.register_forward_pre_hook(mark("talker_start")),
                 model.talker.register_forward_hook(mark("talker_first"))]

        def decode(codes, *a, **k):
            t0 = _now(dev)
            out = real_decode(codes, *a, **k)
            codec[0] += _now(dev) - t0
            codec[1] += codes.shape[-1]
            return out

        model.code2wav.chunked_decode = decode
    try:
        t0 = _now(dev)
        inputs = _transformers_inputs(pipe, reqs)
        t_pre = _now(dev)
        text, wavs = model.generate(**inputs, thinker_max_new_tokens=text_tokens, thinker_do_sample=False,
                                    thinker_eos_token_id=pipe.config.im_end_token_id,
                                    talker_max_new_tokens=frames + 1, talker_do_sample=False,
                                    talker_repetition_penalty=1.0, speaker="ethan")
        t_end = _now(dev)
    finally:
        for h in hooks:
            h.remove()
        model.code2wav.__dict__.pop("chunked_decode", None)
    if not timed:
        return text, wavs
    total = t_end - t0
    # transformers >= 5.2x returns one waveform per row in a batch (cut at its own length), [1, 1, S] for one row
    lengths = ([w.numel() for w in wavs] if isinstance(wavs, (list, tuple))
               else [wavs.shape[-1]] * len(reqs))
    rows = []
    for n in lengths:
        seconds = n / 24000
        rows.append({"first_packet_ms": total * 1e3, "preprocessing_ms": (t_pre - t0) * 1e3,
                     "thinker_ttft_ms": (marks["thinker_first"] - t_pre) * 1e3,
                     "talker_ttft_ms": (marks["talker_first"] - marks["talker_start"]) * 1e3,
                     "mtp_per_frame_ms": None,
                     "codec_per_code_ms": codec[0] / codec[1] * 1e3 if codec[1] else None,
                     "thinker_tokens_per_s": None, "talker_tokens_per_s": None,
                     "rtf": total / seconds if seconds else None, "total_ms": total * 1e3})
    return rows


# What the transformers providers cannot report, and why (the markdown prints n/a).
TRANSFORMERS_NA = {
    "mtp_per_frame_ms": "inside transformers' talker generate (one call per frame), not timed from outside",
    "thinker_tokens_per_s": "transformers' generate runs the thinker to the end first; not split from outside",
    "talker_tokens_per_s": "the talker's generate interleaves the MTP per step; not split from outside",
    "first_packet_ms": "transformers' generate does not stream: the first packet is the whole waveform (= total)",
}


def _setup(concurrency: int, preset: str = "quick"):
    p = PRESETS[preset]
    sizes = p["sizes"]

    def setup(device):
        pipe = _tiny_pipeline(str(device)) if p["tiny"] else _pipeline(str(device))
        reqs = _requests(concurrency, p["audio_seconds"])
        fns = {"omni_fast": lambda: _run(pipe, reqs, True, sizes), "eager": lambda: _run(pipe, reqs, False, sizes),
               # patched, but thinker/talker decode through transformers' text models: what graph decode gains
               "omni_fast_eager_decode": lambda: _run(pipe, reqs, True, sizes, graph_decode=False),
               "transformers": lambda: _transformers_generate(pipe, reqs, sizes=sizes),
               "transformers_patched": lambda: _transformers_generate(pipe, reqs, patched=True, sizes=sizes)}
        if torch.device(device).type == "cpu":
            # Plumbing only on a CPU: omni-fast's ops on the reference backend (the interpreter takes ~30 s per
            # request here, mostly the vocoder's convolutions; every kernel is smoke-tested in its own family), and
            # "omni_fast" decodes op by op (graph_decode needs CUDA), like omni_fast_eager_decode.
            fns = {name: functools.partial(_on_reference, fn) for name, fn in fns.items()}
        return fns

    return setup


def _on_reference(fn):
    import omni_fast

    with omni_fast.use_backend("reference"):
        return fn()


def check() -> None:
    """CPU: the tiny pipeline once; its text tokens and codes equal transformers' generate."""
    from omni_fast.models import Qwen3Omni, Request
    from omni_fast.models.presets import TINY_IDS

    pipe = Qwen3Omni.random("tiny", patch=False)
    req = Request(text=[5, 6, 7, 8])
    frames = []
    decode = pipe.code2wav.decode
    pipe.code2wav.decode = lambda c: (frames.append(c), decode(c))[1]
    ours = pipe.generate(req, max_new_tokens=6, talker_max_new_tokens=8, first_chunk=300, chunk=300)[0]
    ids = torch.tensor([pipe.build_prompt(req, 0, 0)])
    text, _ = pipe.model.generate(input_ids=ids, thinker_max_new_tokens=6, thinker_do_sample=False,
                                  thinker_eos_token_id=TINY_IDS["im_end_token_id"], talker_max_new_tokens=8,
                                  talker_do_sample=False, talker_repetition_penalty=1.0)
    if text[0, ids.shape[1]:].tolist() != ours["token_ids"]:
        raise AssertionError("pipeline text tokens differ from transformers' generate")
    if not frames or ours["audio"].numel() == 0:
        raise AssertionError("pipeline produced no audio")


def cases(preset: str) -> list[Case]:
    """The benchmark cases of the whole pipeline at each concurrency of ``preset`` (one request batch per call; no bytes
    / FLOPs: an end-to-end time)."""
    text_tokens, frames = PRESETS[preset]["sizes"] or (TEXT_TOKENS, FRAMES)
    return [Case(op="pipeline", name=f"pipeline conc={c}", params={"concurrency": c, "text_tokens": text_tokens,
                                                                    "frames": frames,
                                                                    "model": "tiny" if PRESETS[preset]["tiny"]
                                                                    else "full"},
                 setup=_setup(c, preset), bytes=0.0, flops=0.0, bound="memory", check=check, tags=("e2e",))
            for c in CONCURRENCY[preset]]


# ------------------------------------------------------------------------------------------ report-style runner
KEYS = ["first_packet_ms", "preprocessing_ms", "thinker_ttft_ms", "talker_ttft_ms", "mtp_per_frame_ms",
        "codec_per_code_ms", "thinker_tokens_per_s", "talker_tokens_per_s", "rtf", "total_ms"]
PROVIDERS = ("omni_fast", "eager", "transformers", "transformers_patched")


def _pipeline_row(t) -> dict:
    """One request's :class:`~omni_fast.models.qwen3_omni.RequestTiming` in the report's units."""
    return {"first_packet_ms": t.first_packet * 1e3, "preprocessing_ms": t.preprocessing * 1e3,
            "thinker_ttft_ms": t.thinker_ttft * 1e3, "talker_ttft_ms": t.talker_ttft * 1e3,
            "mtp_per_frame_ms": t.mtp_per_frame * 1e3, "codec_per_code_ms": t.codec_per_code * 1e3,
            "thinker_tokens_per_s": t.thinker_tokens_per_s, "talker_tokens_per_s": t.talker_tokens_per_s,
            "rtf": t.rtf, "total_ms": t.total * 1e3}


def measure(concurrency=(1, 4, 6), thinker_layers: int | None = None, repeats: int = 3, pipe=None,
            providers=PROVIDERS, audio_seconds: float = 2.0, sizes: tuple[int, int] | None = None) -> dict:
    """Per-concurrency medians of the per-request timings for each provider: the thin pipeline patched
    (``omni_fast``) and unpatched (``eager``), and transformers' own ``generate`` unpatched (``transformers``) and
    patched by ``omni_fast.patch`` (``transformers_patched``), all on the same requests (text + ``audio_seconds``
    of synthetic speech each). Metrics a provider cannot report are None (``result["na"]`` says why).
    ``pipe``: a prebuilt pipeline (the tests pass the tiny one); default the full-shape one on the GPU."""
    pipe = pipe if pipe is not None else _pipeline("cuda", thinker_layers)
    text_tokens, frames = sizes or (TEXT_TOKENS, FRAMES)
    device = torch.cuda.get_device_name() if pipe.device.type == "cuda" else str(pipe.device)
    out = {"device": device, "thinker_layers": getattr(pipe, "thinker_layers", None), "audio_seconds": audio_seconds,
           "text_tokens": text_tokens, "frames": frames, "report": REPORT, "target": TARGET,
           "na": {"transformers": TRANSFORMERS_NA, "transformers_patched": TRANSFORMERS_NA}, "runs": []}
    for provider in providers:
        for c in concurrency:
            reqs = _requests(c, audio_seconds)
            if provider in ("omni_fast", "eager"):
                def once():
                    return [_pipeline_row(r["timing"]) for r in _run(pipe, reqs, provider == "omni_fast",
                                                                     (text_tokens, frames))]
            else:
                def once():
                    return _transformers_generate(pipe, reqs, patched=provider == "transformers_patched",
                                                  sizes=(text_tokens, frames), timed=True)
            once()  # warm-up (Triton compile, autotune, allocator)
            once()  # again: a reused codec stream captures its first-push-after-reset graphs once
            rows = [row for _ in range(repeats) for row in once()]
            run = {"provider": provider, "concurrency": c}
            for k in KEYS:
                vals = [r[k] for r in rows if r[k] is not None and r[k] == r[k]]  # (NaN: no audio)
                run[k] = statistics.median(vals) if vals else None
            out["runs"].append(run)
            print(json.dumps(run), flush=True)
    if getattr(pipe.model, "_omni_fast_patched", False):
        import omni_fast

        omni_fast.unpatch(pipe.model)
    return out


def markdown(result: dict) -> str:
    """The report-style run's ``result`` (from :func:`measure`) as markdown: the technical report's numbers, the
    issue's targets and one row per (provider, concurrency) of the latency breakdown (``KEYS``)."""
    lines = [f"# Qwen3-Omni pipeline, random weights, {result['device']} (thinker {result['thinker_layers']} of 48 "
             f"layers; {result.get('audio_seconds', 2.0):g} s audio + text in, {result['text_tokens']} text tokens, "
             f"{result['frames']} frames per request)", "",
             "| provider | conc | " + " | ".join(KEYS) + " |", "|" + "---|" * (len(KEYS) + 2)]
    for c, ref in REPORT.items():
        lines.append(f"| tech report | {c} | " + " | ".join(str(ref.get(k, "")) for k in KEYS) + " |")
    target = result.get("target", TARGET)
    lines.append("| issue target | 1 | " + " | ".join(f"<= {target[k]}" if k in target else "" for k in KEYS) + " |")
    for r in result["runs"]:
        lines.append(f"| {r['provider']} | {r['concurrency']} | "
                     + " | ".join("n/a" if r.get(k) is None else f"{r[k]:.3g}" for k in KEYS) + " |")
    notes = result.get("na", {}).get("transformers", {})
    if notes:
        lines += ["", "n/a / caveats for the transformers providers (transformers' own generate, not streaming):"]
        lines += [f"- {k}: {v}" for k, v in notes.items()]
    return "\n".join(lines) + "\n"


def _positive(text: str) -> int:
    """argparse type: an int >= 1 (0 layers, repeats or concurrent requests measure nothing)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv=None) -> int:
    """The report-style runner (module doc): on a GPU, measure and write ``pipeline.json`` / ``pipeline.md`` under
    ``--out``/<device>; without one, run the CPU :func:`check`. Returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m omni_fast.bench.cases.pipeline")
    parser.add_argument("--concurrency", type=_positive, nargs="+", default=[1, 4, 6])
    parser.add_argument("--thinker-layers", type=_positive, default=None)
    parser.add_argument("--repeats", type=_positive, default=3)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS,
                        help="which to run (default: all; the time-boxed GPU session runs omni_fast only)")
    from omni_fast.bench.harness import RESULTS_DIR

    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("the pipeline benchmark needs a GPU; running the CPU check instead")
        check()
        print("check: pass")
        return 0
    result = measure(args.concurrency, args.thinker_layers, args.repeats, providers=args.providers)
    folder = args.out / file_safe(torch.cuda.get_device_name())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pipeline.json").write_text(json.dumps(result, indent=1))
    (folder / "pipeline.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
