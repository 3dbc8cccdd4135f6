"""The whole Qwen3-Omni pipeline (thinker -> talker -> MTP -> streaming Code2Wav) at concurrency 1, 4 and 6.

Two ways to run it:

- ``python -m bench pipeline`` (the harness): one Case per concurrency; providers ``omni_fast`` (the thin pipeline,
  patched: thinker/talker decode as CUDA-graph replays), ``omni_fast_eager_decode`` (patched, decode steps through
  transformers' text models), ``eager`` (the same pipeline on unpatched transformers modules), ``transformers`` and
  ``transformers_patched`` (transformers' own ``Qwen3OmniMoeForConditionalGeneration.generate``, greedy, unpatched
  and patched by ``omni_fast.patch``). The harness times a whole request batch per call.
- ``python -m bench.cases.pipeline [--concurrency 1 4 6] [--thinker-layers N] [--out DIR]``: the latency breakdown
  of the technical report per request (first audio packet, thinker/talker TTFT, MTP per frame, codec per code,
  tokens/s, RTF) next to the report's numbers, written as JSON + markdown under ``bench/results/<device>/``.

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
from pathlib import Path

import torch

from bench.case import Case
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

        thinker_layers = full_thinker_layers(torch.cuda.mem_get_info()[0] / 2 ** 30)
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


def _transformers_generate(pipe, n: int, patched: bool = False, sizes: tuple[int, int] | None = None):
    """transformers' own generate on the same prompts (text only: its processor is not available offline),
    unpatched or patched by ``omni_fast.patch``."""
    import omni_fast

    if patched and not getattr(pipe.model, "_omni_fast_patched", False):
        omni_fast.patch(pipe.model)
    elif not patched and getattr(pipe.model, "_omni_fast_patched", False):
        omni_fast.unpatch(pipe.model)
    text_tokens, frames = sizes or (TEXT_TOKENS, FRAMES)
    ids = torch.tensor([pipe.build_prompt(r, 0, 0) for r in _requests(1, 0.1)] * n, device=pipe.device)
    return pipe.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), thinker_max_new_tokens=text_tokens,
                               thinker_do_sample=False, talker_max_new_tokens=frames + 1, talker_do_sample=False,
                               speaker="ethan")


def _setup(concurrency: int, preset: str = "quick"):
    p = PRESETS[preset]
    sizes = p["sizes"]

    def setup(device):
        pipe = _tiny_pipeline(str(device)) if p["tiny"] else _pipeline(str(device))
        reqs = _requests(concurrency, p["audio_seconds"])
        fns = {"omni_fast": lambda: _run(pipe, reqs, True, sizes), "eager": lambda: _run(pipe, reqs, False, sizes),
               # patched, but thinker/talker decode through transformers' text models: what graph decode gains
               "omni_fast_eager_decode": lambda: _run(pipe, reqs, True, sizes, graph_decode=False),
               "transformers": lambda: _transformers_generate(pipe, concurrency, sizes=sizes),
               "transformers_patched": lambda: _transformers_generate(pipe, concurrency, patched=True, sizes=sizes)}
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
    text_tokens, frames = PRESETS[preset]["sizes"] or (TEXT_TOKENS, FRAMES)
    return [Case(op="pipeline", name=f"pipeline conc={c}", params={"concurrency": c, "text_tokens": text_tokens,
                                                                    "frames": frames,
                                                                    "model": "tiny" if PRESETS[preset]["tiny"]
                                                                    else "full"},
                 setup=_setup(c, preset), bytes=0.0, flops=0.0, bound="memory", check=check, tags=("e2e",))
            for c in CONCURRENCY[preset]]


# ------------------------------------------------------------------------------------------ report-style runner
def measure(concurrency=(1, 4, 6), thinker_layers: int | None = None, repeats: int = 3, pipe=None) -> dict:
    """Per-concurrency medians of the per-request timings, patched (omni_fast) and unpatched (eager).
    ``pipe``: a prebuilt pipeline (the tests pass the tiny one); default the full-shape one on the GPU."""
    pipe = pipe if pipe is not None else _pipeline("cuda", thinker_layers)
    device = torch.cuda.get_device_name() if pipe.device.type == "cuda" else str(pipe.device)
    out = {"device": device, "thinker_layers": getattr(pipe, "thinker_layers", None),
           "text_tokens": TEXT_TOKENS, "frames": FRAMES, "report": REPORT, "target": TARGET, "runs": []}
    for patched in (True, False):
        for c in concurrency:
            reqs = _requests(c)
            _run(pipe, reqs, patched)  # warm-up (Triton compile, autotune, allocator)
            rows = []
            for _ in range(repeats):
                rows += [r["timing"] for r in _run(pipe, reqs, patched)]
            med = lambda f: statistics.median(f(t) for t in rows)  # noqa: E731
            run = {"provider": "omni_fast" if patched else "eager", "concurrency": c,
                   "first_packet_ms": med(lambda t: t.first_packet * 1e3),
                   "preprocessing_ms": med(lambda t: t.preprocessing * 1e3),
                   "thinker_ttft_ms": med(lambda t: t.thinker_ttft * 1e3),
                   "talker_ttft_ms": med(lambda t: t.talker_ttft * 1e3),
                   "mtp_per_frame_ms": med(lambda t: t.mtp_per_frame * 1e3),
                   "codec_per_code_ms": med(lambda t: t.codec_per_code * 1e3),
                   "thinker_tokens_per_s": med(lambda t: t.thinker_tokens_per_s),
                   "talker_tokens_per_s": med(lambda t: t.talker_tokens_per_s), "rtf": med(lambda t: t.rtf)}
            out["runs"].append(run)
            print(json.dumps(run), flush=True)
    return out


def markdown(result: dict) -> str:
    keys = ["first_packet_ms", "preprocessing_ms", "thinker_ttft_ms", "talker_ttft_ms", "mtp_per_frame_ms",
            "codec_per_code_ms", "thinker_tokens_per_s", "talker_tokens_per_s", "rtf"]
    lines = [f"# Qwen3-Omni pipeline, random weights, {result['device']} (thinker {result['thinker_layers']} of 48 "
             f"layers; {result['text_tokens']} text tokens, {result['frames']} frames per request)", "",
             "| provider | conc | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for c, ref in REPORT.items():
        lines.append(f"| tech report | {c} | " + " | ".join(str(ref.get(k, "")) for k in keys) + " |")
    for r in result["runs"]:
        lines.append(f"| {r['provider']} | {r['concurrency']} | " + " | ".join(f"{r[k]:.3g}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cases.pipeline")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 6])
    parser.add_argument("--thinker-layers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("the pipeline benchmark needs a GPU; running the CPU check instead")
        check()
        print("check: pass")
        return 0
    result = measure(args.concurrency, args.thinker_layers, args.repeats)
    folder = args.out / file_safe(torch.cuda.get_device_name())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pipeline.json").write_text(json.dumps(result, indent=1))
    (folder / "pipeline.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
