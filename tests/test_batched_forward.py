"""A batched decode step (`Backend.decode`: B sequences of different lengths, one token each)
equals each sequence run alone, on the native CPU decoder and on the MLX-ops path."""

from __future__ import annotations

import fixtures
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

from mlx_mistral.cache import KVSettings, make_cache
from mlx_mistral.engine.backend import NATIVE_ENV, backend_for
from mlx_mistral.kernels import _build, dispatch
from mlx_mistral.kernels.cpu_model import NativeKVCache
from mlx_mistral.load import load_model

pytestmark = pytest.mark.usefixtures("float_activations")  # parity at float tolerances

native_only = pytest.mark.skipif(_build.compiler() is None or dispatch.backend() != "cpu",
                                 reason="the native decoder needs MLX's CPU backend and a C compiler")
LENGTHS = (3, 17, 40)  # the sequences' prompt lengths: the batch's rows hold different lengths


def prompts(vocab: int, lengths=LENGTHS) -> list[list[int]]:
    rng = np.random.default_rng(len(lengths))
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def prefilled(runner, ids: list[list[int]], settings=None) -> list[list]:
    """Per sequence, its caches holding all but its last id (that one is the decode input)."""
    settings = settings or [KVSettings()] * len(ids)
    caches = []
    for p, s in zip(ids, settings):
        c = runner.make_cache(s)
        mx.eval(runner(mx.array([p[:-1]]), c))
        caches.append(c)
    return caches


def scaled_err(got, want) -> float:
    got, want = np.array(got, np.float32), np.array(want, np.float32)
    return float(np.abs(got - want).max() / np.abs(want).max())


def check_batched_equals_alone(runner, ids: list[list[int]], steps: int = 5, settings=None) -> None:
    alone_caches, batch_caches = prefilled(runner, ids, settings), prefilled(runner, ids, settings)
    # one step: the batch's logits against each sequence's own forward, row for row
    batched = np.array(runner.decode([p[-1] for p in ids], batch_caches))
    assert batched.shape == (len(ids), runner.model.args.vocab_size)
    alone = [np.array(runner(mx.array([[p[-1]]]), c)[0, -1]) for p, c in zip(ids, alone_caches)]
    for b, want in enumerate(alone):
        # hidden states reach ~25,000 in SmolLM2; a quantized K/V can round one step apart when a
        # batch's matmul sums in another order than one row's (a flip of 1/255 of a group's range)
        quantized = settings is not None and settings[b].kv_bits is not None
        assert scaled_err(batched[b], want) < (1e-2 if quantized else 1e-4), b
    assert [c[0].offset for c in batch_caches] == [len(p) for p in ids]
    # greedy continuation: the batch's tokens equal each sequence's own
    got, want = [batched.argmax(-1).tolist()], [[int(a.argmax()) for a in alone]]
    for _ in range(steps):
        got.append(np.array(runner.decode(got[-1], batch_caches)).argmax(-1).tolist())
        want.append([int(np.array(runner(mx.array([[t]]), c)[0, -1]).argmax()) for t, c in zip(want[-1], alone_caches)])
    assert got == want


@pytest.fixture(scope="module")
def tiny_q4(tiny_q4_dir):
    """The Mistral quirks (head_dim 16 != hidden/heads, GQA 4:1, theta 1e8, untied head), 4-bit."""
    return load_model(tiny_q4_dir)


@pytest.fixture(scope="module")
def smollm2_q4(smollm2_dir):
    return fixtures.quantized_model(smollm2_dir, 64, 4)


@native_only
def test_native_batch_equals_alone_tiny_quirks(tiny_q4):
    runner = backend_for(tiny_q4)
    assert runner.name == "native-cpu"
    check_batched_equals_alone(runner, prompts(tiny_q4.args.vocab_size))


def test_mlx_batch_equals_alone_tiny_quirks(tiny_q4, tiny):
    for model in (tiny_q4, tiny[0]):  # 4-bit and float32 weights
        runner = backend_for(model, native=False)
        assert runner.name == "mlx" and type(runner.make_cache()[0]) is KVCache
        check_batched_equals_alone(runner, prompts(model.args.vocab_size))


