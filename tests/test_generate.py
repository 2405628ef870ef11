"""Generation: prompt forms, sampling flags, stop strings, EOS, seeds."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_mistral import chat, generate, stream_generate
from mlx_mistral.errors import MistralError
from mlx_mistral.engine.sequence import StopMatcher as _StopMatcher
from mlx_mistral.generate import encode_prompt, generate_step


def test_prompt_forms_agree(tiny):
    model, tok = tiny
    messages = [{"role": "user", "content": "Hello"}]
    ids = tok.encode_chat(messages)
    assert encode_prompt(tok, "Hello") == ids == encode_prompt(tok, messages) == encode_prompt(tok, ids)
    a = generate(model, tok, "Hello", max_tokens=8, temperature=0)
    b = generate(model, tok, ids, max_tokens=8, temperature=0)
    assert a == b and len(a) > 0


def test_bad_prompt_is_a_clear_error(tiny):
    with pytest.raises(MistralError):
        generate(*tiny, [], max_tokens=4)
    with pytest.raises(MistralError):
        generate(*tiny, "hi", max_tokens=4, top_p=0.0)


def test_max_tokens_and_finish_reason(tiny):
    chunks = list(stream_generate(*tiny, "Hello", max_tokens=5, temperature=0))
    assert chunks[-1].finish_reason == "length" and chunks[-1].token is None
    assert sum(c.token is not None for c in chunks) == 5
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_seed_makes_sampling_reproducible(tiny):
    kw = dict(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, min_p=0.01)
    a = generate(*tiny, "Hello", seed=7, **kw)
    b = generate(*tiny, "Hello", seed=7, **kw)
    c = generate(*tiny, "Hello", seed=8, **kw)
    assert a == b and a != c


def test_eos_stops_generation(tiny):
    model, tok = tiny
    ids = tok.encode_chat([{"role": "user", "content": "Hello"}])
    greedy = [t for t, _ in generate_step(mx.array(ids), model, max_tokens=6)]
    tok_eos = type("T", (), {})()
    # declare the third greedy token an end-of-sequence id: generation ends before it
    tok.eos_token_ids, saved = {greedy[2]}, tok.eos_token_ids
    try:
        chunks = list(stream_generate(model, tok, ids, max_tokens=6, temperature=0))
    finally:
        tok.eos_token_ids = saved
    assert [c.token for c in chunks if c.token is not None] == greedy[:2]
    assert chunks[-1].finish_reason == "stop"
    del tok_eos


def test_stop_string_cuts_the_reply(tiny):
    full = generate(*tiny, "Hello", max_tokens=16, temperature=0)
    stop = full[5:8]
    cut = generate(*tiny, "Hello", max_tokens=16, temperature=0, stop=[stop])
    assert cut == full[: full.index(stop)]


def test_stop_matcher_holds_back_prefixes():
    m = _StopMatcher(["</end>"])
    assert m.feed("abc</") == ("abc", False)
    assert m.feed("en") == ("", False)
    assert m.feed("x") == ("</enx", False)
    assert m.feed("y</end>z") == ("y", True)


def test_repetition_penalty_changes_greedy_output(tiny):
    plain = generate(*tiny, "Hello", max_tokens=24, temperature=0)
    penalised = generate(*tiny, "Hello", max_tokens=24, temperature=0, repetition_penalty=5.0)
    assert plain != penalised


def test_chat_returns_an_assistant_message(tiny):
    reply = chat(*tiny, [{"role": "user", "content": "Hi"}], max_tokens=4)
    assert reply["role"] == "assistant" and isinstance(reply["content"], str)


def test_smollm2_answers_paris(smollm2_dir):
    from mlx_mistral import load

    model, tok = load(smollm2_dir)
    reply = generate(model, tok, "What is the capital of France?", max_tokens=16, temperature=0)
    assert "Paris" in reply


def test_generate_step_yields_log_probabilities_of_the_greedy_choice(tiny):
    """Greedy picks from the logits and leaves the log-probabilities lazy: read, they are still
    a log-softmax over the vocabulary whose argmax is the token yielded."""
    model, tok = tiny
    ids = tok.encode_chat([{"role": "user", "content": "Hello"}])
    steps = list(generate_step(mx.array(ids), model, max_tokens=4))
    for token, logprobs in steps:
        assert logprobs.shape == (model.args.vocab_size,)
        assert abs(mx.logsumexp(logprobs).item()) < 1e-4
        assert mx.argmax(logprobs).item() == token
    sampled = list(generate_step(mx.array(ids), model, max_tokens=4, sampler=lambda lp: mx.argmax(lp, axis=-1)))
    assert [t for t, _ in sampled] == [t for t, _ in steps]
