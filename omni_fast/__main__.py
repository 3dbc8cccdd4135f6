"""``omni-fast`` / ``python -m omni_fast``: the command line.

``omni-fast demo`` runs the thin Qwen3-Omni pipeline (:class:`omni_fast.models.Qwen3Omni`) on a synthetic request
(a generated vowel-like spoken waveform and a text prompt), streams the text, writes the speech to a WAV file and
prints the latency table and where each stage's time went. Without ``--checkpoint`` the model has random weights:
the tiny one on a CPU, the 30B-A3B shapes on a GPU with the memory for them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import wave

import torch

from .backend import triton_interpreter_enabled


def synthetic_speech(seconds: float = 2.0, rate: int = 16000, seed: int = 0) -> torch.Tensor:
    """A spoken-like test waveform ``[rate * seconds]`` float32 in [-1, 1]: a glottal-like harmonic source (f0
    ~120 Hz with intonation and vibrato) filtered by moving vowel formants (/a/ -> /i/ -> /u/ ...), cut into
    syllables by a ~4 Hz amplitude envelope, with a little breath noise."""
    gen = torch.Generator().manual_seed(seed)
    n = int(rate * seconds)
    t = torch.arange(n, dtype=torch.float64) / rate
    f0 = 120 + 15 * torch.sin(2 * math.pi * 0.4 * t) + 2 * torch.sin(2 * math.pi * 5.5 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / rate
    vowels = torch.tensor([[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240], [530, 1840, 2480]],
                          dtype=torch.float64)  # /a/ /i/ /u/ /e/ formants (Hz)
    syllable = (t * 4).long() % len(vowels)
    formants = vowels[syllable]  # [n, 3]
    signal = torch.zeros(n, dtype=torch.float64)
    for h in range(1, 34):  # harmonics up to ~4 kHz, each weighted by the formant resonances at its frequency
        fh = h * f0
        gain = sum(1.0 / (1.0 + ((fh - formants[:, k]) / (80.0 + 40 * k)) ** 2) for k in range(3))
        signal += gain * torch.sin(h * phase) / h ** 0.7
    envelope = torch.sin(math.pi * (t * 4 % 1.0)).clamp_min(0) ** 0.6
    envelope *= (t > 0.15) & (t < seconds - 0.1)
    signal = signal * envelope + 0.01 * torch.randn(n, generator=gen, dtype=torch.float64)
    return (0.5 * signal / signal.abs().max().clamp_min(1e-9)).float()


def write_wav(path: str, audio: torch.Tensor, rate: int = 24000) -> None:
    """``audio [S]`` float in [-1, 1] -> 16-bit mono PCM WAV (stdlib ``wave``); samples outside [-1, 1] clip.

    Non-finite samples raise ValueError and nothing is written (a NaN would silently become a sample value; the
    demo passes its waveform through :func:`listenable` first, which zeroes them and says so)."""
    if not bool(torch.isfinite(audio).all()):
        bad = int((~torch.isfinite(audio)).sum())
        raise ValueError(f"audio has {bad} non-finite (NaN/inf) samples: not writing {path} (non-finite Code2Wav "
                         f"weights? Qwen3Omni.from_pretrained(check_finite=True) refuses them at load)")
    pcm = (audio.detach().float().clamp(-1, 1) * 32767).round().to(torch.int16).cpu().numpy().tobytes()
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm)


SAFE_PEAK_DBFS = -3.0


def listenable(audio: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """``audio [S]`` float -> (a version safe to play, a note on what was changed or None).

    Non-finite samples become 0 (a NaN in the weights would otherwise give a NaN file). A waveform that reaches full
    scale (Code2Wav clamps its output to [-1, 1], so a decode that clipped sits at +-1: random weights give
    full-scale noise, ~98 % of samples clipped) is peak-normalised to -3 dBFS; one below full scale is written as
    decoded.
    """
    audio = audio.detach().float()
    notes = []
    finite = torch.isfinite(audio)
    if not bool(finite.all()):
        notes.append(f"{int((~finite).sum())} non-finite samples set to 0")
        audio = torch.where(finite, audio, torch.zeros_like(audio))
    peak = float(audio.abs().max()) if audio.numel() else 0.0
    if peak >= 1.0:
        clipped = float((audio.abs() >= 1.0).float().mean()) * 100
        audio = audio * (10 ** (SAFE_PEAK_DBFS / 20) / peak)
        notes.append(f"the decode reaches full scale (peak {peak:.2f}, {clipped:.0f} % of samples clipped): "
                     f"peak-normalised to {SAFE_PEAK_DBFS:g} dBFS")
    return audio, ("; ".join(notes) or None)


def demo_speakers(args) -> list[str]:
    """The speaker names the demo's model knows: the checkpoint's ``talker_config.speaker_id`` (read from its
    config.json), else the random preset's."""
    from .models.presets import preset_speakers

    if getattr(args, "model", "qwen3-omni") == "qwen2.5-omni":  # spk_dict.pt voices, else the random pair
        if not args.checkpoint:
            return ["chelsie", "ethan"]
        path = os.path.join(args.checkpoint, "spk_dict.pt")
        return sorted(k.lower() for k in torch.load(path, weights_only=True)) if os.path.isfile(path) else []
    if args.checkpoint:
        import json

        with open(os.path.join(args.checkpoint, "config.json")) as f:
            talker = json.load(f).get("talker_config") or {}
        return sorted(talker.get("speaker_id") or {})
    return preset_speakers()


