"""`mlx-mistral convert` on bad input: one line, non-zero exit, nothing left at OUT; Ctrl-C and
--force keep OUT whole."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlx_mistral.cli import cli
from mlx_mistral.convert.pipeline import convert


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def truncate(d: Path):
    shard = next(d.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def corrupt_header(d: Path):
    shard = next(d.glob("model-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\x00garbage, not json\xff" + b" " * 13
    shard.write_bytes(bytes(data))


def missing_shard(d: Path):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def config_mismatch(d: Path):
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] = 1024
    (d / "config.json").write_text(json.dumps(config))


def unknown_tensor(d: Path):
    shard = next(d.glob("model-*.safetensors"))
    weights = mx.load(str(shard))
    weights["model.layers.0.self_attn.q_norm.weight"] = mx.ones((16,))
    mx.save_safetensors(str(shard), weights)


def missing_tensor(d: Path):
    shard = next(d.glob("model-*.safetensors"))
    weights = mx.load(str(shard))
    del weights["model.layers.1.mlp.up_proj.weight"]
    mx.save_safetensors(str(shard), weights)


def no_tokenizer(d: Path):
    (d / "tekken.json").unlink()


@pytest.mark.parametrize("damage, message", [
    (truncate, "is truncated"),
    (corrupt_header, "not a valid safetensors file"),
    (missing_shard, "missing weight shard model-00002-of-00002.safetensors"),
    (config_mismatch, "model.layers.0.mlp.gate_proj.weight has shape (512, 256) but config.json implies (1024, 256)"),
    (unknown_tensor, "unexpected tensor model.layers.0.self_attn.q_norm.weight"),
    (missing_tensor, "lacks tensor model.layers.1.mlp.up_proj.weight"),
    (no_tokenizer, "has no tokenizer"),
])
def test_bad_checkpoint_is_one_line_and_creates_nothing(tiny_dir, tmp_path, damage, message):
    src = copy_of(tiny_dir, tmp_path / "src")
    damage(src)
    out = tmp_path / "sub" / "out"
    r = CliRunner().invoke(cli, ["convert", str(src), str(out)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not out.parent.exists()


def test_non_empty_out_needs_force(tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = CliRunner().invoke(cli, ["convert", str(tiny_dir), str(out)])
    assert r.exit_code == 1 and "not empty (use --force" in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    r = CliRunner().invoke(cli, ["convert", str(tiny_dir), str(out), "--force", "--bits", "8", "--group-size", "32"])
    assert r.exit_code == 0, r.output
    assert "keep.txt" not in {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left beside it


def test_interrupt_leaves_out_untouched_and_no_temp_folder(tiny_dir, tmp_path):
    class Interrupt:
        def start(self, tensors, nbytes):
            self.n = 0

        def advance(self, nbytes):
            pass

        def tensor_done(self, name):
            self.n += 1
            if self.n == 5:
                raise KeyboardInterrupt

    old = convert(tiny_dir, tmp_path / "out", bits=4).out
    before = sorted((p.name, p.stat().st_size) for p in old.iterdir())
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_dir, old, bits=8, force=True, progress=Interrupt())
    assert sorted((p.name, p.stat().st_size) for p in old.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_dir, tmp_path / "new", progress=Interrupt())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("args, message", [
    (["--recipe", "mixed", "--no-quantize"], "--recipe applies to quantized"),
    (["--bits", "7"], "Invalid value for '--bits'"),
])
def test_bad_options(tiny_dir, tmp_path, args, message):
    r = CliRunner().invoke(cli, ["convert", str(tiny_dir), str(tmp_path / "o"), *args])
    assert r.exit_code != 0 and message in r.stderr
    assert not (tmp_path / "o").exists()


def test_unreachable_hub_id_is_one_line_without_traceback(tmp_path):
    """No network (or no such repo): one line, exit 1, as a user sees it from the shell."""
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "mlx_mistral.cli", "convert", "mlx-mistral-tests/no-such-repo", str(out)],
                          capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "mlx-mistral-tests/no-such-repo" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