@pytest.mark.slow
@native_only
def test_native_batch_equals_alone_smollm2(smollm2_q4):
    check_batched_equals_alone(backend_for(smollm2_q4), prompts(smollm2_q4.args.vocab_size), steps=8)


@pytest.mark.slow
def test_mlx_batch_equals_alone_smollm2(smollm2_q4):
    check_batched_equals_alone(backend_for(smollm2_q4, native=False), prompts(smollm2_q4.args.vocab_size), steps=8)


@native_only
def test_rotating_sequences_share_a_batch_with_native_ones(tiny_q4):
    """Rows whose caches are not the decoder's go through the MLX path in the same step."""
    runner = backend_for(tiny_q4)
    settings = [KVSettings(), KVSettings(max_kv_size=32), KVSettings()]  # the 40-token one wraps
    ids = prompts(tiny_q4.args.vocab_size, (3, 40, 9))
    assert [type(c[0]) for c in prefilled(runner, ids, settings)] == [NativeKVCache, RotatingKVCache, NativeKVCache]
    check_batched_equals_alone(runner, ids, settings=settings)


@pytest.mark.slow
@native_only
def test_quantized_kv_sequences_share_a_batch_with_native_ones(smollm2_q4):
    runner = backend_for(smollm2_q4)
    settings = [KVSettings(kv_bits=8), KVSettings(), KVSettings(kv_bits=4, kv_group_size=32), KVSettings()]
    ids = prompts(smollm2_q4.args.vocab_size, (3, 17, 40, 9))
    kinds = [type(c[0]) for c in prefilled(runner, ids, settings)]
    assert kinds == [QuantizedKVCache, NativeKVCache, QuantizedKVCache, NativeKVCache]
    check_batched_equals_alone(runner, ids, settings=settings)


@pytest.mark.parametrize("native", [None, False])
def test_a_batch_of_one_equals_call(tiny_q4, native):
    runner = backend_for(tiny_q4, native=native)
    ids = prompts(tiny_q4.args.vocab_size, (11,))[0]
    a, b = prefilled(runner, [ids]), prefilled(runner, [ids])
    got = np.array(runner.decode([ids[-1]], a))
    want = np.array(runner(mx.array([ids[-1:]]), b[0])[:, -1])
    assert np.array_equal(got, want)


def test_decode_wants_one_cache_per_token(tiny_q4):
    runner = backend_for(tiny_q4)
    with pytest.raises(ValueError, match="2 tokens but 1 caches"):
        runner.decode([5, 6], [runner.make_cache()])
    cache = runner.make_cache()
    with pytest.raises(ValueError, match="appears twice"):
        runner.decode([5, 6], [cache, cache])
    assert runner.decode([], []).shape == (0, tiny_q4.args.vocab_size)


@native_only
def test_the_switches_pick_the_backend(tiny_q4, tiny, monkeypatch):
    assert backend_for(tiny_q4) is backend_for(tiny_q4)  # one per model
    assert backend_for(tiny_q4).name == "native-cpu" and type(make_cache(tiny_q4)[0]) is NativeKVCache
    assert backend_for(tiny_q4, native=False).name == "mlx"
    assert backend_for(tiny_q4, native=True).name == "native-cpu"
    assert backend_for(tiny[0]).name == "mlx"  # float weights: nothing native to run
    with pytest.raises(ValueError, match="cannot run this model: a projection is not affine"):
        backend_for(tiny[0], native=True)
    monkeypatch.setenv(NATIVE_ENV, "0")
    assert backend_for(tiny_q4).name == "mlx" and type(make_cache(tiny_q4)[0]) is KVCache
    monkeypatch.delenv(NATIVE_ENV)
    assert backend_for(tiny_q4).name == "native-cpu"


def test_one_answer_for_backend_and_compute_dtype(tiny_q4):
    assert dispatch.backend() in ("cpu", "metal", "cuda")
    want = mx.float32 if dispatch.backend() == "cpu" else None
    assert dispatch.compute_dtype() == want
    assert dispatch.compute_dtype(tiny_q4) == (want or tiny_q4.model.norm.weight.dtype)