def _pick_model(args):
    from .models import Qwen3Omni, Qwen25Omni

    patch = args.backend != "none"
    backend = None if args.backend in ("auto", "none") else args.backend
    if getattr(args, "model", "qwen3-omni") == "qwen2.5-omni":  # (callers building args by hand may omit it)
        if args.checkpoint:
            return (Qwen25Omni.from_pretrained(args.checkpoint, patch=patch, backend=backend),
                    "Qwen2.5-Omni checkpoint " + args.checkpoint)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return Qwen25Omni.random("tiny", device=device, patch=patch, backend=backend), \
            "tiny random-weight Qwen2.5-Omni"
    if args.checkpoint:
        return Qwen3Omni.from_pretrained(args.checkpoint, patch=patch, backend=backend), "checkpoint " + args.checkpoint
    tiny = "tiny random-weight Qwen3-Omni"
    if not torch.cuda.is_available() or args.preset == "tiny":
        return Qwen3Omni.random("tiny", device="cpu" if not torch.cuda.is_available() else "cuda", patch=patch,
                                backend=backend), tiny
    from .models.presets import FULL_MIN_FREE_GIB, full_thinker_layers

    free = torch.cuda.mem_get_info()[0] / 2 ** 30
    layers = full_thinker_layers(free)  # trims only the thinker's depth when memory is short
    if layers == 0:  # not even one thinker layer with the rest of the real shapes: the tiny model instead
        print(f"full shapes do not fit: {free:.1f} GiB free on the GPU, the smallest full build (1 thinker layer) "
              f"needs ~{FULL_MIN_FREE_GIB:.1f} GiB; running the tiny model instead")
        return Qwen3Omni.random("tiny", device="cuda", patch=patch, backend=backend), tiny + " (full shapes do not fit)"
    pipe = Qwen3Omni.random("full", device="cuda", thinker_layers=layers, patch=patch, backend=backend)
    what = "Qwen3-Omni-30B-A3B shapes, random weights" + (f" (thinker trimmed to {layers} of 48 layers: "
                                                          f"{free:.0f} GiB free)" if layers else "")
    return pipe, what


