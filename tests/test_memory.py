"""The memory planner: the real 24B arithmetic, the budget, the refusals and `info`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mlx_mistral import load, memory
from mlx_mistral.cli import cli
from mlx_mistral.errors import MistralError
from mlx_mistral.synth import REAL

Q4 = dict(REAL, model_type="mistral", quantization={"group_size": 64, "bits": 4}, torch_dtype="bfloat16")


def test_real_config_matches_the_reference_numbers():
    p = memory.plan(Q4, context=32768, dtype_bytes=2)
    assert round(p.weights / 1e9, 1) == 13.3  # 23.57 B weights at 4.5 bits
    assert p.kv_per_token == 160 * 1024  # 40 layers x 8 heads x 128 x (K, V) x 2 bytes
    assert p.kv_bytes == 5 * 2**30  # 5.0 GiB at 32k
    kv8 = memory.plan(Q4, context=32768, dtype_bytes=2, kv_bits=8)
    assert kv8.kv_per_token == 85 * 1024  # 8 bits + a 16-bit scale and bias per 64
    assert memory.plan(Q4, context=32768, dtype_bytes=2, kv_bits=4).kv_per_token == 45 * 1024
    bf16 = memory.plan(dict(Q4, quantization=None), dtype_bytes=2)
    assert round(bf16.weights / 1e9, 1) == 47.1  # the released checkpoint's size
    assert memory.plan(Q4, context=32768, max_kv_size=4096, dtype_bytes=2).kv_bytes == 4096 * 160 * 1024


def test_per_layer_quantization_overrides_count():
    mixed = dict(Q4, quantization={"group_size": 64, "bits": 4, "lm_head": {"group_size": 64, "bits": 8},
                                   "model.embed_tokens": False})
    base, p = memory.plan(Q4, dtype_bytes=2), memory.plan(mixed, dtype_bytes=2)
    n = REAL["vocab_size"] * REAL["hidden_size"]
    assert p.weights - base.weights == n * 4 // 8 + (n * 2 - (n * 4 // 8 + n // 64 * 4))


def test_a_plan_that_cannot_fit_is_refused_with_numbers_and_advice():
    p = memory.plan(Q4, context=32768, dtype_bytes=2)
    p.fused_attention = True  # as on a Mac
    memory.check_fits(p, memory.Budget(21 * 10**9, 32 * 10**9, "GPU wired limit"))  # a 32 GB Mac
    with pytest.raises(MistralError) as e:
        memory.check_fits(p, memory.Budget(18 * 10**9, 24 * 10**9, "GPU wired limit"), name="Mistral Small")
    msg = str(e.value)
    assert "13.26 GB" in msg and "5.37 GB" in msg and "18.00 GB" in msg and "GPU wired limit" in msg
    assert "--kv-bits 8" in msg and "at most" in msg
    fits = p.tokens_that_fit(18 * 10**9)
    assert memory.Plan(p.args, fits, p.kv, 2, True).total <= 18 * 10**9 < memory.Plan(p.args, fits + 64, p.kv, 2, True).total


def test_machine_budget_is_positive_and_below_ram():
    b = memory.machine_budget()
    assert 0 < b.bytes <= b.ram and b.source


def test_load_refuses_before_reading_weights(tiny_dir, monkeypatch):
    monkeypatch.setattr(memory, "machine_budget", lambda: memory.Budget(10**6, 10**9, "test budget"))
    with pytest.raises(MistralError, match="does not fit.*test budget"):
        load(tiny_dir)
    r = CliRunner().invoke(cli, ["generate", "-m", str(tiny_dir), "-p", "Hi", "-n", "2"])
    assert r.exit_code == 1 and "does not fit" in r.output and "Traceback" not in r.output


def test_chat_plans_for_the_full_context(tiny_dir, monkeypatch):
    # weights and working memory fit; the KV of 32k tokens does not
    monkeypatch.setattr(memory, "machine_budget", lambda: memory.Budget(2 * 10**9, 4 * 10**9, "test budget"))
    r = CliRunner().invoke(cli, ["chat", "-m", str(tiny_dir)], input="/quit\n")
    assert r.exit_code == 1 and "32768 tokens" in r.output
    r = CliRunner().invoke(cli, ["chat", "-m", str(tiny_dir), "--context", "4096"], input="/quit\n")
    assert r.exit_code == 0, r.output


def test_info_reads_only_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(Q4))  # no weights at all
    r = CliRunner().invoke(cli, ["info", "-m", str(tmp_path), "--context", "32768", "--dtype", "float16"])
    assert r.exit_code == 0, r.output
    assert "13.26 GB" in r.output and "160.0 KiB" in r.output and "5.00 GiB" in r.output
    r = CliRunner().invoke(cli, ["info", "-m", str(tmp_path), "--kv-bits", "8", "--dtype", "float16"])
    assert r.exit_code == 0 and "85.0 KiB" in r.output
    r = CliRunner().invoke(cli, ["info", "-m", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "no such model folder" in r.output


def test_plans_count_tokens_and_stop_at_the_models_context(tekken):
    text = "Le phare de Santa Maria fut construit en 1864. " * 200  # ~10 KB
    n = memory.prompt_tokens(tekken, text)
    assert n == len(tekken.encode_chat([{"role": "user", "content": text}]))
    assert n < len(text.encode()) / 2  # bytes are not tokens
    assert memory.prompt_tokens(tekken, [1, 2, 3]) == 3
    assert memory.prompt_tokens(tekken, text, system="Be brief.") > n
    assert memory.context_tokens(Q4, prompt=n, max_tokens=512) == n + 512
    assert memory.context_tokens(Q4, prompt=n) == 32768  # no reply limit: up to what the model accepts
    assert memory.context_tokens(Q4, prompt=n, max_tokens=10**6) == 32768
    assert memory.context_tokens(Q4, context=4096) == 4096
    p = memory.plan(Q4, context=10**6, dtype_bytes=2)
    assert p.context == 32768
    assert p.tokens_that_fit(10**15) == 32768  # plenty of memory: the model's limit, not 285k


@pytest.mark.parametrize("kw, message", [
    (dict(prompt=40000), "the prompt is 40000 tokens"),
    (dict(context=40000), "a context of 40000 tokens"),
    (dict(prompt=-1), "prompt must be a whole number"),
    (dict(max_tokens=1.5), "max_tokens must be a whole number"),
    (dict(context="4k"), "context must be a whole number"),
])
def test_context_beyond_the_model_is_one_line(kw, message):
    with pytest.raises(MistralError, match=message):
        memory.context_tokens(Q4, **kw)


def test_count_prompt_tokens_reads_only_the_tokenizer(tiny_dir, tiny):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert memory.count_prompt_tokens(tiny_dir, messages) == len(tiny[1].encode_chat(messages))


def test_info_says_at_most_the_models_context(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(Q4, max_position_embeddings=8192)))
    r = CliRunner().invoke(cli, ["info", "-m", str(tmp_path), "--budget-gb", "1000", "--dtype", "float16"])
    assert r.exit_code == 0, r.output
    assert "up to 8192 tokens" in r.output


def test_unquantizable_rows_count_as_floats():
    # SmolLM2-like widths: 576 = 9 x 64 splits into groups of 64, not of 128
    config = dict(Q4, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                  head_dim=64, num_hidden_layers=2, vocab_size=49152)
    g64 = memory.plan(dict(config, quantization={"group_size": 64, "bits": 4}), dtype_bytes=2).weights
    g128 = memory.plan(dict(config, quantization={"group_size": 128, "bits": 4}), dtype_bytes=2).weights
    dense = memory.plan(dict(config, quantization=None), dtype_bytes=2).weights
    assert g64 < g128 < dense  # at 128 only down_proj (1536 = 12 x 128) is quantized
