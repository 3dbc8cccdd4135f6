"""Issue 17 on the command line: every numeric or path option of ``omni-fast demo`` with a bad value is an argparse
error (exit 2, the message names the option), never a traceback. In-process and before any model is built (the
options are checked at parse time), so these are fast."""

import json

import pytest

from omni_fast.__main__ import main


def _refused(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", *argv])
    assert exc.value.code == 2
    return capsys.readouterr().err


NUMERIC = ["--max-new-tokens", "--talker-max-new-tokens", "--seconds"]


@pytest.mark.parametrize("option", NUMERIC)
@pytest.mark.parametrize("value", ["0", "-1", "-0.5", "nan", "inf", "-inf", "abc", "", "1e400", "10**9"])
def test_numeric_options_refused(option, value, capsys):
    err = _refused([option, value], capsys)
    assert f"argument {option}" in err and "Traceback" not in err


@pytest.mark.parametrize("option", ["--max-new-tokens", "--talker-max-new-tokens"])
@pytest.mark.parametrize("value", ["1.5", "100001", "2e3"])
def test_token_counts_are_bounded_integers(option, value, capsys):
    assert f"argument {option}" in _refused([option, value], capsys)


def test_seconds_bounded(capsys):
    assert "argument --seconds" in _refused(["--seconds", "3601"], capsys)


def test_checkpoint_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    err = _refused(["--checkpoint", str(f)], capsys)
    assert "argument --checkpoint" in err and "a file" in err


def test_checkpoint_dir_without_config(tmp_path, capsys):
    err = _refused(["--checkpoint", str(tmp_path)], capsys)
    assert "argument --checkpoint" in err and "config.json" in err


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", json.dumps({"talker_config": [1]})])
def test_checkpoint_with_malformed_config(tmp_path, capsys, content):
    (tmp_path / "config.json").write_text(content)
    err = _refused(["--checkpoint", str(tmp_path)], capsys)
    assert "argument --checkpoint" in err and "config.json" in err and "Traceback" not in err


@pytest.mark.parametrize("option", ["--out", "--raw-out"])
def test_output_in_a_missing_folder(tmp_path, option, capsys):
    err = _refused([option, str(tmp_path / "no" / "such" / "x.wav")], capsys)
    assert f"argument {option}" in err and "does not exist" in err


@pytest.mark.parametrize("option", ["--out", "--raw-out"])
def test_output_that_is_a_directory_or_empty(tmp_path, option, capsys):
    assert "is a directory" in _refused([option, str(tmp_path)], capsys)
    assert f"argument {option}" in _refused([option, ""], capsys)


def test_output_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert "argument --out" in _refused(["--out", str(tmp_path / "f" / "x.wav")], capsys)


def test_good_values_parse(tmp_path, monkeypatch):
    """The checks accept what they should: the demo itself is replaced (no model is built)."""
    from omni_fast import __main__ as cli

    seen = []
    monkeypatch.setattr(cli, "demo", lambda args: seen.append(args) or 0)
    assert main(["demo", "--max-new-tokens", "1", "--talker-max-new-tokens", "100000", "--seconds", "0.025",
                 "--out", str(tmp_path / "a.wav"), "--raw-out", str(tmp_path / "a.npy")]) == 0
    a = seen[0]
    assert (a.max_new_tokens, a.talker_max_new_tokens, a.seconds) == (1, 100000, 0.025)


def test_seconds_at_least_one_analysis_window(capsys):
    """Below one STFT window the pipeline refuses the waveform (a traceback after building the model, before)."""
    from omni_fast.__main__ import MIN_SECONDS
    from omni_fast.models.qwen3_omni import MIN_AUDIO_SAMPLES, SAMPLE_RATE_IN

    assert MIN_SECONDS == MIN_AUDIO_SAMPLES / SAMPLE_RATE_IN
    assert "argument --seconds" in _refused(["--seconds", "0.01"], capsys)