def demo(args) -> int:
    """The ``demo`` subcommand: build the pipeline ``args`` asks for (checkpoint or random weights), stream one
    synthetic spoken request through it (text to stdout), write the speech to ``args.out`` (a 24 kHz 16-bit mono
    WAV; ``args.raw_out``: the raw fp32 waveform as .npy) and print the latency table. Returns the exit code (0)."""
    from transformers.utils import logging as hf_logging

    from .models import Request

    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    pipe, what = _pick_model(args)
    build = time.perf_counter() - t0
    on_gpu = pipe.device.type == "cuda"
    if pipe.tokenizer is None:  # a weights-only checkpoint directory: no tokenizer files next to the weights
        from .models.qwen3_omni import ByteTokenizer

        pipe.tokenizer = ByteTokenizer(min(pipe.config.thinker_config.text_config.vocab_size - 32, 151000))
        print("no tokenizer in the checkpoint directory: using a byte-level stand-in (the text will be noise)")
    print(f"omni-fast demo: {what} on {pipe.device} ({build:.1f} s to build)")
    if not pipe.has_talker:
        print("this checkpoint has no talker (enable_audio_output=False): text only, the WAV file stays empty")
    if pipe.patch_report is not None:
        if args.verbose:
            print(pipe.patch_report)
        else:
            print(f"patched by omni_fast.patch: {len(pipe.patch_report.replaced)} replacements, "
                  f"{len(pipe.patch_report.left)} items left as transformers wrote them (--verbose lists them)")
    else:
        print("unpatched: plain transformers modules")
    if not on_gpu:
        print("NOTE: CPU run. The timings below show where time goes in this run; they are NOT speed numbers "
              "(no GPU, tiny model" + (", Triton interpreter" if triton_interpreter_enabled() else "")
              + ").")
    wave_in = synthetic_speech(args.seconds)
    req = Request(text=args.prompt, audio=wave_in)
    print(f"input: {args.seconds:.1f} s synthetic spoken-like waveform (16 kHz) + prompt {args.prompt!r}")
    print("text: ", end="", flush=True)
    audio, timing = [], None
    min_frames = getattr(args, "talker_min_new_tokens", None)  # callers building args by hand may omit it
    if min_frames is None:
        min_frames = 0 if args.checkpoint else min(RANDOM_MIN_FRAMES, args.talker_max_new_tokens - 1)
    for ev in pipe.stream(req, max_new_tokens=args.max_new_tokens, talker_max_new_tokens=args.talker_max_new_tokens,
                          talker_min_new_tokens=min_frames,
                          speaker=args.speaker):
        if ev.kind == "text":
            print(ev.text if ev.text is not None else ev.token_ids, end="", flush=True)
        elif ev.kind == "audio":
            audio.append(ev.audio)
        else:
            timing = ev.timing
    print("" if args.checkpoint else "   (random weights: the text and the speech are noise)")
    wav = torch.cat(audio) if audio else torch.zeros(0)
    if args.raw_out:
        import numpy as np

        np.save(args.raw_out, wav.detach().float().cpu().numpy())
        print(f"wrote {args.raw_out}: the raw decoded waveform, float32 [{wav.numel()}], not normalised")
    safe, note = listenable(wav)
    write_wav(args.out, safe)
    print(f"wrote {args.out}: {wav.numel() / 24000:.2f} s of 24 kHz 16-bit mono audio ({len(audio)} streamed chunks)")
    if note:
        print(f"  level: {note}" + ("" if args.checkpoint else " (random weights: the speech is noise)"))
    if not audio:  # (an empty WAV said nothing about why)
        print(f"  no speech: the talker made no codec frame (it stopped at once, or --talker-max-new-tokens "
              f"{args.talker_max_new_tokens} allows at most {args.talker_max_new_tokens - 1})")
    print(_latency_table(timing, on_gpu))
    return 0


REPORT = {"preprocessing": 72, "thinker TTFT": 88, "talker TTFT": 57, "MTP per frame": 14, "codec per code": 3,
          "first audio packet": 234, "thinker tokens/s": 75, "talker tokens/s": 140, "RTF": 0.47}
# Per model family: (the reference column's heading, the published numbers by row). Qwen3-Omni: its technical
# report's single-concurrency budget (/work/shared/qwen-omni-facts.md). Qwen2.5-Omni publishes no per-stage latency:
# its column is "-" throughout (no number is made up).
REFERENCES = {"qwen3-omni": ("vs technical report (conc. 1)", REPORT),
              "qwen2.5-omni": ("reference: - (Qwen2.5-Omni publishes no per-stage latency)", {})}


