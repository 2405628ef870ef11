"""Bad input outside the server and the generation core: every case is one line (a MistralError,
or exit status 1 from the CLI with one line on stderr), nothing is destroyed, nothing is sized
from a bad value. Tables of cases: model configs, tokenizers, prompt-cache files, output folders."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_mistral import load
from mlx_mistral.cli import cli
from mlx_mistral.config import ModelArgs
from mlx_mistral.errors import MistralError
from mlx_mistral.synth import PRESETS, REAL, synth, tekken_json

TINY = dict(PRESETS["tiny"], model_type="mistral")


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.stat().st_size < 2**22}


# --- config.json / params.json -----------------------------------------------------------------

def changed(**kw):
    return lambda: {**TINY, **kw}


def without(key):
    return lambda: {k: v for k, v in TINY.items() if k != key}


# (id, the config, what the line must name)
CONFIG_CASES = [
    ("a JSON list", lambda: [TINY], "JSON object"),
    ("a JSON string", lambda: "mistral", "JSON object"),
    ("null", lambda: None, "JSON object"),
    ("zero heads", changed(num_attention_heads=0), "num_attention_heads"),
    ("negative heads", changed(num_attention_heads=-8), "num_attention_heads"),
    ("string size", changed(hidden_size="256"), "hidden_size"),
    ("fractional layers", changed(num_hidden_layers=2.5), "num_hidden_layers"),
    ("float layers 1e12", changed(num_hidden_layers=1e12), "num_hidden_layers"),
    ("int layers 10**12", changed(num_hidden_layers=10**12), "num_hidden_layers"),
    ("null vocab", changed(vocab_size=None), "vocab_size"),
    ("boolean vocab", changed(vocab_size=True), "vocab_size"),
    ("negative ffn", changed(intermediate_size=-1), "intermediate_size"),
    ("odd head_dim", changed(head_dim=15), "head_dim"),
    ("zero head_dim", changed(head_dim=0), "head_dim"),
    ("kv heads not dividing", changed(num_key_value_heads=3), "num_key_value_heads"),
    ("zero kv heads", changed(num_key_value_heads=0), "num_key_value_heads"),
    ("more kv heads than heads", changed(num_key_value_heads=16), "num_key_value_heads"),
    ("zero max_position_embeddings", changed(max_position_embeddings=0), "max_position_embeddings"),
    ("string max_position_embeddings", changed(max_position_embeddings="32k"), "max_position_embeddings"),
    ("huge max_position_embeddings", changed(max_position_embeddings=10**10), "max_position_embeddings"),
    ("zero eps", changed(rms_norm_eps=0), "rms_norm_eps"),
    ("string eps", changed(rms_norm_eps="1e-5"), "rms_norm_eps"),
    ("negative theta", changed(rope_theta=-1.0), "rope_theta"),
    ("NaN theta", changed(rope_theta=math.nan), "rope_theta"),
    ("theta only in a bad rope_parameters", lambda: {**without("rope_theta")(), "rope_parameters": "fast"},
     "rope_parameters"),
    ("bad rope_parameters theta", lambda: {**without("rope_theta")(), "rope_parameters": {"rope_theta": "big"}},
     "rope_theta"),
    ("string tie", changed(tie_word_embeddings="no"), "tie_word_embeddings"),
    ("negative bos", changed(bos_token_id=-1), "bos_token_id"),
    ("string eos", changed(eos_token_id="</s>"), "eos_token_id"),
    ("group size 0", changed(quantization={"group_size": 0, "bits": 4}), "quantization.group_size"),
    ("bits 7", changed(quantization={"group_size": 64, "bits": 7}), "quantization.bits"),
    ("no group size", changed(quantization={"bits": 4}), "quantization.group_size"),
    ("quantization a string", changed(quantization="4bit"), "quantization"),
    ("unknown mode", changed(quantization={"group_size": 64, "bits": 4, "mode": "int4"}), "quantization.mode"),
    ("bad per-layer entry", changed(quantization={"group_size": 64, "bits": 4, "lm_head": {"group_size": 48, "bits": 4}}),
     "quantization.lm_head.group_size"),
    ("unsupported model_type", changed(model_type="gpt2"), "model_type"),
    ("missing hidden_size", without("hidden_size"), "hidden_size"),
    ("absurd total size", changed(hidden_size=1 << 17, num_hidden_layers=1024, intermediate_size=1 << 20,
                                  head_dim=128), "parameters"),
]
CONFIG_IDS = [c[0] for c in CONFIG_CASES]


@pytest.mark.parametrize("name, config, field", CONFIG_CASES, ids=CONFIG_IDS)
def test_bad_config_is_one_line_naming_the_field(name, config, field):
    start = time.perf_counter()
    with pytest.raises(MistralError) as e:
        ModelArgs.from_dict(config(), source="x/config.json")
    assert time.perf_counter() - start < 1.0  # refused before anything is sized from it
    line = one_line(str(e.value))
    assert field in line and ("x/config.json" in line or "JSON object" in line), line


@pytest.mark.parametrize("name, config, field", CONFIG_CASES, ids=CONFIG_IDS)
def test_info_refuses_a_bad_config(tmp_path, name, config, field):
    (tmp_path / "config.json").write_text(json.dumps(config()))
    before = snapshot(tmp_path)
    r = CliRunner().invoke(cli, ["info", "-m", str(tmp_path)])
    assert r.exit_code == 1, r.output
    assert field in one_line(r.stderr)
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("bad") / "tiny", "tiny")


# the cases that reach the weights' loader and the converter (the rest are the same code path)
LOAD_CASES = [c for c in CONFIG_CASES if c[0] in ("a JSON list", "zero heads", "string size", "fractional layers",
                                                  "float layers 1e12", "null vocab", "group size 0",
                                                  "zero max_position_embeddings", "absurd total size")]


@pytest.mark.parametrize("name, config, field", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_load_and_convert_refuse_a_bad_config_quickly(tiny_folder, tmp_path, name, config, field):
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    (folder / "config.json").write_text(json.dumps(config()))
    before = snapshot(folder)
    start = time.perf_counter()
    with pytest.raises(MistralError) as e:
        load(folder)
    assert field in one_line(str(e.value)) and time.perf_counter() - start < 5
    r = CliRunner().invoke(cli, ["convert", str(folder), str(tmp_path / "out")])
    assert r.exit_code == 1 and field in one_line(r.stderr)
    assert snapshot(folder) == before and not (tmp_path / "out").exists()


PARAMS = dict(dim=256, n_layers=2, head_dim=64, hidden_dim=512, n_heads=8, n_kv_heads=2, norm_eps=1e-5,
              vocab_size=8192, rope_theta=1e8)


@pytest.mark.parametrize("params, field", [
    ([PARAMS], "JSON object"),
    (dict(PARAMS, n_layers=0), "n_layers"),
    (dict(PARAMS, dim="256"), "dim"),
    (dict(PARAMS, n_kv_heads=3), "n_kv_heads"),
    (dict(PARAMS, vocab_size=None), "vocab_size"),
    ({k: v for k, v in PARAMS.items() if k != "n_heads"}, "n_heads"),
])
def test_bad_params_json_is_one_line_in_its_own_names(params, field):
    with pytest.raises(MistralError) as e:
        ModelArgs.from_params(params)
    line = one_line(str(e.value))
    assert field in line and "params.json" in line


# --- a tokenizer of another model --------------------------------------------------------------

@pytest.mark.parametrize("vocab", [4096, 8193, 16384])
def test_tekken_of_another_size_is_refused_by_load_and_convert(tiny_folder, tmp_path, vocab):
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    (folder / "tekken.json").write_text(json.dumps(tekken_json(vocab)))
    with pytest.raises(MistralError) as e:
        load(folder)
    assert f"has {vocab} tokens but config.json's vocab_size is 8192" in one_line(str(e.value))
    r = CliRunner().invoke(cli, ["convert", str(folder), str(tmp_path / "out")])
    assert r.exit_code == 1 and f"has {vocab} tokens" in one_line(r.stderr)
    assert not (tmp_path / "out").exists()


def test_a_broken_tekken_is_refused_by_convert(tiny_folder, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    (folder / "tekken.json").write_text("[1, 2, 3]")
    r = CliRunner().invoke(cli, ["convert", str(folder), str(tmp_path / "out")])
    assert r.exit_code == 1 and "tokenizer" in one_line(r.stderr)


def test_the_real_shape_and_presets_pass():
    for config in [REAL, *PRESETS.values()]:
        ModelArgs.from_dict(dict(config))
    assert ModelArgs.from_dict(dict(REAL)).parameter_count == 23_572_403_200


# --- prompt-cache files ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache_file(tiny, tmp_path_factory) -> Path:
    from mlx_mistral.prompt_cache import cache_prompt

    model, tok = tiny
    return cache_prompt(model, tok, tmp_path_factory.mktemp("pc") / "sys", system="Be brief.")


def rewrite_header(src: Path, dst: Path, edit) -> None:
    """Copy a safetensors file with its `__metadata__` changed by `edit(meta)`."""
    data = src.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    edit(header["__metadata__"])
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    dst.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + size:])


def setting(key, value):
    def edit(meta):
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    return edit


def with_tokens(fn):
    def edit(meta):
        meta["0.tokens"] = json.dumps(fn(json.loads(meta["0.tokens"])))
    return edit


PROMPT_CACHE_CASES = [
    ("tokens not JSON", setting("0.tokens", "[1, 2,"), "not JSON"),
    ("tokens a dict", setting("0.tokens", '{"a": 1}'), "not a list of token ids"),
    ("tokens empty", setting("0.tokens", "[]"), "not a list of token ids"),
    ("negative token", with_tokens(lambda t: [-1] + t[1:]), "not a list of token ids"),
    ("string token", with_tokens(lambda t: ["1"] + t[1:]), "not a list of token ids"),
    ("token beyond the vocabulary", with_tokens(lambda t: t[:-1] + [10**6]), "disagree"),
    ("one token short of the K/V", with_tokens(lambda t: t[:-1]), "disagree"),
    ("missing model", setting("0.model", None), "lacks model"),
    ("missing tokens", setting("0.tokens", None), "lacks tokens"),
    ("missing kv_bits", setting("0.kv_bits", None), "lacks kv_bits"),
    ("kv_bits 3", setting("0.kv_bits", "3"), "kv_bits"),
    ("kv_bits not a number", setting("0.kv_bits", "eight"), "kv_bits"),
    ("kv_group_size 48", setting("0.kv_group_size", "48"), "kv_group_size"),
    ("negative max_kv_size", setting("0.max_kv_size", "-5"), "max_kv_size"),
    ("tools not JSON", setting("0.tools", "[{"), "not JSON"),
    ("tools a string", setting("0.tools", '"get_weather"'), "tools"),
    ("unknown class name", setting("1.0", "PagedCache"), "unknown cache class 'PagedCache'"),
    ("a class name that is not a cache", setting("1.1", "tree_map"), "unknown cache class 'tree_map'"),
    ("another format", setting("0.format", "other/1"), "not an mlx-mistral prompt cache"),
    ("wrong fingerprint", setting("0.model", "0123456789abcdef"), "made for another model"),
    ("a layer missing", setting("1.1", None), "layers of K/V"),
]


@pytest.mark.parametrize("name, edit, message", PROMPT_CACHE_CASES, ids=[c[0] for c in PROMPT_CACHE_CASES])
def test_damaged_prompt_cache_is_one_line(tiny, cache_file, tmp_path, name, edit, message):
    from mlx_mistral.prompt_cache import load_prompt_cache_file

    bad = tmp_path / "bad.safetensors"
    rewrite_header(cache_file, bad, edit)
    before = bad.read_bytes()
    with pytest.raises(MistralError) as e:
        load_prompt_cache_file(bad, tiny[0])
    assert message in one_line(str(e.value))
    assert bad.read_bytes() == before


@pytest.mark.parametrize("content, message", [
    (b"", "not a prompt cache file"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "not a prompt cache file"),
    (b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]", "not a prompt cache file"),
    (b"\xff" * 64, "not a prompt cache file"),
])
def test_a_file_that_is_not_a_prompt_cache_is_one_line(tiny, tmp_path, content, message):
    from mlx_mistral.prompt_cache import load_prompt_cache_file

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(MistralError) as e:
        load_prompt_cache_file(bad, tiny[0])
    assert message in one_line(str(e.value))


def test_the_cli_refuses_a_damaged_prompt_cache_in_one_line(tiny_dir, cache_file, tmp_path):
    bad = tmp_path / "bad.safetensors"
    rewrite_header(cache_file, bad, setting("0.tokens", "[1, 2,"))
    r = CliRunner().invoke(cli, ["generate", "-m", str(tiny_dir), "-p", "hi", "-n", "1", "--prompt-cache", str(bad)])
    assert r.exit_code == 1 and "not JSON" in one_line(r.stderr)


# --- output folders: signals, leftovers, unwritable places -------------------------------------

SLOW_CONVERT = """
import sys, time
from mlx_mistral.convert.pipeline import convert

