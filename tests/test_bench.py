"""`mlx-mistral bench` and the mlx-lm comparison run on tiny models and report every field.

No timing is asserted: speeds depend on the machine; only their presence and sanity are.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlx_mistral import bench
from mlx_mistral.cli import cli
from mlx_mistral.config import ModelArgs
from mlx_mistral.model import Model
from mlx_mistral.synth import PRESETS

TRIAL_FIELDS = {"prompt_tokens", "generation_tokens", "prefill_tps", "decode_tps", "ttft_s", "total_s",
                "peak_memory_gb", "cpu_s", "achieved_gbps", "peak_pct"}


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_bench_json_has_every_field(tiny_q4_dir):
    r = run("bench", "-m", str(tiny_q4_dir), "-p", "8", "-g", "3", "-n", "2", "--peak-gbps", "100", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["runtime"] == "mlx-mistral" and data["model"] == tiny_q4_dir.name
    assert data["config"]["prompt_tokens"] == 8 and data["config"]["generation_tokens"] == 3
    assert data["device"]["peak_gbps"] == 100 and data["device"]["peak_source"] == "--peak-gbps"
    assert 0 < data["weight_bytes_per_token"] < data["weight_bytes"]
    assert len(data["trials"]) == 2
    for trial in data["trials"]:
        assert set(trial) == TRIAL_FIELDS
        assert trial["prompt_tokens"] == 8 and trial["generation_tokens"] == 3  # EOS never stops it
        assert trial["prefill_tps"] > 0 and trial["decode_tps"] > 0 and trial["ttft_s"] > 0
        assert 0 < trial["ttft_s"] < trial["total_s"] and trial["cpu_s"] > 0
        assert trial["peak_memory_gb"] * 1e9 >= data["weight_bytes"] * 0.9  # the weights are resident
        assert trial["achieved_gbps"] == pytest.approx(data["weight_bytes_per_token"] * trial["decode_tps"] / 1e9)
        assert trial["peak_pct"] == pytest.approx(trial["achieved_gbps"])  # percent of 100 GB/s
    assert set(data["median"]) == set(bench.METRICS)
    decode = sorted(t["decode_tps"] for t in data["trials"])
    assert data["summary"]["decode_tps"] == {"min": decode[0], "median": sum(decode) / 2, "max": decode[1]}


def test_bench_prints_a_table(tiny_q4_dir):
    r = run("bench", "-m", str(tiny_q4_dir), "-p", "4", "-g", "2", "-n", "1", "--peak-gbps", "50", "--no-warmup")
    assert r.exit_code == 0, r.output
    assert "pp4+tg2" in r.stdout and "median" in r.stdout and "--peak-gbps" in r.stdout


def test_bench_bad_model_is_one_line(tmp_path):
    r = run("bench", "-m", str(tmp_path / "nope"), "--json")
    assert r.exit_code != 0
    assert "no such model folder" in r.output and "Traceback" not in r.output


def test_bench_rejects_too_few_tokens(tiny_q4_dir):
    r = run("bench", "-m", str(tiny_q4_dir), "-g", "1")
    assert r.exit_code != 0 and "generation-tokens" in r.output


def test_weights_per_token_read_one_embedding_row():
    args = ModelArgs.from_dict(PRESETS["tiny"])
    model = Model(args)
    mx.eval(model.parameters())
    total = bench.weight_bytes(model)
    table = model.model.embed_tokens.weight.nbytes
    assert bench.weight_bytes_per_token(model, args.vocab_size) == total - table + table // args.vocab_size


def test_tied_embeddings_count_whole_table():
    args = ModelArgs.from_dict(dict(PRESETS["tiny"], tie_word_embeddings=True))
    model = Model(args)
    assert bench.weight_bytes_per_token(model, args.vocab_size) == bench.weight_bytes(model)


@pytest.mark.parametrize("chip, gbps", [("Apple M3 Max", 400), ("Apple M4 Pro", 273), ("Apple M2", 100),
                                        ("Apple M2 Ultra", 800), ("Intel(R) Xeon(R) Processor", None),
                                        ("AMD EPYC 9M14 96-Core Processor", None)])
def test_apple_bandwidth_table(chip, gbps):
    assert bench.apple_bandwidth_gbps(chip) == gbps


def test_device_slug_and_copy_test():
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", bench.device_slug())
    assert bench.copy_test_gbps(megabytes=8, repeats=1) > 0
    assert bench.peak_bandwidth(42.0) == bench.PeakBandwidth(42.0, "--peak-gbps")


def _compare_module():
    path = Path(__file__).parents[1] / "benchmarks" / "compare.py"
    spec = importlib.util.spec_from_file_location("compare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_against_mlx_lm_writes_json_markdown_plot(tiny_q4_dir, tmp_path):
    compare = _compare_module()
    compare.main(["-m", str(tiny_q4_dir), "--contexts", "4,8", "-g", "2", "-n", "1", "--peak-gbps", "10",
                  "--no-warmup", "--out", str(tmp_path)])
    stem = tmp_path / f"compare-{tiny_q4_dir.name}"
    data = json.loads(stem.with_suffix(".json").read_text())
    assert [row["prompt_tokens"] for row in data["results"]] == [4, 8]
    for row in data["results"]:
        for name in ("mlx-mistral", "mlx-lm"):
            assert len(row[name]["trials"]) == 1 and row[name]["trials"][0]["generation_tokens"] == 2
        med = {name: row[name]["summary"]["decode_tps"]["median"] for name in ("mlx-mistral", "mlx-lm")}
        assert row["ratio"]["decode"] == pytest.approx(med["mlx-mistral"] / med["mlx-lm"])
        assert row["ratio"]["prefill"] > 0
    if bench.backend() == "cpu":
        assert data["runtimes"]["mlx-mistral"]["compute_dtype"] == "float32"  # the CPU dtype policy
    assert "ratio" in stem.with_suffix(".md").read_text()
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_read_test_measures_and_is_the_cpu_peak_source():
    assert bench.read_test_gbps(megabytes=8, repeats=1) > 0
    if bench.backend() == "cpu" and bench.apple_bandwidth_gbps(bench.chip_name()) is None:
        assert bench.peak_bandwidth().source.startswith("measured read test")
