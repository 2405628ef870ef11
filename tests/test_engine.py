"""The engine: batched replies equal replies alone; cancellation, arrival and n > 1."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from mlx_mistral import load
from mlx_mistral.engine import Constraint, Engine, Request
from mlx_mistral.engine.backend import backend_for
from mlx_mistral.errors import MistralError
from mlx_mistral.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("float_activations")  # parity at float tolerances

WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}]
SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
    "type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["answer"]}}}


class LogitsRecorder:
    """A logits processor that keeps each row it sees (and changes nothing)."""

    def __init__(self):
        self.rows = []

    def __call__(self, history, logits):
        self.rows.append(logits)
        return logits


@pytest.fixture(scope="module", params=["mlx", "native"])
def quirk(request, tiny_dir, tiny_q4_dir):
    """The tiny Mistral-quirk shape on each path: MLX ops (bf16 weights in float32) and the
    native decoder (4-bit weights)."""
    model, tok = load(tiny_q4_dir if request.param == "native" else tiny_dir)
    return with_backend(model, tok, request.param)


@pytest.fixture(scope="module", params=["mlx", "native"])
def real(request, smollm2_dir):
    """SmolLM2's real weights, 4-bit, on each path (its own copy: the shared fixture stays float)."""
    import fixtures

    from mlx_mistral.tokenizer import load_tokenizer

    return with_backend(fixtures.quantized_model(smollm2_dir, 64, 4, True), load_tokenizer(smollm2_dir),
                        request.param)


def with_backend(model, tok, path: str):
    try:
        backend = backend_for(model, native=path == "native")
    except ValueError as e:  # no native kernels on this machine
        pytest.skip(str(e))
    return model, tok, backend


def prompt_ids(tok, n: int, seed: int) -> tuple[int, ...]:
    ids = mx.random.randint(1000, tok.vocab_size, (n,), key=mx.random.key(seed)).tolist()
    return tuple([1] + ids)


def run(model, tok, backend, requests, *, max_batch=8, arrivals=None, prefill_chunk=64):
    """Run `requests` on one engine, submitting request i before step arrivals[i]; returns
    each request's responses."""
    engine = Engine(model, tok, max_batch=max_batch, prefill_chunk=prefill_chunk, backend=backend)
    arrivals = arrivals or [0] * len(requests)
    streams, out = {}, {i: [] for i in range(len(requests))}
    step = 0
    while len(streams) < len(requests) or engine.busy:
        for i, at in enumerate(arrivals):
            if at == step and i not in streams:
                streams[i] = engine.submit(requests[i])
        engine.step()
        step += 1
        for i, stream in streams.items():
            while stream.events:
                out[i].append(stream.events.popleft())
    return out


def tokens(responses) -> list[int]:
    return [r.token for r in responses if r.token is not None]


def test_batched_equals_alone(quirk):
    check_batched_equals_alone(*quirk)


@pytest.mark.slow
def test_batched_equals_alone_on_real_weights(real):
    check_batched_equals_alone(*real)


