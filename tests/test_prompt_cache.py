"""Prompt-cache files: round trip, reuse by generate and chat, refusal of mismatched files."""

from __future__ import annotations

import re

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlx_mistral import load, stream_generate
from mlx_mistral.cli import cli
from mlx_mistral.engine.backend import backend_for
from mlx_mistral.errors import MistralError
from mlx_mistral.prompt_cache import (cache_prompt, load_prompt_cache_file, model_fingerprint, peek_prompt_cache,
                                      prefix_ids)

SYSTEM = "You are a careful assistant. Answer from the document."
DOCUMENT = "The lighthouse on Santa Maria was built in 1864. " * 20


@pytest.fixture(scope="module")
def cache_file(tiny, tmp_path_factory):
    model, tok = tiny
    return cache_prompt(model, tok, tmp_path_factory.mktemp("pc") / "doc", system=SYSTEM, document=DOCUMENT)


def _tokens(model, tok, messages, **kw):
    chunks = list(stream_generate(model, tok, messages, max_tokens=8, temperature=0, ignore_eos=True, **kw))
    return [c.token for c in chunks if c.token is not None], chunks[-1]


def test_round_trip_holds_the_prefix_kv(tiny, cache_file):
    model, tok = tiny
    assert cache_file.name == "doc.safetensors"
    loaded = load_prompt_cache_file(cache_file, model)
    ids = prefix_ids(tok, system=SYSTEM, document=DOCUMENT)
    assert loaded.conversation.tokens == ids and (loaded.system, loaded.document) == (SYSTEM, DOCUMENT)
    # the K/V equal a fresh prefill of the same ids
    fresh = model.make_cache()
    model(mx.array(ids)[None], cache=fresh)
    for a, b in zip(loaded.conversation.cache, fresh):
        assert a.offset == b.offset == len(ids)
        assert mx.allclose(a.keys[..., : a.offset, :], b.keys[..., : b.offset, :], atol=1e-5).item()
    assert peek_prompt_cache(cache_file)["model"] == model_fingerprint(model)


def test_generating_from_the_file_equals_a_fresh_run(tiny, cache_file):
    model, tok = tiny
    loaded = load_prompt_cache_file(cache_file, model)
    messages = loaded.messages("When was it built?")
    reused, last = _tokens(model, tok, messages, prompt_cache=loaded.conversation, tools=loaded.tools)
    fresh, _ = _tokens(model, tok, messages)
    assert reused == fresh
    assert last.cached_tokens >= len(prefix_ids(tok, system=SYSTEM, document=DOCUMENT)) - 2


def test_a_file_for_another_model_is_refused(tiny_q4_dir, cache_file):
    other, _ = load(tiny_q4_dir)
    with pytest.raises(MistralError, match="made for another model"):
        load_prompt_cache_file(cache_file, other)


def test_a_file_for_other_kv_settings_is_refused(tiny, cache_file, tmp_path):
    with pytest.raises(MistralError, match="full-precision KV but 8-bit"):
        load_prompt_cache_file(cache_file, tiny[0], kv_bits=8, kv_group_size=32)
    bounded = load_prompt_cache_file(cache_file, tiny[0], max_kv_size=4096)  # a window over the same K/V
    assert bounded.conversation.cache[0].max_size == 4096
    with pytest.raises(MistralError, match="does not fit in max_kv_size"):
        load_prompt_cache_file(cache_file, tiny[0], max_kv_size=64)


def test_files_that_are_not_prompt_caches_are_refused(tiny, tiny_dir, tmp_path):
    shard = next(tiny_dir.glob("model*.safetensors"))
    with pytest.raises(MistralError, match="not an mlx-mistral prompt cache"):
        load_prompt_cache_file(shard, tiny[0])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(MistralError, match="not a prompt cache"):
        load_prompt_cache_file(junk, tiny[0])
    with pytest.raises(MistralError, match="no such prompt cache"):
        load_prompt_cache_file(tmp_path / "missing.safetensors", tiny[0])
    with pytest.raises(MistralError, match="nothing to cache"):
        cache_prompt(*tiny, tmp_path / "empty")


def test_cli_cache_prompt_then_generate(tiny_dir, tiny_q4_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT)
    out = tmp_path / "prefix.safetensors"
    r = CliRunner().invoke(cli, ["cache-prompt", "-m", str(tiny_dir), "--system", SYSTEM, "--prompt-file", str(doc),
                                 str(out)])
    assert r.exit_code == 0, r.output
    assert out.exists() and not list(tmp_path.glob(".*partial*"))
    args = ["generate", "-m", str(tiny_dir), "-p", "When?", "-n", "5", "--temp", "0", "-v"]
    r = CliRunner().invoke(cli, args + ["--prompt-cache", str(out)])
    assert r.exit_code == 0, r.output
    cached = int(r.output.split("tokens (")[1].split(" cached")[0])
    assert cached > 100  # the document came from the file
    r = CliRunner().invoke(cli, ["generate", "-m", str(tiny_q4_dir), "-p", "When?", "-n", "2", "--prompt-cache", str(out)])
    assert r.exit_code == 1 and "made for another model" in r.output and "Traceback" not in r.output


def test_cli_chat_reuses_the_file_and_the_conversation(tiny_dir, cache_file):
    r = CliRunner().invoke(cli, ["chat", "-m", str(tiny_dir), "-n", "3", "--temp", "0", "--context", "4096",
                                 "--prompt-cache", str(cache_file)], input="When?\nAnd why?\n/quit\n")
    assert r.exit_code == 0, r.output
    cached = [int(n) for n in re.findall(r"(\d+) cached", r.output)]
    assert len(cached) == 2 and 100 < cached[0] < cached[1]  # the document, then the whole first turn


@pytest.mark.usefixtures("float_activations")  # float tolerances: int8 activations (the x86 default) are bounded elsewhere
def test_quantized_model_round_trip_through_the_native_decoder(tiny_q4_dir, tmp_path):
    """A 4-bit model on the CPU keeps its K/V in the native decoder's caches: the file still
    names mlx-lm's classes, and loading hands the decoder its own kind back."""
    model, tok = load(tiny_q4_dir)
    if backend_for(model).decoder is None:
        pytest.skip("the native CPU decoder does not run here")
    path = cache_prompt(model, tok, tmp_path / "q4", system=SYSTEM, document=DOCUMENT)
    loaded = load_prompt_cache_file(path, model)
    assert type(loaded.conversation.cache[0]) is type(backend_for(model).make_cache()[0])
    messages = loaded.messages("When was it built?")
    reused, last = _tokens(model, tok, messages, prompt_cache=loaded.conversation, tools=loaded.tools)
    fresh, _ = _tokens(model, tok, messages)
    assert reused == fresh and last.cached_tokens > 100
