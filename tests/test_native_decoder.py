"""The native CPU decoder (one C call per forward) against the MLX-ops path of the same model.

Both are backends of one model (`engine.backend.backend_for`): `native` is the model's default
backend (the decoder), `ref` the same model with native=False (MLX ops)."""

from __future__ import annotations

import fixtures
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache

from mlx_mistral.cache import ConversationCache
from mlx_mistral.engine.backend import NATIVE_ENV, backend_for
from mlx_mistral.generate import generate_step
from mlx_mistral.kernels import _build, cpu, cpu_model

pytestmark = [pytest.mark.skipif(_build.compiler() is None, reason="no C compiler to build the native kernels"),
              pytest.mark.usefixtures("float_activations")]

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018,
          411, 407, 19712, 8182, 2, 198, 1, 520, 9531, 198]  # a SmolLM2 chat prompt, 25 ids


def quantized_copy(folder, group_size: int, bits: int, fuse: bool = True):
    """The folder's model quantized here (every Linear and the embedding): its native backend,
    and its MLX-ops backend (the dispatcher's per-matmul kernels) as the reference."""
    model = fixtures.quantized_model(folder, group_size, bits, fuse)
    return backend_for(model), backend_for(model, native=False)


def greedy(runner, prompt: list[int], n: int, monkeypatch, **kw) -> list[int]:
    """generate_step's tokens on `runner`'s path (generate_step picks the model's backend)."""
    with monkeypatch.context() as m:
        if runner.decoder is None:
            m.setenv(NATIVE_ENV, "0")
        return [t for t, _ in generate_step(mx.array(prompt), runner.model, max_tokens=n, **kw)]


def scaled_err(got, want) -> float:
    got, want = np.array(got, np.float32), np.array(want, np.float32)
    return float(np.abs(got - want).max() / np.abs(want).max())


def run(model, chunks: list[list[int]]) -> list[np.ndarray]:
    """Feed the chunks one after another through one cache; the logits of each."""
    cache = model.make_cache()  # model: a backend
    return [np.array(model(mx.array([c]), cache=cache)) for c in chunks]


@pytest.fixture(scope="module")
def smollm2_q4(smollm2_dir):
    return quantized_copy(smollm2_dir, 64, 4)


def test_smollm2_logits_and_greedy_tokens_match_the_mlx_path(smollm2_q4, monkeypatch):
    native, ref = smollm2_q4
    assert (native.name, ref.name) == ("native-cpu", "mlx") and ref.decoder is None
    assert type(native.make_cache()[0]) is cpu_model.NativeKVCache
    # prefill (C head for <= 8 rows, MLX head above), then single-token decode steps
    chunks = [PROMPT[:8], PROMPT[8:], [28], [7018], PROMPT[:3]]
    for got, want in zip(run(native, chunks), run(ref, chunks)):
        assert got.shape == want.shape
        assert scaled_err(got, want) < 1e-4  # hidden states reach ~25,000: the logits' own scale
        assert (got.argmax(-1) == want.argmax(-1)).all()
    assert greedy(native, PROMPT, 24, monkeypatch) == greedy(ref, PROMPT, 24, monkeypatch)


def test_long_inputs_run_in_several_native_calls(smollm2_q4, monkeypatch):
    native, ref = smollm2_q4
    monkeypatch.setattr(cpu_model, "MAX_ROWS", 7)  # 25 ids: four calls, the last one 4 rows
    for got, want in zip(run(native, [PROMPT, [28]]), run(ref, [PROMPT, [28]])):
        assert scaled_err(got, want) < 1e-4


@pytest.mark.parametrize("group_size,bits,fuse", [(32, 4, True), (128, 4, False), (64, 8, True), (32, 8, False)])
def test_mistral_quirks_every_format(tiny_dir, group_size, bits, fuse):
    """head_dim 16 (not hidden/heads), 4:1 GQA, theta 1e8, untied head; fused or separate q/k/v."""
    native, ref = quantized_copy(tiny_dir, group_size, bits, fuse)
    assert native.decoder is not None
    ids = list(range(5, 45))
    chunks = [ids[:20], ids[20:25], [7], [8], ids[25:]]  # 20 rows: attention through BLAS
    for got, want in zip(run(native, chunks), run(ref, chunks)):
        assert scaled_err(got, want) < 1e-4