def check_batched_equals_alone(model, tok, backend):
    """8 requests of different lengths, budgets and arrival steps (one with a tool grammar and
    one with a JSON schema where the tokenizer is Tekken, one stopped by a stop string) give the
    same tokens, text and logits in one batch as each alone."""
    grammar = getattr(tok, "mistral", None) is not None
    lengths = [3, 40, 11, 70, 5, 23, 9, 33]
    budgets = [6, 12, 4, 9, 16, 7, 10, 5]
    recorders = [LogitsRecorder() for _ in lengths]
    requests = [Request(prompt_ids(tok, n, seed=i), max_tokens=m, ignore_eos=True, logits_processors=(rec,))
                for i, (n, m, rec) in enumerate(zip(lengths, budgets, recorders))]
    if grammar:  # the grammars are built for Tekken's [TOOL_CALLS]
        tools = tok.encode_chat([{"role": "user", "content": "Weather in Paris?"}], tools=WEATHER)
        requests[2] = Request(tuple(tools), max_tokens=80,
                              constraint=Constraint(WEATHER, "required", parallel_tool_calls=False))
        user = tok.encode_chat([{"role": "user", "content": "A number?"}])
        requests[5] = Request(tuple(user), max_tokens=40, constraint=Constraint(response_format=SCHEMA))
    alone = [run(model, tok, backend, [r], max_batch=1)[0] for r in requests]
    alone_rows = [list(rec.rows) for rec in recorders]
    for rec in recorders:
        rec.rows.clear()
    # a stop string that the reply alone contains ends the batched one at the same place
    text = "".join(r.text for r in alone[1])
    requests[1] = Request(requests[1].prompt, max_tokens=12, ignore_eos=True, stop=(text[4:7],),
                          logits_processors=(recorders[1],))
    alone[1] = run(model, tok, backend, [requests[1]], max_batch=1)[0]
    alone_rows[1] = list(recorders[1].rows)
    recorders[1].rows.clear()
    batched = run(model, tok, backend, requests, arrivals=[0, 0, 1, 1, 2, 4, 4, 7])
    for i in range(len(requests)):
        assert tokens(batched[i]) == tokens(alone[i]), f"request {i}"
        assert batched[i][-1].finish_reason == alone[i][-1].finish_reason
        assert "".join(r.text for r in batched[i]) == "".join(r.text for r in alone[i])
    assert alone[1][-1].finish_reason == "stop" and len(tokens(alone[1])) < 12
    if grammar:
        call = json.loads(tok.decode(tokens(batched[2])[1:]))
        assert call[0]["name"] == "get_weather" and isinstance(call[0]["arguments"]["city"], str)
        assert isinstance(json.loads("".join(r.text for r in batched[5]))["answer"], int)
    for i, rec in enumerate(recorders):
        if grammar and i in (2, 5):
            continue
        assert len(rec.rows) == len(alone_rows[i]) > 0
        for a, b in zip(alone_rows[i], rec.rows):
            scale = float(mx.abs(a).max())
            assert float(mx.abs(a - b).max()) <= 1e-3 * scale + 1e-4, f"request {i} logits"


def test_seeded_sampling_is_the_same_in_a_batch(quirk):
    model, tok, backend = quirk
    sampling = SamplingParams(temperature=1.0, top_p=0.95, seed=11)
    target = Request(prompt_ids(tok, 12, seed=1), max_tokens=10, sampling=sampling, ignore_eos=True)
    others = [Request(prompt_ids(tok, 7 + i, seed=20 + i), max_tokens=8, ignore_eos=True,
                      sampling=SamplingParams(temperature=0.8, seed=i)) for i in range(3)]
    alone = run(model, tok, backend, [target], max_batch=1)[0]
    batched = run(model, tok, backend, others + [target])[3]
    assert tokens(batched) == tokens(alone)


def test_cancel_frees_the_slot_and_leaves_others_alone(quirk):
    model, tok, backend = quirk
    requests = [Request(prompt_ids(tok, 9 + i, seed=40 + i), max_tokens=12, ignore_eos=True) for i in range(4)]
    alone = [run(model, tok, backend, [r], max_batch=1)[0] for r in requests]
    engine = Engine(model, tok, max_batch=3, backend=backend)
    streams = [engine.submit(r) for r in requests]
    for _ in range(3):
        engine.step()
    assert streams[3].events == type(streams[3].events)()  # waiting: the batch is full
    streams[1].cancel()
    engine.step()  # the cancelled reply ends, and the waiting one takes its slot
    assert streams[1].done and streams[1].events[-1].finish_reason == "cancelled"
    assert any(s.stream is streams[3] for s in engine.active)
    while engine.busy:
        engine.step()
    for i in (0, 2, 3):
        assert tokens(streams[i].events) == tokens(alone[i])
    assert len(tokens(streams[1].events)) < 12


def test_a_newcomer_is_not_held_behind_a_long_prefill(quirk):
    model, tok, backend = quirk
    engine = Engine(model, tok, max_batch=4, prefill_chunk=16, backend=backend)
    long = engine.submit(Request(prompt_ids(tok, 300, seed=5), max_tokens=4, ignore_eos=True))
    engine.step()
    short = engine.submit(Request(prompt_ids(tok, 6, seed=6), max_tokens=4, ignore_eos=True))
    steps = 0
    while not any(r.token is not None for r in short.events):
        engine.step()
        steps += 1
    # the short prompt fits one chunk: its first token comes one step later, while the long
    # prompt is still being prefilled (300 ids at 16 per step)
    assert steps <= 2
    assert not any(r.token is not None for r in long.events)


