"""Speculative decoding: greedy output equals plain decoding, sampling keeps its distribution."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_mistral import generate, stream_generate
from mlx_mistral.cache import QuantizedKVCache, make_cache
from mlx_mistral.config import ModelArgs
from mlx_mistral.errors import MistralError
from mlx_mistral.generate import encode_prompt, generate_step
from mlx_mistral.model import Model
from mlx_mistral.sampling import processors_from, sampler_from
from mlx_mistral.engine.speculate import (
    NgramIndex,
    SpeculationStats,
    draft_generate_step,
    lookup_generate_step,
)

CODE_PROMPT = ("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
               "Add type hints to these functions and repeat them.")


def random_model(seed: int, vocab_size: int = 512, head_dim: int = 32) -> Model:
    """A small random Mistral-shaped model; head_dim 32 fits a 4-bit KV cache with group 32."""
    mx.random.seed(seed)
    args = ModelArgs(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=head_dim, vocab_size=vocab_size, rope_theta=1e8)
    model = Model.from_config(args)
    mx.eval(model.parameters())
    return model


def plain(prompt, model, n, **kw):
    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=n, **kw)]


def lookup(prompt, model, n, stats=None, **kw):
    return [t for t, _ in lookup_generate_step(mx.array(prompt), model, max_tokens=n, stats=stats, **kw)]


# a prompt that repeats itself (lookup drafts from the start) and one that does not
REPEATING = [5, 9, 17, 33, 2, 71, 5, 9, 17, 33, 2, 71, 5, 9, 17]
PLAIN = [3, 140, 77, 201, 6, 90, 411, 12]


def test_ngram_index_drafts_what_followed_the_latest_match():
    index = NgramIndex([1, 2, 3, 4, 1, 2, 5, 6, 1, 2], ngram=2)
    assert index.draft(3) == [5, 6, 1]  # (1, 2) was last followed by 5 6 1
    index.extend([7])
    assert index.draft(3) == []  # 7 never occurred before
    index.extend([1])
    assert index.draft(2) == [2, 7]  # only the 1-gram (1,) matches: its latest continuation
    assert NgramIndex([4, 4, 4], ngram=3).draft(5) == [4]  # overlapping match, clipped at the end


@pytest.mark.parametrize("prompt", [REPEATING, PLAIN], ids=["repeating", "plain"])
@pytest.mark.parametrize("num_draft", [1, 4, 7])
def test_lookup_greedy_equals_plain_on_a_random_model(prompt, num_draft):
    model = random_model(0)
    stats = SpeculationStats()
    want = plain(prompt, model, 40)
    assert lookup(prompt, model, 40, stats, num_draft=num_draft) == want
    assert stats.tokens == 40 and stats.forward_passes < 40  # some drafts survived...
    assert stats.accepted < stats.drafted  # ...and some were rolled back


def test_lookup_keeps_the_cache_in_step():
    """After speculation with rollbacks the cache holds exactly prompt + reply (less the last
    token), so a second call continues the text as plain decoding would."""
    model = random_model(0)
    cache = make_cache(model)
    first = lookup(REPEATING, model, 20, prompt_cache=cache)
    assert cache[0].offset == len(REPEATING) + 20 - 1
    more = lookup(first[-1:], model, 12, prompt_cache=cache)
    assert first + more == plain(REPEATING, model, 32)


def test_stopping_early_rolls_back_unused_drafts():
    model = random_model(0)
    for taken in (1, 5, 9):
        cache = make_cache(model)
        steps = lookup_generate_step(mx.array(REPEATING), model, max_tokens=40, prompt_cache=cache)
        got = [t for _, (t, _) in zip(range(taken), steps)]
        steps.close()  # as stream_generate does at an end-of-sequence id
        assert cache[0].offset == len(REPEATING) + taken - 1
        more = lookup(got[-1:], model, 6, prompt_cache=cache)
        assert got + more == plain(REPEATING, model, taken + 6)


def test_lookup_with_a_quantized_kv_cache():
    model = random_model(0)
    for bits in (4, 8):
        want = plain(REPEATING, model, 32, prompt_cache=[QuantizedKVCache(32, bits) for _ in model.layers])
        stats = SpeculationStats()
        cache = [QuantizedKVCache(32, bits) for _ in model.layers]
        assert lookup(REPEATING, model, 32, stats, prompt_cache=cache) == want
        assert 0 < stats.accepted < stats.drafted  # trimming the quantized cache was exercised
        assert cache[0].offset == len(REPEATING) + 31


def test_lookup_with_logits_processors_equals_plain():
    model = random_model(0)
    kw = dict(logits_processors=processors_from(repetition_penalty=1.3, repetition_context_size=8))
    assert lookup(REPEATING, model, 30, **kw) == plain(REPEATING, model, 30, **kw)


def test_draft_model_greedy_equals_plain():
    model = random_model(0)
    want = plain(PLAIN, model, 30)
    self_stats, other_stats = SpeculationStats(), SpeculationStats()
    same = [t for t, _ in draft_generate_step(mx.array(PLAIN), model, model, max_tokens=30, stats=self_stats)]
    other = [t for t, _ in draft_generate_step(mx.array(PLAIN), model, random_model(1), num_draft=3,
                                               max_tokens=30, stats=other_stats)]
    assert same == want and other == want
    assert self_stats.accepted == self_stats.drafted > 0  # a model agrees with itself
    assert other_stats.accepted < other_stats.drafted


def test_draft_model_with_another_vocabulary_is_refused():
    with pytest.raises(MistralError, match="vocabulary"):
        list(draft_generate_step(mx.array(PLAIN), random_model(0), random_model(1, vocab_size=640)))


def test_stream_generate_switches_modes(tiny):
    model, tok = tiny
    kw = dict(max_tokens=24, temperature=0)
    want = generate(model, tok, CODE_PROMPT, speculate="none", **kw)
    assert generate(model, tok, CODE_PROMPT, speculate="lookup", num_draft=3, **kw) == want
    assert generate(model, tok, CODE_PROMPT, speculate="draft", draft_model=model, **kw) == want
    last = list(stream_generate(model, tok, CODE_PROMPT, speculate="lookup", **kw))[-1]
    assert last.speculation.mode == "lookup" and last.speculation.tokens == 24
    with pytest.raises(MistralError, match="draft model"):
        generate(model, tok, "hi", speculate="draft")
    with pytest.raises(MistralError, match="speculate must be"):
        generate(model, tok, "hi", speculate="fast")


def test_default_mode_follows_the_backend_table(tiny):
    from mlx_mistral.engine.speculate import DEFAULT_MODE, default_mode

    model, tok = tiny
    assert default_mode(model) == DEFAULT_MODE[mx.default_device().type.name] in ("none", "lookup")
    last = list(stream_generate(model, tok, "hi", max_tokens=3, temperature=0))[-1]
    assert (last.speculation is None) == (default_mode(model) == "none")


# --- sampling keeps the distribution ------------------------------------------------------------


def exact_two_token_distribution(model, prompt, top_k) -> dict[tuple[int, int], float]:
    """P(t1, t2) of temperature-1 top-k sampling, from full forward passes."""
    def topk_probs(ids):
        logits = model(mx.array(ids)[None])[0, -1]
        top = mx.argsort(-logits)[:top_k]
        probs = mx.softmax(logits[top])
        return dict(zip(top.tolist(), probs.tolist()))

    return {(a, b): pa * pb for a, pa in topk_probs(prompt).items()
            for b, pb in topk_probs(prompt + [a]).items()}


def draft_and_prompt(model, top_k):
    """A prompt whose last token was followed by the same token d twice before, with d among the
    top-k next tokens but far from certain: lookup drafts d, and must accept it only p(d) of the time."""
    for d in range(model.args.vocab_size):
        prompt = [7, d, 7, d, 7]
        p = sum(v for (a, _), v in exact_two_token_distribution(model, prompt, top_k).items() if a == d)
        if 0.15 < p < 0.6:
            return d, prompt
    raise AssertionError("no suitable draft token")


@pytest.mark.parametrize("mode", ["lookup", "draft"])
def test_sampling_keeps_the_distribution(mode):
    model = random_model(3, vocab_size=64)
    top_k = 3
    d, prompt = draft_and_prompt(model, top_k)
    exact = exact_two_token_distribution(model, prompt, top_k)
    if mode == "draft":  # the model as its own greedy draft: the draft is its most likely token
        d = mx.argmax(model(mx.array(prompt)[None])[0, -1]).item()
    p_draft = sum(p for (a, _), p in exact.items() if a == d)
    sampler = sampler_from(temperature=1.0, top_k=top_k)
    mx.random.seed(1234)
    counts: dict[tuple[int, int], int] = {}
    draws = 600
    stats = SpeculationStats()
    for _ in range(draws):
        if mode == "lookup":
            steps = lookup_generate_step(mx.array(prompt), model, max_tokens=2, sampler=sampler, stats=stats)
        else:
            steps = draft_generate_step(mx.array(prompt), model, model, max_tokens=2, sampler=sampler, stats=stats)
        pair = tuple(t for t, _ in steps)
        counts[pair] = counts.get(pair, 0) + 1
    assert set(counts) <= set(exact)
    tv = 0.5 * sum(abs(counts.get(x, 0) / draws - p) for x, p in exact.items())
    # keeping the draft blindly would be off by 1 - p(d); resampling d after rejecting it, by
    # (1 - p(d)) p(d); both are well above the sampling noise allowed here
    assert min(1 - p_draft, (1 - p_draft) * p_draft) > 0.12
    assert tv < 0.08, f"TV distance {tv:.3f} between sampled and exact distributions"
    assert stats.drafted == draws and 0 < stats.accepted < draws
    assert abs(stats.accepted / draws - p_draft) < 0.08  # drafts survive with probability p(d)


# --- SmolLM2 real weights -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from mlx_mistral import load

    return load(smollm2_dir)


def test_lookup_on_smollm2_with_a_quantized_kv_cache(smollm2):
    model, tok = smollm2
    ids = encode_prompt(tok, CODE_PROMPT)

    def cache():
        return [QuantizedKVCache(64, 8) for _ in model.layers]

    stats = SpeculationStats()
    assert lookup(ids, model, 16, stats, prompt_cache=cache()) == plain(ids, model, 16, prompt_cache=cache())
    assert 0 < stats.accepted < stats.drafted


@pytest.mark.slow
@pytest.mark.parametrize("text", [CODE_PROMPT, "Tell me a short story about a lighthouse keeper."],
                         ids=["repeating", "free"])
def test_lookup_greedy_equals_plain_on_smollm2(smollm2, text):
    model, tok = smollm2
    ids = encode_prompt(tok, text)
    stats = SpeculationStats()
    assert lookup(ids, model, 24, stats) == plain(ids, model, 24)
    assert stats.drafted > 0


# --- command line -------------------------------------------------------------------------------


def cli_run(*args):
    from click.testing import CliRunner

    from mlx_mistral.cli import cli

    return CliRunner().invoke(cli, list(args))


def test_cli_generate_reports_speculation(tiny_dir):
    r = cli_run("generate", "-m", str(tiny_dir), "-p", CODE_PROMPT, "-n", "12", "--temp", "0",
                "--speculate", "lookup", "--num-draft", "3", "-v")
    assert r.exit_code == 0, r.output
    assert "speculation: lookup" in r.output and "tokens per forward pass" in r.output
    plain_run = cli_run("generate", "-m", str(tiny_dir), "-p", CODE_PROMPT, "-n", "12", "--temp", "0",
                        "--speculate", "none")
    assert plain_run.output.splitlines()[0] == r.output.splitlines()[0]  # same reply text


def test_cli_refuses_bad_draft_settings(tiny_dir, smollm2_dir):
    r = cli_run("generate", "-m", str(tiny_dir), "-p", "hi", "--speculate", "draft")
    assert r.exit_code == 1 and "--draft-model" in r.output and "Traceback" not in r.output
    r = cli_run("generate", "-m", str(tiny_dir), "-p", "hi", "--draft-model", str(smollm2_dir))
    assert r.exit_code == 1 and "vocabulary" in r.output and "Traceback" not in r.output
    r = cli_run("chat", "-m", str(tiny_dir), "--speculate", "fast")
    assert r.exit_code == 2 and "fast" in r.output


def test_draft_with_another_tokenizer_is_refused(tiny, smollm2):
    from mlx_mistral.engine.speculate import check_draft

    model, tok = tiny
    with pytest.raises(MistralError, match="tokenizer"):
        check_draft(model, model, tok, smollm2[1])
    check_draft(model, model, tok, tok)
