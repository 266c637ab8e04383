"""CLI: help lists the pipeline, bad input gives one stderr line and a non-zero exit."""

from __future__ import annotations

from click.testing import CliRunner

from rys_forge.cli import main


def _run(args):
    return CliRunner().invoke(main, args)


def test_help_lists_commands():
    result = _run(["--help"])
    assert result.exit_code == 0
    assert "info" in result.output
    assert "half-open" in result.output


def test_model_help_names_every_built_in_model():
    from rys_forge.models import BUILTIN_MODELS

    result = CliRunner().invoke(main, ["rank", "--help"], terminal_width=400)
    assert result.exit_code == 0
    for name in BUILTIN_MODELS:
        assert name in result.output, name


def test_info_on_tiny_model(tiny_model_dirs):
    result = _run(["info", "--model", str(tiny_model_dirs["gemma3_text"]), "--window", "2:5"])
    assert result.exit_code == 0, result.output
    assert "layers       8" in result.output
    assert "3:F" in result.output and "0:S" in result.output
    assert "[0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7]" in result.output


def _one_line_error(result, code, fragment):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("rys-forge: error:"), result.output
    assert fragment in lines[0]
    assert "Traceback" not in result.output


def test_bad_window_is_one_line(tiny_model_dirs):
    _one_line_error(_run(["info", "--model", str(tiny_model_dirs["llama"]), "--window", "3:9"]), 2, "ends past the model's 6 layers")
    _one_line_error(_run(["info", "--model", str(tiny_model_dirs["llama"]), "--window", "5-7"]), 2, "bad window '5-7'")
    _one_line_error(_run(["info", "--model", str(tiny_model_dirs["llama"]), "--window", "4:4"]), 2, "half-open")


def test_unknown_model_path_is_one_line(tmp_path):
    _one_line_error(_run(["info", "--model", str(tmp_path / "nope")]), 1, "not found")
    _one_line_error(_run(["info", "--model", "not-a-model"]), 1, "unknown model 'not-a-model'")


def test_unsupported_architecture_is_one_line(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=16, n_head=2).save_pretrained(tmp_path)
    _one_line_error(_run(["info", "--model", str(tmp_path)]), 2, "supported model types: gemma2")


def test_bad_dtype_is_one_line(tiny_model_dirs):
    _one_line_error(_run(["info", "--model", str(tiny_model_dirs["llama"]), "--dtype", "int3"]), 2, "unknown dtype")
