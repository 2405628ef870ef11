"""The CLI end to end on a tiny synth model, and its handling of bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from mlx_mistral import __version__
from mlx_mistral.cli import cli


def run(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input)


def test_version():
    r = run("--version")
    assert r.exit_code == 0 and __version__ in r.output


def test_synth_then_generate(tmp_path):
    out = tmp_path / "m"
    r = run("synth", str(out), "--preset", "tiny")
    assert r.exit_code == 0, r.output
    assert {"config.json", "tekken.json", "model.safetensors.index.json"} <= {p.name for p in out.iterdir()}
    r = run("generate", "-m", str(out), "-p", "Bonjour", "-n", "6", "--temp", "0", "-v")
    assert r.exit_code == 0, r.output
    assert "decode: 6 tokens" in r.output and "tokens/s" in r.output


def test_generate_reads_stdin(tiny_dir):
    r = run("generate", "-m", str(tiny_dir), "-n", "3", input="Hello from stdin\n")
    assert r.exit_code == 0, r.output


def test_synth_quantized(tmp_path):
    out = tmp_path / "q"
    r = run("synth", str(out), "--preset", "tiny", "--quantize", "4", "--group-size", "32")
    assert r.exit_code == 0, r.output
    import json

    assert json.loads((out / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": 4}


def test_chat_repl_commands(tiny_dir):
    script = "Hello\n/system Be brief\nline one \\\nline two\n\"\"\"\nblock\n\"\"\"\n/reset\n/help\n/quit\n"
    r = run("chat", "-m", str(tiny_dir), "-n", "4", input=script)
    assert r.exit_code == 0, r.output
    assert "system prompt set" in r.output and "conversation cleared" in r.output
    assert r.output.count("tokens/s (prompt") == 3  # three replies


def test_chat_ends_at_end_of_input(tiny_dir):
    r = run("chat", "-m", str(tiny_dir), "-n", "2", input="Hi\n")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args, message", [
    (["generate", "-m", "/nonexistent/folder", "-p", "hi"], "no such model folder"),
    (["generate", "-m", "{tiny}", "-p", "   "], "prompt is empty"),
    (["generate", "-m", "{tiny}", "-p", "hi", "--top-p", "0"], "--top-p"),
    (["synth", "{tiny}"], "not empty"),
    (["generate", "-m", "{empty}", "-p", "hi"], "no config.json"),
    (["generate", "-m", "{broken}", "-p", "hi"], "cannot read"),
])
def test_bad_input_is_one_line_and_nonzero(tiny_dir, tmp_path, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = next(broken.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    args = [a.format(tiny=tiny_dir, empty=empty, broken=broken) for a in args]
    proc = subprocess.run([sys.executable, "-m", "mlx_mistral.cli", *args], capture_output=True, text=True)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