class Slow:
    def start(self, tensors, nbytes):
        pass
    def advance(self, nbytes):
        print("writing", flush=True)
        time.sleep(60)
    def tensor_done(self, name):
        pass

try:
    convert(sys.argv[1], sys.argv[2], progress=Slow())
except KeyboardInterrupt:  # as the CLI does: no traceback for Ctrl-C
    sys.exit(130)
"""


def partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


def interrupted_convert(src: Path, out: Path, signum: int) -> int:
    """Start a conversion into `out`, send `signum` while it writes; its exit status."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(src), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
        assert len(partials(out.parent)) == 1
        proc.send_signal(signum)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in proc.stderr.read()
    return proc.returncode


def _signals():
    import signal

    return [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2]


@pytest.mark.slow
@pytest.mark.parametrize("signum", _signals(), ids=lambda s: s.name)
def test_every_catchable_signal_removes_the_partial_folder(tiny_folder, tmp_path, signum):
    out = tmp_path / "out"
    code = interrupted_convert(tiny_folder, out, signum)
    assert code != 0
    assert partials(tmp_path) == [] and not out.exists()


@pytest.mark.slow
def test_sigterm_removes_the_partial_folder_and_exits_143(tiny_folder, tmp_path):
    import signal

    out = tmp_path / "out"
    assert interrupted_convert(tiny_folder, out, signal.SIGTERM) == 128 + signal.SIGTERM
    assert partials(tmp_path) == [] and not out.exists()


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_termination_signal_in_process_removes_the_partial_folder(tiny_folder, tmp_path, name):
    """The default run's sample of the subprocess matrix above: the signal arrives mid-write."""
    import signal

    from mlx_mistral.convert.pipeline import convert

    class SignalMidway:
        def start(self, tensors, nbytes):
            pass

        def advance(self, nbytes):
            assert len(partials(tmp_path)) == 1
            os.kill(os.getpid(), getattr(signal, name))

        def tensor_done(self, name):
            pass

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        convert(tiny_folder, tmp_path / "out", progress=SignalMidway())
    assert e.value.code == 128 + getattr(signal, name)
    assert partials(tmp_path) == [] and not (tmp_path / "out").exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # the process's own handlers come back


