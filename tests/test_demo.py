"""``python -m omni_fast demo`` on a CPU: the tiny random-weight pipeline end to end, writing a valid WAV file."""

import os
import subprocess
import sys
import wave

import pytest

pytest.importorskip("transformers")


def _cpu_env() -> dict:
    """The demo as a user runs it on a CPU: the tiny model, no Triton interpreter (the suite's conftest sets it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the tree under test first on the path (the demo runs from another folder), whatever else is installed
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return dict(env, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=path)


def test_demo_writes_wav(tmp_path):
    out = tmp_path / "out.wav"
    env = _cpu_env()
    proc = subprocess.run(
        [sys.executable, "-m", "omni_fast", "demo", "--out", str(out), "--max-new-tokens", "6",
         "--talker-max-new-tokens", "12", "--seconds", "1.0", "--verbose"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "NOT speed" in text and "first audio packet" in text and "where the time went" in text
    assert "omni-fast patch report" in text
    with wave.open(str(out), "rb") as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (1, 2, 24000)
        assert f.getnframes() > 0
        assert len(f.readframes(f.getnframes())) == 2 * f.getnframes()


def test_demo_without_speech_says_why(tmp_path):
    """``--talker-max-new-tokens 1`` allows no frame (transformers' rule: at most N - 1): the demo wrote an empty
    WAV and said nothing about it."""
    out = tmp_path / "out.wav"
    proc = subprocess.run(
        [sys.executable, "-m", "omni_fast", "demo", "--out", str(out), "--max-new-tokens", "1",
         "--talker-max-new-tokens", "1", "--seconds", "0.5"],
        capture_output=True, text=True, timeout=120, env=_cpu_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no speech: the talker made no codec frame" in proc.stdout and "allows at most 0" in proc.stdout


def test_synthetic_speech_and_wav_writer(tmp_path):
    import torch

    from omni_fast.__main__ import synthetic_speech, write_wav

    x = synthetic_speech(0.5)
    assert x.shape == (8000,) and x.dtype == torch.float32 and x.abs().max() <= 0.5 + 1e-6
    assert x[:1000].abs().max() < 0.1 < x.abs().max()  # silence, then voiced syllables
    write_wav(str(tmp_path / "a.wav"), x, rate=16000)
    with wave.open(str(tmp_path / "a.wav"), "rb") as f:
        assert f.getnframes() == 8000 and f.getframerate() == 16000


def test_cli_requires_a_command():
    from omni_fast.__main__ import main

    with pytest.raises(SystemExit):
        main([])


def test_demo_with_checkpoint_dir(tmp_path):
    """``--checkpoint DIR``: a local transformers-format directory (here the tiny model, saved; no tokenizer)."""
    from omni_fast.models import Qwen3Omni

    Qwen3Omni.random("tiny", patch=False).model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "answer.wav"
    env = _cpu_env()
    proc = subprocess.run(
        [sys.executable, "-m", "omni_fast", "demo", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out),
         "--max-new-tokens", "4", "--talker-max-new-tokens", "6", "--seconds", "0.5", "--backend", "none"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint" in proc.stdout and "unpatched" in proc.stdout and "byte-level stand-in" in proc.stdout
    with wave.open(str(out), "rb") as f:
        assert f.getframerate() == 24000 and f.getnframes() > 0


@pytest.mark.parametrize("argv,match", [
    (["demo", "--checkpoint", "/no/such/dir"], "not a directory with a config.json"),
    (["demo", "--backend", "bogus"], "invalid choice"),
    (["demo", "--talker-min-new-tokens", "-1"], "--talker-min-new-tokens: must be an integer in [0, "),
    (["demo", "--talker-min-new-tokens", "x"], "--talker-min-new-tokens: invalid int value: 'x' (an integer in [0, "),
])
def test_demo_rejects_bad_arguments(argv, match, capsys):
    from omni_fast.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and match in capsys.readouterr().err


def test_demo_triton_backend_on_cpu_runs_on_the_interpreter(tmp_path):
    """``--backend triton`` on a CPU: ``import omni_fast`` has imported triton before the command line is read, so
    the demo re-runs itself with ``TRITON_INTERPRET=1`` (setting it in-process crashed in Triton at the first
    kernel). Smallest settings: one text token and the talker's prefill only (no codec frame: the vocoder's 1920x
    upsampling takes ~17 s per frame on the interpreter); the thinker's and talker's MoE, RoPE and attention
    kernels run on the interpreter."""
    out = tmp_path / "t.wav"
    proc = subprocess.run(
        [sys.executable, "-m", "omni_fast", "demo", "--backend", "triton", "--out", str(out), "--max-new-tokens", "1",
         "--talker-max-new-tokens", "1", "--seconds", "0.1", "--prompt", "hi"],
        capture_output=True, text=True, timeout=240, env=_cpu_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "re-running with TRITON_INTERPRET=1" in proc.stdout and "Triton interpreter" in proc.stdout
    assert "replacements" in proc.stdout and "talker TTFT" in proc.stdout
    with wave.open(str(out), "rb") as f:
        assert f.getframerate() == 24000


@pytest.mark.parametrize("free_gib,want", [(8.0, ("tiny", None)), (30.0, ("full", 12)), (100.0, ("full", None))])
def test_demo_falls_back_to_tiny_when_full_shapes_do_not_fit(monkeypatch, capsys, free_gib, want):
    """On a GPU the demo builds the full shapes with as many thinker layers as fit, and the tiny model (saying
    why) when not even one layer does (the minimal full build is ~11.2 GiB of weights)."""
    import argparse

    import torch

    from omni_fast import __main__ as cli
    from omni_fast.models import Qwen3Omni

    built = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(free_gib * 2 ** 30), 80 * 2 ** 30))
    monkeypatch.setattr(Qwen3Omni, "random", classmethod(
        lambda cls, preset, **kw: built.append((preset, kw.get("thinker_layers"), kw["device"])) or "pipe"))
    args = argparse.Namespace(checkpoint=None, backend="none", preset="auto")
    pipe, what = cli._pick_model(args)
    assert built == [(*want, "cuda")]
    if want[0] == "tiny":
        assert "full shapes do not fit" in capsys.readouterr().out and "tiny" in what


def test_demo_with_a_text_only_checkpoint(tmp_path, capsys):
    """A checkpoint without a talker (``enable_audio_output=False``): the demo streams the text, says there is no
    audio and writes an empty WAV (in-process: cheap)."""
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3

    from omni_fast.__main__ import main
    from omni_fast.models.presets import tiny_qwen3_omni_config

    cfg = tiny_qwen3_omni_config()
    cfg.enable_audio_output = False
    q3.Qwen3OmniMoeForConditionalGeneration._from_config(cfg).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "text.wav"
    assert main(["demo", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--max-new-tokens", "3",
                 "--seconds", "0.5", "--backend", "none"]) == 0
    text = capsys.readouterr().out
    assert "no talker" in text and "thinker TTFT" in text and "0 streamed chunks" in text
    with wave.open(str(out), "rb") as f:
        assert f.getnframes() == 0


def test_listenable_normalises_clipping_and_drops_non_finite():
    import torch

    from omni_fast.__main__ import SAFE_PEAK_DBFS, listenable

    quiet = torch.tensor([0.1, -0.99, 0.25])
    same, note = listenable(quiet)
    assert note is None and torch.equal(same, quiet)  # within full scale: written as decoded
    loud = torch.tensor([3.0, -6.0, 0.5, float("nan")])
    safe, note = listenable(loud)
    assert torch.isfinite(safe).all() and safe[3] == 0
    assert abs(float(safe.abs().max()) - 10 ** (SAFE_PEAK_DBFS / 20)) < 1e-6
    assert "non-finite" in note and "-3 dBFS" in note
    empty, note = listenable(torch.zeros(0))
    assert empty.numel() == 0 and note is None


def test_unknown_speaker_is_an_argparse_error(capsys):
    from omni_fast.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--speaker", "nobody"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--speaker" in err and "nobody" in err and "aiden, chelsie, ethan" in err


def test_help_lists_speakers(capsys):
    from omni_fast.__main__ import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "aiden, chelsie, ethan" in out and "--raw-out" in out


def test_demo_random_weights_wav_is_safe_and_raw_kept(tmp_path):
    import numpy as np

    out, raw = tmp_path / "out.wav", tmp_path / "raw.npy"
    proc = subprocess.run(
        [sys.executable, "-m", "omni_fast", "demo", "--out", str(out), "--raw-out", str(raw), "--max-new-tokens", "2",
         "--talker-max-new-tokens", "6", "--seconds", "0.5", "--speaker", "Chelsie"],
        capture_output=True, text=True, timeout=120, env=_cpu_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    decoded = np.load(raw)
    with wave.open(str(out), "rb") as f:
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16)
    assert pcm.size == decoded.size > 0
    clipped = np.mean(np.abs(pcm) >= 32767)
    assert clipped < 0.01  # random weights decode to full-scale noise; the file is normalised, not clipped
    if np.abs(decoded).max() >= 1:
        assert "peak-normalised to -3 dBFS" in proc.stdout


def test_demo_qwen2_5_omni_writes_wav(tmp_path):
    """``--model qwen2.5-omni``: the tiny random Qwen2.5-Omni (thinker, talker, Token2Wav) end to end on the CPU."""
    out = tmp_path / "out.wav"
    proc = subprocess.run(
        [sys.executable, "-m", "omni_fast", "demo", "--model", "qwen2.5-omni", "--out", str(out),
         "--max-new-tokens", "4", "--talker-max-new-tokens", "6", "--seconds", "0.5", "--verbose"],
        capture_output=True, text=True, timeout=120, env=_cpu_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "Qwen2.5-Omni" in text and "NOT speed" in text and "first audio packet" in text
    assert "Qwen2_5OmniTalkerModel: decode steps" in text  # the patch report
    # its own latency rows (no MTP, no Code2Wav), no Qwen3-Omni report numbers
    assert "DiT solve per code" in text and "BigVGAN per code" in text and "talker per code" in text
    assert "MTP per frame" not in text and "codec per code" not in text and "technical report" not in text
    with wave.open(str(out), "rb") as f:
        assert f.getframerate() == 24000 and f.getnframes() > 0


def test_demo_qwen2_5_omni_checkpoint_dir(tmp_path):
    """``--model qwen2.5-omni --checkpoint DIR``: the tiny model saved with its voices (spk_dict.pt)."""
    import torch

    from omni_fast.models import Qwen25Omni

    pipe = Qwen25Omni.random(patch=False)
    pipe.model.save_pretrained(tmp_path / "ckpt")
    torch.save(pipe.speakers, tmp_path / "ckpt" / "spk_dict.pt")
    out = tmp_path / "a.wav"
    argv = [sys.executable, "-m", "omni_fast", "demo", "--model", "qwen2.5-omni", "--checkpoint",
            str(tmp_path / "ckpt"), "--out", str(out), "--max-new-tokens", "3", "--talker-max-new-tokens", "4",
            "--seconds", "0.5", "--backend", "none"]
    proc = subprocess.run(argv + ["--speaker", "chelsie"], capture_output=True, text=True, timeout=120,
                          env=_cpu_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Qwen2.5-Omni checkpoint" in proc.stdout and "unpatched" in proc.stdout
    with wave.open(str(out), "rb") as f:
        assert f.getnframes() > 0
    bad = subprocess.run(argv + ["--speaker", "nobody"], capture_output=True, text=True, timeout=60,
                         env=_cpu_env(), cwd=tmp_path)
    assert bad.returncode == 2 and "argument --speaker: invalid choice 'nobody'" in bad.stderr


QWEN3_ONLY_ROWS = {"MTP per frame", "codec per code"}


def test_latency_table_qwen2_5_omni_has_its_own_rows_each_timed_by_the_run():
    """The Qwen2.5-Omni table: its own stages (talker per code, Token2Wav per code and its two parts), no Qwen3-Omni
    rows, every time row a timing from the run, and "-" for the reference (no published per-stage latency)."""
    import torch

    from omni_fast.__main__ import _latency_table
    from omni_fast.models import Qwen25Omni, Request

    pipe = Qwen25Omni.random(patch=False)
    torch.manual_seed(0)
    out = pipe.generate([Request(text=[5, 6, 7])], max_new_tokens=4, talker_max_new_tokens=5,
                        talker_min_new_tokens=4, speaker="chelsie")[0]
    t = out["timing"]
    assert t.family == "qwen2.5-omni" and t.frames > 0 and set(t.codec_parts) == {"DiT solve", "BigVGAN"}
    rows = dict(t.table())
    assert not QWEN3_ONLY_ROWS & set(rows)
    assert {"talker per code", "Token2Wav per code", "DiT solve per code", "BigVGAN per code"} <= set(rows)
    for name, value in rows.items():  # every time / rate row holds a number this run measured (not a default 0)
        if value.endswith(" ms") or name.endswith("tokens/s") or name == "RTF":
            assert float(value.split()[0]) > 0, (name, value)
    # the parts are read inside the codec's own clock: their sum is at most its time
    assert sum(t.codec_parts.values()) <= t.codec_per_code
    assert {"Token2Wav DiT solve", "Token2Wav BigVGAN", "Token2Wav other", "codec embedding"} <= set(t.stages)
    assert min(t.stages[s] for s in ("Token2Wav DiT solve", "Token2Wav BigVGAN", "Token2Wav other")) >= 0
    assert not {"MTP", "Code2Wav", "Token2Wav"} & set(t.stages)
    text = _latency_table(t, on_gpu=False)
    assert "Qwen2.5-Omni publishes no per-stage latency" in text
    table = text.split("where the time went")[0].strip().splitlines()[1:]
    assert len(table) == len(rows) and all(line.rstrip().endswith("   -") for line in table)


def test_latency_table_qwen3_omni_rows_and_report_numbers_unchanged():
    """Qwen3-Omni's table keeps its rows and the technical report's numbers beside them."""
    from omni_fast.__main__ import _latency_table
    from omni_fast.pipeline.requests import RequestTiming

    t = RequestTiming(preprocessing=0.01, thinker_ttft=0.02, mtp_per_frame=0.003, codec_per_code=0.001, total=0.1,
                      stages={"thinker prefill": 0.02, "MTP": 0.01, "Code2Wav": 0.01})
    assert t.family == "qwen3-omni" and not t.codec_parts
    assert [name for name, _ in t.table()] == [
        "preprocessing", "thinker TTFT", "talker TTFT", "MTP per frame", "codec per code", "first audio packet",
        "last audio packet", "thinker tokens/s", "talker tokens/s", "RTF", "text tokens", "codec frames", "audio",
        "total"]
    lines = _latency_table(t, on_gpu=True).splitlines()
    assert lines[1] == "latency (this run)   vs technical report (conc. 1)"
    rows = {line[2:22].strip(): line for line in lines[2:16]}
    assert rows["MTP per frame"].endswith("   14 ms") and rows["codec per code"].endswith("   3 ms")
    assert rows["RTF"].endswith("   0.47") and rows["text tokens"].endswith("   ")
    assert "  thinker prefill       20.0 ms" in "\n".join(lines)  # the stage column keeps its width