def test_cache_trim_and_mlx_path_writes_stay_consistent(smollm2_q4):
    native, ref = smollm2_q4
    cache = native.make_cache()
    native(mx.array([PROMPT]), cache=cache)
    for c in cache:
        c.trim(5)  # speculation and conversation reuse roll back like this
    ref(mx.array([[198, 1]]), cache=cache)  # the MLX path appends to the same caches (its own buffers)...
    # ...and the decoder takes them over again
    got = np.array(native(mx.array([[520]]), cache=cache))
    want = run(ref, [PROMPT[:-5] + [198, 1], [520]])[1]
    assert cache[0].offset == len(PROMPT) - 5 + 3
    assert scaled_err(got, want) < 1e-4


def test_conversation_cache_reuses_the_native_prefix(smollm2_q4, monkeypatch):
    native, _ = smollm2_q4
    conv = ConversationCache(native.model)
    assert type(conv.cache[0]) is cpu_model.NativeKVCache
    first = [t for t, _ in conv.follow(PROMPT, generate_step(mx.array(PROMPT), native.model, max_tokens=4,
                                                                prompt_cache=conv.cache))]
    again = PROMPT + first + [2, 198]
    reused = conv.reuse(again)
    assert reused > len(PROMPT)
    fresh = greedy(native, again, 6, monkeypatch)
    assert greedy(native, again[reused:], 6, monkeypatch, prompt_cache=conv.cache) == fresh


def test_state_round_trips_through_plain_kv_caches(smollm2_q4):
    native, _ = smollm2_q4
    cache = native.make_cache()
    native(mx.array([PROMPT]), cache=cache)
    plain = []
    for c in cache:  # what a prompt-cache file holds
        p = KVCache()
        p.state = c.state
        plain.append(p)
    adopted = [cpu_model.NativeKVCache.like(p) for p in plain]
    got = np.array(native(mx.array([[28]]), cache=adopted))
    want = np.array(native(mx.array([[28]]), cache=cache))
    assert scaled_err(got, want) < 1e-6


def test_dense_models_and_the_switches_keep_the_mlx_path(tiny, smollm2_q4, monkeypatch):
    model, _ = tiny  # bf16 checkpoint computing in float32, not quantized: nothing native to run
    assert backend_for(model).name == "mlx"
    assert type(backend_for(model).make_cache()[0]) is KVCache
    native, _ = smollm2_q4
    monkeypatch.setenv(NATIVE_ENV, "0")
    assert backend_for(native.model).name == "mlx"
    assert type(backend_for(native.model).make_cache()[0]) is KVCache
    monkeypatch.delenv(NATIVE_ENV)
    assert backend_for(native.model).name == "native-cpu"


def test_new_weights_rebuild_the_decoder(smollm2_q4):
    native, _ = smollm2_q4
    before = native.decoder
    assert backend_for(native.model).decoder is before  # unchanged weights: the same decoder
    native.model.load_weights([(k, mx.array(v)) for k, v in tree_flatten(native.model.parameters())])
    assert backend_for(native.model) is native and native.decoder is not before


def test_out_of_range_token_is_a_clear_error(smollm2_q4):
    native, _ = smollm2_q4
    with pytest.raises(ValueError, match="token id out of range"):
        native(mx.array([[49152]]), cache=native.make_cache())
    with pytest.raises(ValueError, match="token id out of range"):
        native.decode([5, 49152], [native.make_cache(), native.make_cache()])


@pytest.fixture
def avx2_only():
    lib = cpu._library()[0]
    lib.mm_use_avx512(0)
    yield lib
    lib.mm_use_avx512(1)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 13, 32])