def _latency_table(t, on_gpu: bool) -> str:
    """The request's latency rows (its family's: ``t.table()``) beside the published numbers where they exist,
    then the batch's stage split."""
    heading, report = REFERENCES.get(t.family, REFERENCES["qwen3-omni"])
    lines = ["", "latency (this run" + ("" if on_gpu else ", CPU: not speed") + ")   " + heading]
    for name, value in t.table():
        ref = report.get(name)
        ref_s = ("" if report else "-") if ref is None else (f"{ref} ms" if "ms" in value else f"{ref}")
        lines.append(f"  {name:<20} {value:>14}   {ref_s}")
    total = sum(t.stages.values()) or 1.0
    lines += ["", f"where the time went ({t.total * 1e3:.1f} ms wall, stages run interleaved):"]
    width = max([16, *map(len, t.stages)])
    for name, sec in sorted(t.stages.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<{width}} {sec * 1e3:9.1f} ms  {100 * sec / total:5.1f} %  " + "#" * int(40 * sec / total))
    return "\n".join(lines)


# Bounds of the demo's numeric options: generous, but a typo (an extra zero or three) cannot ask for hours of
# decoding or gigabytes of synthetic input.
MAX_NEW_TOKENS = 100_000
MAX_SECONDS = 3600.0
# A random-weight talker often picks a stop code first (the tiny Qwen2.5-Omni one does, greedily): the demo asks for
# a few codec frames first (Qwen3-Omni: ~1 s at 12.5 frames per second) so every stage, the vocoder included, runs.
RANDOM_MIN_FRAMES = 12
# The shortest input the pipeline takes: one STFT window (models.qwen3_omni.MIN_AUDIO_SAMPLES at 16 kHz; not imported
# here, that module pulls in transformers).
MIN_SECONDS = 400 / 16000


def _positive_int(maximum: int, minimum: int = 1):
    """argparse ``type=``: an integer in [minimum, maximum] (argparse names the option in its error, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r} (an integer in [{minimum}, {maximum}])"
                                             ) from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be an integer in [{minimum}, {maximum}], got {value}")
        return value
    return parse


def _positive_seconds(text: str) -> float:
    """argparse ``type=``: a finite number of seconds in [MIN_SECONDS, MAX_SECONDS]; nan and inf are refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r} (a number of seconds)") from None
    if not (math.isfinite(value) and MIN_SECONDS <= value <= MAX_SECONDS):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds in [{MIN_SECONDS:g}, {MAX_SECONDS:g}] "
                                         f"(at least one 25 ms analysis window), got {text!r}")
    return value


def _output_file(text: str) -> str:
    """argparse ``type=``: a file path that can be written: not empty, not a directory, in an existing, writable
    folder (checked before the model is built, so a typo does not cost a whole run)."""
    if not text:
        raise argparse.ArgumentTypeError("must be a file path, got an empty string")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file path")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder of {text!r} does not exist ({folder})")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"the folder of {text!r} is not writable ({folder})")
    return text


def _checkpoint_dir(text: str) -> str:
    """argparse ``type=``: a local checkpoint directory holding a config.json (nothing is downloaded)."""
    if not (os.path.isdir(text) and os.path.isfile(os.path.join(text, "config.json"))):
        what = "a file" if os.path.isfile(text) else "missing" if not os.path.exists(text) else "without a config.json"
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory with a config.json ({what}; a local "
                                         "transformers-format checkpoint; nothing is downloaded)")
    return text


