"""`qn info` and `qn model summary`, run in-process through the console script's main."""

import json

import pytest

from qn_cli.main import main


def test_model_summary_json_pins_quartznet_15x5(capsys):
    assert main(["model", "summary", "--preset", "quartznet_15x5", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"params": 18924381' in out
    summary = json.loads(out)
    assert summary["params"] == 18_924_381
    assert summary["macs_per_second"] > 0 and summary["subsampling"] == 2
    assert summary["output_frame_ms"] == 20 and summary["vocabulary_size"] == 29


def test_model_summary_text_pins_quartznet_5x5(capsys):
    assert main(["model", "summary", "--preset", "quartznet_5x5"]) == 0
    out = capsys.readouterr().out
    assert "quartznet_5x5: 6,713,181 parameters" in out
    assert "multiply-accumulates per second of audio" in out
    assert main(["model", "presets"]) == 0
    assert "quartznet_15x5" in capsys.readouterr().out.split()


def test_unknown_preset_exits_2_with_one_clear_line(capsys):
    assert main(["model", "summary", "--preset", "quartznet_99x5", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert "Unknown preset 'quartznet_99x5'" in lines[0] and "quartznet_15x5" in lines[0]


def test_info_json_lists_the_stack(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["tensorflow"] == "2.15.1"
    assert info["versions"]["tensorflow-addons"] == "0.23.0"
    assert info["versions"]["tensorflow-model-optimization"] == "0.7.5"
    assert info["tf_keras_version"] == "2.15.0 (keras)"
    assert any(d["type"] == "CPU" for d in info["devices"])


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    from qn_cli.main import run_command
    from qn_keras.errors import UserInputError
    from qn_keras.training.config import ConfigError

    def fails_with(error):
        def command(args):
            raise error

        return command

    assert run_command("x", fails_with(UserInputError("--flag must be > 0")), None) == 2
    assert capsys.readouterr().err == "qn x: error: --flag must be > 0\n"
    assert run_command("x", fails_with(ConfigError("model: unknown argument")), None) == 2
    with pytest.raises(ValueError, match="internal"):  # a bug: not swallowed into one line
        run_command("x", fails_with(ValueError("internal")), None)