def test_avx512_gemv_matches_mlx_and_avx2(avx2_only, group_size, M):
    """The AVX-512 GEMVs (one input row; 2..32 rows in blocks of up to 8) against MLX's op and
    against the AVX2 kernels (which take M < 12 here; dequantize + BLAS above)."""
    if cpu._library()[0].mm_simd() < 2:
        pytest.skip("no AVX2 on this machine")
    for n, k in [(97, 640), (1, 128), (33, 4096), (16, 192)]:
        k = max(group_size, k // group_size * group_size)
        w, s, b = mx.quantize(mx.random.normal((n, k), key=mx.random.key(n)), group_size=group_size, bits=4)
        x = mx.random.normal((M, k), key=mx.random.key(k))
        want = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=group_size, bits=4)
        avx2 = cpu.quantized_matmul(x, w, s, b, group_size=group_size, bits=4)
        avx2_only.mm_use_avx512(1)
        wide = cpu.quantized_matmul(x, w, s, b, group_size=group_size, bits=4)
        avx2_only.mm_use_avx512(0)
        assert scaled_err(avx2, want) < 1e-5 and scaled_err(wide, want) < 1e-5, (n, k)


def test_a_copied_model_builds_its_own_decoder(smollm2_q4):
    import copy

    native, _ = smollm2_q4
    draft = copy.deepcopy(native.model)
    draft.model.layers = draft.model.layers[:8]  # how benchmarks/speculate.py makes its draft model
    runner, ref = backend_for(draft), backend_for(draft, native=False)
    assert runner is not native and runner.decoder.md.n_layers == 8
    got = np.array(runner(mx.array([PROMPT[:8]]), cache=runner.make_cache()))
    want = np.array(ref(mx.array([PROMPT[:8]]), cache=ref.make_cache()))
    assert scaled_err(got, want) < 1e-4


def test_verbose_names_the_forward_path(smollm2_q4, monkeypatch):
    from mlx_mistral.load import runtime_summary

    native, _ = smollm2_q4
    assert runtime_summary(native.model).endswith("forward: native CPU decoder (one C call per step)")
    assert "no --kv-bits" in runtime_summary(native.model, kv_bits=8)
    monkeypatch.setenv(NATIVE_ENV, "0")
    assert runtime_summary(native.model).endswith(f"forward: MLX ops ({NATIVE_ENV}=0)")


def test_portable_build_runs_the_decoder_too(smollm2_q4, float_activations):
    """The kernels non-x86 machines get (NEON through the compiler), forced on this one; the
    reference on float activations (int8 ones are bounded in test_cpu_kernels)."""
    native, ref = smollm2_q4
    lib = cpu._library()[0]
    lib.mm_use_portable(1)
    try:
        assert lib.mm_simd() == 0
        got = run(native, [PROMPT, [28]])
    finally:
        lib.mm_use_portable(0)
        lib.mm_use_int8(0)  # leaving the portable kernels restores the defaults
    for g, w in zip(got, run(ref, [PROMPT, [28]])):
        assert scaled_err(g, w) < 1e-4


@pytest.mark.parametrize("portable", [False, True])
def test_decode_rows_attend_over_a_long_cache(smollm2_q4, portable, float_activations):
    """Decode rows (attention per KV head and row, then the MLP's SiLU) at ~300 cached positions,
    a count that is not a multiple of 8: the AVX2 versions (e^x in 8 lanes, masked tails) and
    the portable C ones both match MLX (float activations on both sides)."""
    native, ref = smollm2_q4
    chunks = [[int(i) for i in np.random.default_rng(0).integers(100, 40000, 299)], [28], [7018], [5]]
    lib = cpu._library()[0]
    lib.mm_use_portable(int(portable))
    lib.mm_use_int8(0)  # mm_use_portable picks the default kernels again
    try:
        got = run(native, chunks)
    finally:
        lib.mm_use_portable(0)
        lib.mm_use_int8(0)  # leaving the portable kernels restores the defaults
    for g, w in zip(got[1:], run(ref, chunks)[1:]):
        assert scaled_err(g, w) < 1e-4
        assert g.argmax() == w.argmax()