@pytest.mark.slow
def test_a_killed_conversion_is_cleaned_by_the_next_run(tiny_folder, tmp_path):
    import signal

    from mlx_mistral.convert.pipeline import convert

    out = tmp_path / "out"
    assert interrupted_convert(tiny_folder, out, signal.SIGKILL) == -signal.SIGKILL
    assert len(partials(tmp_path)) == 1  # SIGKILL cannot be caught
    older = tmp_path / ".out.abc123.partial"  # an earlier version's name, without a process id
    older.mkdir()
    convert(tiny_folder, out)
    assert partials(tmp_path) == [] and (out / "config.json").exists()


def test_a_partial_folder_of_a_running_conversion_is_left_alone(tmp_path):
    import subprocess

    from mlx_mistral.convert.writer import remove_stale_partials

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        live = tmp_path / f".out.{sleeper.pid}.x1.partial"
        dead = tmp_path / ".out.999999999.x2.partial"
        other = tmp_path / ".other.1.x3.partial"  # another destination's
        for folder in (live, dead, other):
            folder.mkdir()
            (folder / "shard").write_bytes(b"\0" * 1000)
        freed, running = remove_stale_partials(tmp_path / "out")
        assert (freed, running) == (1000, [live])
        assert partials(tmp_path) == sorted([live.name, other.name])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_disk_check_counts_interrupted_conversions(tiny_folder, tmp_path, monkeypatch):
    from collections import namedtuple

    from mlx_mistral.convert import pipeline

    stale = tmp_path / ".out.999999999.x.partial"
    stale.mkdir()
    (stale / "shard").write_bytes(b"\0" * 4096)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    r = CliRunner().invoke(cli, ["convert", str(tiny_folder), str(tmp_path / "out")])
    assert r.exit_code == 1
    line = one_line(r.stderr)
    assert "not enough disk space" in line and "interrupted conversions" in line
    assert partials(tmp_path) == [] and not (tmp_path / "out").exists()


def _unwritable_places(tmp_path: Path) -> list[Path]:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    places = [a_file / "out", Path("/proc/mlx-mistral-test/out")]
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        places.append(locked / "out")
    return places


@pytest.mark.parametrize("command", ["synth", "convert"])
def test_writing_where_nothing_can_be_written_is_one_line(tiny_folder, tmp_path, command):
    for out in _unwritable_places(tmp_path):
        args = ["synth", str(out), "--preset", "tiny"] if command == "synth" else ["convert", str(tiny_folder), str(out)]
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1, (out, r.output)
        assert "cannot write" in one_line(r.stderr) or "Not a directory" in r.stderr, r.stderr
    assert (tmp_path / "a-file").read_text() == "x"
