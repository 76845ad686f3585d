"""The command line on tiny models: one-line errors (never a stack trace), scripted chat over stdin."""
import pytest
from typer.testing import CliRunner

from kuaida.cli import app

runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, list(args), input=input)


@pytest.mark.parametrize("cmd", ["chat", "info"])
def test_missing_path_is_one_line_error(cmd, tmp_path):
    result = invoke(cmd, str(tmp_path / "nope"))
    assert result.exit_code == 2
    assert "error:" in result.output and "no such file" in result.output
    assert "Traceback" not in result.output


def test_file_that_is_not_a_model(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    result = invoke("chat", str(bad))
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output


def test_bad_sampling_option_fails_before_loading(tmp_path):
    result = invoke("chat", str(tmp_path / "nope"), "--temperature", "-1")
    assert result.exit_code == 2 and "temperature" in result.output


def test_unknown_dtype(tiny_llama_dir):
    result = invoke("chat", str(tiny_llama_dir), "--dtype", "int3")
    assert result.exit_code == 2 and "int8" in result.output


def test_info_describes_a_directory(tiny_llama_dir):
    result = invoke("info", str(tiny_llama_dir))
    assert result.exit_code == 0, result.output
    assert "llama" in result.output and "native" in result.output


def test_scripted_chat_answers_each_line_and_handles_commands(tiny_llama_dir):
    script = "hello there\n/system be brief\nsecond question\n/quit\nnever read\n"
    result = invoke("chat", str(tiny_llama_dir), "--dtype", "fp32", "--temperature", "0",
                    "--max-new-tokens", "5", input=script)
    assert result.exit_code == 0, result.output
    assert result.output.count("TTFT") == 2  # two replies, each with its speed line; nothing after /quit
    assert "system prompt set" in result.output


def test_too_long_turn_is_reported_and_the_session_goes_on(tiny_llama_dir):
    script = ("word " * 300) + "\nshort\n"
    result = invoke("chat", str(tiny_llama_dir), "--dtype", "fp32", "--temperature", "0",
                    "--max-new-tokens", "3", "--max-context", "64", input=script)
    assert result.exit_code == 0, result.output
    assert "context holds 64" in result.output
    assert result.output.count("TTFT") == 1