@native_only
def test_new_weights_rebuild_the_backend(tiny_q4_dir):
    """The decoder holds pointers into the weights: after an update it must run the new ones."""
    model = load_model(tiny_q4_dir)
    runner = backend_for(model)
    ids = prompts(model.args.vocab_size, (6,))[0]
    before = np.array(runner(mx.array([ids]), runner.make_cache()))
    old = runner.decoder
    norm = model.model.norm.weight
    model.model.update({"norm": {"weight": norm * 2 + 0.5}})  # as load_weights / set_dtype do
    assert backend_for(model) is runner and runner.decoder is not old
    got = np.array(runner(mx.array([ids]), runner.make_cache()))
    want = np.array(backend_for(model, native=False)(mx.array([ids]), make_cache(model)))
    assert scaled_err(got, want) < 1e-4 and scaled_err(got, before) > 1e-2


def test_a_copied_model_gets_its_own_backend(tiny_q4):
    import copy
    import pickle

    from mlx_mistral.model import Model

    runner = backend_for(tiny_q4)
    twin = copy.deepcopy(tiny_q4)
    assert backend_for(twin) is not runner and backend_for(twin).model is twin
    assert not any("backend" in k for k, _ in tree_flatten(tiny_q4.parameters()))  # not a parameter
    assert isinstance(pickle.loads(pickle.dumps(tiny_q4)), Model)  # the decoder's pointers are not pickled


def test_a_dropped_model_is_freed_with_its_backend(tiny_q4_dir):
    import gc
    import weakref

    model = load_model(tiny_q4_dir)
    backend_for(model)(mx.array([[5, 6]]))
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


@native_only
@pytest.mark.parametrize("window", [512, 7])  # 7: the rows span several C calls
def test_prefill_chunks_of_several_sequences_in_one_call(tiny_q4, monkeypatch, window):
    """`Backend.prefill` runs the chunks of several sequences as the rows of one native call
    (a long one through BLAS attention, short ones per row, one sequence continuing an earlier
    chunk); every cache then holds what prefilling each sequence alone gives, and the next
    decode step's logits match."""
    from mlx_mistral.kernels import cpu_model

    monkeypatch.setattr(cpu_model, "MAX_ROWS", window)
    runner = backend_for(tiny_q4)
    assert runner.decoder is not None
    ids = prompts(tiny_q4.args.vocab_size, (40, 3, 25, 9))
    alone = [runner.make_cache() for _ in ids]
    for p, c in zip(ids, alone):
        runner(mx.array([p[:-1]]), c)
    together = [runner.make_cache() for _ in ids]
    runner.prefill([(ids[2][:5], together[2])])  # an earlier chunk: the next one continues it
    runner.prefill([(p[5:-1] if i == 2 else p[:-1], c) for i, (p, c) in enumerate(zip(ids, together))])
    for a, t in zip(alone, together):
        assert t[0].offset == a[0].offset
        for la, lt in zip(a, t):
            n = la.offset
            assert scaled_err(lt.keys[..., :n, :], la.keys[..., :n, :]) < 1e-5
            assert scaled_err(lt.values[..., :n, :], la.values[..., :n, :]) < 1e-5
    got = np.array(runner.decode([p[-1] for p in ids], together))
    want = np.array(runner.decode([p[-1] for p in ids], alone))
    assert scaled_err(got, want) < 1e-5
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


@native_only
def test_decode_rows_after_prefill_rows_in_one_call(tiny_q4):
    """NativeDecoder.rows: a chunk and decode rows in one call, one sequence in both (its chunk
    first, then its next id): the logits are those of the rows fed one call at a time."""
    runner = backend_for(tiny_q4)
    ids = prompts(tiny_q4.args.vocab_size, (20, 6))
    one, two = [runner.make_cache() for _ in ids], [runner.make_cache() for _ in ids]
    runner(mx.array([ids[1][:-1]]), one[1])
    runner(mx.array([ids[1][:-1]]), two[1])
    runner(mx.array([ids[0][:-1]]), one[0])
    want = np.array(runner.decode([ids[0][-1], ids[1][-1]], one))
    got = np.array(runner.decoder.rows([(ids[0][:-1], two[0])], [ids[0][-1], ids[1][-1]], two))
    assert scaled_err(got, want) < 1e-5
    assert [c[0].offset for c in two] == [c[0].offset for c in one] == [20, 6]
    assert runner.decoder.rows([(ids[1][:2], two[1])]) is None  # no decode rows: no logits