def test_n_replies_share_one_prefill(quirk):
    model, tok, backend = quirk
    calls = []

    class Counting:
        name = backend.name

        def make_cache(self, *a, **k):
            return backend.make_cache(*a, **k)

        def prefill(self, chunks):
            calls.extend(len(ids) for ids, _ in chunks)
            return backend.prefill(chunks)

        def decode(self, tokens, caches):
            return backend.decode(tokens, caches)

    prompt = prompt_ids(tok, 50, seed=9)
    alone = run(model, tok, backend, [Request(prompt, max_tokens=6, ignore_eos=True)], max_batch=1)[0]
    engine = Engine(model, tok, max_batch=4, prefill_chunk=64, backend=Counting())
    stream = engine.submit(Request(prompt, max_tokens=6, ignore_eos=True, n=3))
    out = list(engine.responses(stream))
    assert calls == [len(prompt) - 1]  # the prompt went through the model once
    for index in range(3):
        assert tokens([r for r in out if r.index == index]) == tokens(alone)
    sampled = Request(prompt, max_tokens=8, ignore_eos=True, n=3, sampling=SamplingParams(temperature=1.0, seed=3))
    engine = Engine(model, tok, max_batch=4, backend=backend)
    out = list(engine.responses(engine.submit(sampled)))
    replies = {tuple(tokens([r for r in out if r.index == i])) for i in range(3)}
    assert len(replies) > 1  # each reply draws with its own key


@pytest.mark.parametrize("bad", [
    dict(prompt=()), dict(max_tokens=0), dict(n=0), dict(logprobs=99),
    dict(sampling=dict(temperature=float("nan"))), dict(sampling=dict(top_k=-5)), dict(sampling=dict(min_p=2)),
    dict(sampling=dict(seed=1.5)), dict(sampling=dict(presence_penalty=3)),
])
def test_a_bad_request_is_refused_when_built(bad):
    fields = dict(prompt=(1, 2, 3))
    if "sampling" in bad:
        with pytest.raises(MistralError):
            SamplingParams(**bad["sampling"])
        return
    fields.update(bad)
    with pytest.raises(MistralError):
        Request(**fields)


def test_the_context_length_is_enforced(quirk):
    model, tok, backend = quirk
    engine = Engine(model, tok, backend=backend)
    ctx = model.args.max_position_embeddings
    with pytest.raises(MistralError, match=str(ctx)):
        engine.submit(Request(tuple(range(1, ctx + 2)), max_tokens=1))
    with pytest.raises(MistralError, match="vocabulary"):
        engine.submit(Request((1, model.args.vocab_size), max_tokens=1))


def test_bench_runs_through_the_engine(quirk):
    """`bench` times the engine; with the model's default backend it picks what generate_step does."""
    from mlx_mistral.generate import engine_generate_step, generate_step

    model, tok, _ = quirk
    prompt = mx.array(prompt_ids(tok, 20, seed=13))
    ours = [t for t, _ in engine_generate_step(prompt, model, max_tokens=8)]
    assert len(ours) == 8
    assert ours == [t for t, _ in generate_step(prompt, model, max_tokens=8)]


def test_a_reply_that_breaks_fails_alone(quirk):
    model, tok, backend = quirk

    def broken(history, logits):
        if history.size > 14:
            raise RuntimeError("processor broke")
        return logits

    good = Request(prompt_ids(tok, 8, seed=50), max_tokens=10, ignore_eos=True)
    bad = Request(prompt_ids(tok, 12, seed=51), max_tokens=10, ignore_eos=True, logits_processors=(broken,))
    alone = run(model, tok, backend, [good], max_batch=1)[0]
    engine = Engine(model, tok, max_batch=2, backend=backend)
    streams = [engine.submit(good), engine.submit(bad)]
    while engine.busy:
        engine.step()
    assert tokens(streams[0].events) == tokens(alone)
    assert streams[1].events[-1].finish_reason == "error" and "processor broke" in str(streams[1].error)
    engine = Engine(model, tok, backend=backend)
    with pytest.raises(RuntimeError, match="processor broke"):  # the Python API raises it
        list(engine.responses(engine.submit(bad)))


