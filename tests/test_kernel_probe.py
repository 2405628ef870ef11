"""GPU kernels are proven once per process before use: a kernel that fails to build or gives
wrong values is one warning and MLX's own op from then on. No GPU here: fake kernels stand in,
injected through the dispatcher's table of GPU sources."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import mlx.core as mx
import pytest

from mlx_mistral.kernels import dispatch


def weights(N=64, K=512, group_size=64):
    w = mx.random.normal((N, K), key=mx.random.key(1)) * 0.02
    return mx.quantize(w, group_size=group_size, bits=4)


def mlx_op(name, x, w, s, b, group_size):
    y = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=group_size, bits=4)
    return dispatch.silu_mul(y) if name == "gate_up_silu" else y


def fake_source(behaviour: str, calls: list):
    """A stand-in for metal.py / cuda.py whose kernels behave as `behaviour` says."""

    def kernel(name):
        def run(*, inputs, template, output_shapes, output_dtypes, **_):
            calls.append(name)
            x, w, s, b = inputs
            group_size = dict(template)["GROUP_SIZE"]
            right = mlx_op(name, x, w, s, b, group_size).astype(output_dtypes[0])
            if behaviour == "raises":
                raise RuntimeError("[metal_kernel] Unable to build kernel mlx_mistral_qmv_q4:\nerror: ...")
            if behaviour == "wrong":
                return [right * 1.5]
            if behaviour == "nan":
                return [right * float("nan")]
            if behaviour == "shape":
                return [right[:, :-1]]
            return [right]

        return run

    return SimpleNamespace(kernel=kernel)


@pytest.fixture
def gpu(monkeypatch):
    """Pretend this process runs on Metal with kernels of a chosen behaviour; a fresh proof table."""
    monkeypatch.setattr(dispatch, "PROVEN", {})
    monkeypatch.setattr(dispatch, "backend", lambda: "metal")
    calls: list = []

    def use(behaviour):
        monkeypatch.setitem(dispatch._GPU_SOURCES, "metal", fake_source(behaviour, calls))
        return calls

    return use


CASES = ["raises", "wrong", "nan", "shape"]


@pytest.mark.parametrize("behaviour", CASES)
@pytest.mark.parametrize("op", ["qmv", "gate_up_silu"])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_a_bad_kernel_is_one_warning_then_mlx(gpu, behaviour, op, dtype):
    calls = gpu(behaviour)
    w, s, b = weights(N=128)
    x = mx.random.normal((4, 512), key=mx.random.key(2)).astype(dtype)
    call = dispatch.quantized_matmul if op == "qmv" else dispatch.gate_up_silu
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = call(x, w, s, b, group_size=64, bits=4)
        second = call(x, w, s, b, group_size=64, bits=4)
    assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
    message = str(caught[0].message)
    assert len(message.splitlines()) == 1 and "MLX's quantized matmul" in message and op in message
    assert calls == [op]  # probed once; every real call went to MLX
    want = mlx_op(op, x, w, s, b, 64)
    assert mx.array_equal(first, want).item() and mx.array_equal(second, want).item()
    assert dispatch.choose(op, x, w, s, 64, 4) == "mlx"


def test_a_good_kernel_is_probed_once_per_key_and_then_used(gpu):
    calls = gpu("right")
    w, s, b = weights()
    x = mx.random.normal((3, 512), key=mx.random.key(3)).astype(mx.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            dispatch.quantized_matmul(x, w, s, b, group_size=64, bits=4)
        dispatch.quantized_matmul(x.astype(mx.bfloat16), w, s, b, group_size=64, bits=4)
    # one probe for float16, one for bfloat16; every other call ran the (fake) kernel itself
    assert calls.count("qmv") == 3 + 1 + 2
    assert sorted(k[2] == mx.float16 for k in dispatch.PROVEN) == [False, True]
    assert all(dispatch.PROVEN.values())


def test_one_bad_dtype_does_not_condemn_the_others(gpu, monkeypatch):
    gpu("right")
    good = dispatch._GPU_SOURCES["metal"]

    def kernel(name):
        run = good.kernel(name)

        def maybe_wrong(**kw):
            (y,) = run(**kw)
            return [y * 2] if kw["output_dtypes"][0] == mx.bfloat16 else [y]

        return maybe_wrong

    monkeypatch.setitem(dispatch._GPU_SOURCES, "metal", SimpleNamespace(kernel=kernel))
    w, s, _ = weights()
    x = mx.zeros((2, 512))
    with pytest.warns(RuntimeWarning, match="bfloat16"):
        assert dispatch.choose("qmv", x.astype(mx.bfloat16), w, s, 64, 4) == "mlx"
    assert dispatch.choose("qmv", x.astype(mx.float16), w, s, 64, 4) == "metal"


def test_the_real_sources_fail_their_probe_here_without_a_crash(monkeypatch):
    """On this CPU-only build the Metal and CUDA kernels cannot run: pretending to be on either
    backend must still give MLX's numbers, with one warning."""
    monkeypatch.setattr(dispatch, "PROVEN", {})
    w, s, b = weights()
    x = mx.random.normal((2, 512), key=mx.random.key(4)).astype(mx.float16)
    for where in ("metal", "cuda"):
        monkeypatch.setattr(dispatch, "backend", lambda: where)
        with pytest.warns(RuntimeWarning, match=f"our {where} qmv kernel"):
            y = dispatch.quantized_matmul(x, w, s, b, group_size=64, bits=4)
        assert mx.array_equal(y, mlx_op("qmv", x, w, s, b, 64)).item()