def main(argv: list[str] | None = None) -> int:
    """The ``omni-fast`` command line (``argv``: the arguments, default ``sys.argv[1:]``): parse and check the
    arguments (a bad one exits through argparse), re-run under the Triton interpreter when ``--backend triton`` has
    no GPU, then run the subcommand. Returns the process exit code."""
    parser = argparse.ArgumentParser(prog="omni-fast", description="omni-fast: fast Qwen-Omni inference")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="stream speech from the Qwen3-Omni pipeline on a synthetic request")
    d.add_argument("--model", default="qwen3-omni", choices=["qwen3-omni", "qwen2.5-omni"],
                   help="model family (qwen2.5-omni: thinker, talker, Token2Wav; random weights: the tiny preset)")
    d.add_argument("--checkpoint", type=_checkpoint_dir,
                   help="local transformers-format Qwen3-Omni checkpoint directory (real weights)")
    d.add_argument("--backend", default="auto", choices=["auto", "triton", "cuda", "reference", "none"],
                   help="omni-fast kernel backend; 'none' runs transformers unpatched, to compare")
    d.add_argument("--preset", default="auto", choices=["auto", "tiny", "full"],
                   help="random-weight model without --checkpoint (auto: full on a GPU with the memory, else tiny)")
    d.add_argument("--out", default="out.wav", type=_output_file, help="output WAV path (24 kHz, 16-bit mono)")
    d.add_argument("--max-new-tokens", type=_positive_int(MAX_NEW_TOKENS), default=24, help="thinker text tokens")
    d.add_argument("--talker-max-new-tokens", type=_positive_int(MAX_NEW_TOKENS), default=40,
                   help="talker codec tokens: at most this - 1 frames of speech, as transformers' "
                        "talker_max_new_tokens (12.5 frames per second)")
    d.add_argument("--talker-min-new-tokens", type=_positive_int(MAX_NEW_TOKENS, minimum=0), default=None,
                   help="no stop before this many codec tokens (transformers' talker_min_new_tokens; default: "
                        f"{RANDOM_MIN_FRAMES} (at most --talker-max-new-tokens - 1) with random weights, whose talker "
                        "may stop at once, 0 with --checkpoint)")
    d.add_argument("--prompt", default="Please answer in a friendly voice: what did I just say?")
    d.add_argument("--seconds", type=_positive_seconds, default=2.0, help="length of the synthetic input waveform")
    d.add_argument("--raw-out", metavar="PATH", type=_output_file,
                   help="also save the raw decoded waveform (float32 .npy, not normalised; the WAV is made safe to "
                        "play: peak-normalised to -3 dBFS when the decode is over full scale)")
    d.add_argument("--speaker", default="ethan", type=str.lower,
                   help="voice: " + ", ".join(_preset_speakers()) + " (random weights); with --checkpoint, the "
                        "names in its config.json (talker_config.speaker_id)")
    d.add_argument("--verbose", action="store_true", help="print the omni_fast.patch report")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.backend == "cuda" and not torch.cuda.is_available():
            d.error("--backend cuda needs a CUDA GPU (use triton, reference or auto on a CPU)")
        if args.model == "qwen2.5-omni" and args.preset == "full" and not args.checkpoint:
            d.error("--preset full: the Qwen2.5-Omni demo has only the tiny random preset (or --checkpoint)")
        if args.preset == "full" and not args.checkpoint and not torch.cuda.is_available():
            d.error("--preset full needs a CUDA GPU (the 30B-A3B shapes); use --preset tiny on a CPU")
        try:
            speakers = demo_speakers(args)
        except (OSError, ValueError, TypeError, AttributeError) as e:  # unreadable / malformed config.json
            d.error(f"argument --checkpoint: cannot read the speakers from {args.checkpoint}/config.json "
                    f"({type(e).__name__}: {e})")
        if speakers and args.speaker not in speakers:
            d.error(f"argument --speaker: invalid choice {args.speaker!r} (choose from {', '.join(speakers)})")
    if args.command == "demo" and args.backend == "triton" and not torch.cuda.is_available() \
            and not triton_interpreter_enabled():
        return _rerun_with_interpreter(sys.argv[1:] if argv is None else argv)
    if args.command == "demo":
        return demo(args)
    return 2


def _preset_speakers() -> list[str]:
    from .models.presets import preset_speakers

    return preset_speakers()


def _rerun_with_interpreter(argv: list[str]) -> int:
    """``--backend triton`` on a CPU: the kernels must run on Triton's interpreter, which is chosen from
    ``TRITON_INTERPRET`` when triton is imported and its kernels are decorated. ``import omni_fast`` has already
    imported triton by the time this runs (``python -m omni_fast`` imports the package first), so setting the
    variable here would be too late: the command runs again in a fresh interpreter with it set."""
    import subprocess

    print("--backend triton on a CPU: re-running with TRITON_INTERPRET=1 (Triton's CPU interpreter)", flush=True)
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.call([sys.executable, "-m", "omni_fast", *argv], env=env)


if __name__ == "__main__":
    sys.exit(main())