def test_requests_arriving_together_copy_a_shared_start(quirk):
    """A conversation with a 30-id start (a system prompt) is kept; three requests with that
    start arrive in one step: the first takes the kept one, the other two copy the start from
    its cache (cached_tokens), and every reply is the one it gets alone."""
    model, tok, backend = quirk
    start = prompt_ids(tok, 29, seed=21)
    requests = [Request(start + prompt_ids(tok, 6 + i, seed=30 + i)[1:], max_tokens=5, ignore_eos=True)
                for i in range(4)]
    alone = [run(model, tok, backend, [r], max_batch=1)[0] for r in requests]
    engine = Engine(model, tok, max_batch=4, prefix_cache=4, backend=backend)
    assert tokens(engine.responses(engine.submit(requests[0]))) == tokens(alone[0])
    streams = [engine.submit(r) for r in requests[1:]]
    out = [list(engine.responses(s)) for s in streams]
    assert [tokens(o) for o in out] == [tokens(a) for a in alone[1:]]
    assert [o[-1].cached_tokens for o in out] == [30, 30, 30]
    engine = Engine(model, tok, max_batch=4, prefix_cache=1, backend=backend)
    short = [Request(start[:10] + (7 + i,) * 4, max_tokens=2, ignore_eos=True) for i in range(3)]
    list(engine.responses(engine.submit(short[0])))
    streams = [engine.submit(r) for r in short[1:]]  # 10 ids in common: under MIN_SHARED, no copy
    assert [list(engine.responses(s))[-1].cached_tokens for s in streams] == [10, 0]


def test_a_step_that_admits_a_prompt_reads_the_weights_once(quirk):
    """On the native decoder, the step that prefills a newcomer also decodes the running reply
    and the newcomer's first token, all in one call; the replies are those they get alone."""
    model, tok, backend = quirk
    if backend.decoder is None:
        pytest.skip("one call per step is the native decoder's")
    first, second = (Request(prompt_ids(tok, n, seed=40 + n), max_tokens=4, ignore_eos=True) for n in (9, 20))
    alone = [run(model, tok, backend, [r], max_batch=1)[0] for r in (first, second)]
    engine = Engine(model, tok, max_batch=2, backend=backend)
    streams = [engine.submit(first)]
    engine.step()  # the first's prompt and its first token
    calls = []
    rows = backend.decoder.rows

    def counted(chunks, ids=(), caches=()):
        calls.append((sum(len(c) for c, _ in chunks), len(ids)))
        return rows(chunks, ids, caches)

    backend.decoder.rows = counted
    try:
        streams.append(engine.submit(second))
        engine.step()
    finally:
        del backend.decoder.rows
    assert calls == [(20, 2)]  # the second's 21 prompt ids but the last, then one decode row each
    out = [list(engine.responses(s)) for s in streams]
    assert [tokens(o) for o in out] == [tokens(a) for a in alone]


def test_n_replies_of_a_cached_prompt_beside_a_prefill(quirk):
    """n = 2 on a prompt the pool already holds (nothing to prefill), admitted in the step that
    prefills another prompt: the sibling forks the cache before the first reply's first decode,
    so both replies are the reply alone, log-probabilities included."""
    model, tok, backend = quirk
    prompt = prompt_ids(tok, 24, seed=50)
    ask = dict(max_tokens=5, ignore_eos=True, logprobs=0)
    alone = run(model, tok, backend, [Request(prompt, **ask)], max_batch=1)[0]
    engine = Engine(model, tok, max_batch=4, prefix_cache=4, backend=backend)
    list(engine.responses(engine.submit(Request(prompt, max_tokens=2, ignore_eos=True))))
    twice = engine.submit(Request(prompt, n=2, **ask))
    other = engine.submit(Request(prompt_ids(tok, 30, seed=51), max_tokens=3, ignore_eos=True))
    out = list(engine.responses(twice))
    assert out[-1].cached_tokens == len(prompt) - 1
    want = [r.logprob for r in alone if r.token is not None]
    for index in range(2):
        mine = [r for r in out if r.index == index and r.token is not None]
        assert [r.token for r in mine] == tokens(alone)
        assert [r.logprob for r in mine] == pytest.approx(want, abs=1e-4)
    assert len(tokens(engine.responses(other))) == 3
