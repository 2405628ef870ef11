"""Tensor parallel over mx.distributed: 2 ranks on loopback (mlx.launch --backend ring) against
one process, on the tiny Mistral-quirk shape and the small preset."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from launching import CLI, LAUNCH, ROOT, TIMEOUT, free_port, launch, needs_launch, wait_healthy

from mlx_mistral.config import ModelArgs
from mlx_mistral.distributed.shard import check_ranks, local_args, split_axis
from mlx_mistral.errors import MistralError
from mlx_mistral.synth import synth

PROBE = ROOT / "tests" / "distributed_probe.py"


def probe(folder: Path, out: Path, ranks: int, *extra: str, env: dict = None) -> dict:
    args = [PROBE, "--model", folder, "--out", out, *extra]
    # float activations: with int8 ones (the x86 default) the split's float32 reordering can
    # round an activation the other way, a step of amax/127; test_cpu_kernels bounds those kernels
    env = dict(os.environ, MLX_MISTRAL_INT8="0", **(env or {}))
    if ranks == 1:
        done = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT,
                              env=env)
    else:
        done = launch(*args, n=ranks, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(np.load(out))


def assert_path(run: dict, native: bool) -> None:
    """Every rank ran the prompt on the native CPU decoder (its own KV caches), or on MLX ops."""
    assert list(run["native"]) == [int(native)] * len(run["native"]), run["native"]


def assert_batch_matches_alone(run: dict, atol: float) -> None:
    """Two sequences decoded in one batched step give what each gives alone."""
    np.testing.assert_array_equal(run["together"].argmax(-1), run["alone"].argmax(-1))
    np.testing.assert_allclose(run["together"], run["alone"], atol=atol, rtol=atol)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return {"tiny": synth(root / "tiny", "tiny"), "tiny-q4": synth(root / "tiny-q4", "tiny", bits=4)}


def test_split_axes_follow_megatron():
    assert split_axis("model.layers.3.self_attn.q_proj.weight") == 0
    assert split_axis("model.layers.3.mlp.up_proj.scales") == 0
    assert split_axis("model.layers.3.self_attn.o_proj.weight") == -1
    assert split_axis("model.layers.3.mlp.down_proj.biases") == -1
    assert split_axis("model.embed_tokens.weight") == 0
    assert split_axis("lm_head.scales") == 0
    assert split_axis("model.layers.3.input_layernorm.weight") is None
    assert split_axis("model.norm.weight") is None


def test_rank_count_that_does_not_divide_the_heads_is_one_line():
    args = ModelArgs(hidden_size=5120, num_hidden_layers=40, intermediate_size=32768, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=131072)
    assert local_args(args, 4).num_key_value_heads == 2 and local_args(args, 8).num_attention_heads == 4
    with pytest.raises(MistralError, match="3 ranks do not divide the model's 8 KV heads: run on 1 or 2 or 4 or 8"):
        check_ranks(args, 3)


@needs_launch
@pytest.mark.slow
@pytest.mark.parametrize("name,switch,native",
                         [("tiny", None, False), ("tiny-q4", None, True), ("tiny-q4", "0", False)])
def test_two_ranks_match_one_process(folders, tmp_path, name, switch, native):
    # 4-bit projections take the native decoder, its all_sums called from C; unquantized ones
    # (and MLX_MISTRAL_NATIVE_DECODER=0) keep MLX ops, on one process and on every rank alike
    env = {"MLX_MISTRAL_NATIVE_DECODER": switch} if switch else None
    one = probe(folders[name], tmp_path / "one.npz", 1, env=env)
    two = probe(folders[name], tmp_path / "two.npz", 2, env=env)
    assert_path(one, native)
    assert_path(two, native)
    assert list(two["backend_native"]) == [int(native)] * 2  # the backend each rank chose
    np.testing.assert_array_equal(one["ids"], two["ids"])  # greedy ids: identical
    np.testing.assert_allclose(two["prefill"], one["prefill"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(two["decode"], one["decode"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(two["together"], one["together"], atol=1e-4, rtol=1e-4)
    assert_batch_matches_alone(two, 1e-4)
    assert len(two["resident"]) == 2
    assert max(two["resident"]) <= 0.55 * one["resident"][0]


@needs_launch
@pytest.mark.slow
@pytest.mark.parametrize("kv_bits", [None, 8])  # quantized KV: the tiny shape's head_dim has no KV group
def test_small_preset_two_ranks_match_one_process(tmp_path_factory, tmp_path, kv_bits):
    folder = tmp_path_factory.getbasetemp() / "small-q4"
    if not folder.exists():
        synth(folder, "small", bits=4)
    extra = ("--kv-bits", str(kv_bits)) if kv_bits else ()
    one = probe(folder, tmp_path / "one.npz", 1, *extra)
    two = probe(folder, tmp_path / "two.npz", 2, *extra)
    # a plain KV cache takes the native decoder on every rank; a quantized one keeps MLX ops
    assert_path(one, kv_bits is None)
    assert_path(two, kv_bits is None)
    assert list(two["backend_native"]) == [1, 1]
    np.testing.assert_array_equal(one["ids"], two["ids"])
    # the split sums o/down in two partial sums: float32 rounding differs, and 8-bit KV groups
    # can round a value the other way
    np.testing.assert_allclose(two["prefill"], one["prefill"], atol=2e-2)
    np.testing.assert_allclose(two["decode"], one["decode"], atol=2e-2)
    np.testing.assert_allclose(two["together"], one["together"], atol=2e-2)
    assert_batch_matches_alone(two, 2e-2)
    assert max(two["resident"]) <= 0.55 * one["resident"][0]


@needs_launch
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "tiny-q4"])  # MLX ops; the native decoder
def test_generate_under_mlx_launch_prints_what_one_process_prints(folders, name):
    args = ["generate", "--model", str(folders[name]), "--prompt", "Hello there", "--max-tokens", "10",
            "--temp", "0"]
    one = subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=TIMEOUT)
    two = launch(CLI, *args)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout  # rank 0 alone writes to the terminal


@needs_launch
@pytest.mark.slow
def test_missing_model_folder_is_one_line_on_every_rank(tmp_path):
    two = launch(CLI, "generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi")
    # mlx.launch itself exits 0 whatever its ranks return: it reports them on stderr
    assert "rank 0 exited with code 1" in two.stderr
    assert "no such model folder" in two.stderr and "Traceback" not in two.stderr


def _ranks(launcher: subprocess.Popen) -> list[int]:
    """The rank processes mlx.launch started (its children)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher.pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@needs_launch
@pytest.mark.slow
def test_serve_on_two_ranks_answers_openai_and_stops_on_sigterm(folders):
    import os
    import signal

    import openai

    port = free_port()
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "--python", sys.executable, str(CLI), "serve",
           "--model", str(folders["tiny"]), "--port", str(port), "--no-ui"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=120)
        messages = [{"role": "user", "content": "Hello"}]
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                     stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == reply.choices[0].message.content  # greedy: the stream says what the reply said
        ranks = _ranks(proc)
        assert len(ranks) == 2
        for pid in ranks:  # as a service manager stops a job: every rank gets SIGTERM
            os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        # mlx.launch exits 0 whatever its ranks do; it names a rank that failed or was killed
        assert proc.returncode == 0 and "exited with code" not in err and "was killed" not in err, err[-2000:]
    finally:
        if proc.poll() is None:  # a failed test must not leave the ranks serving: the launcher's kill spares them
            for pid in _ranks(proc):
                os.kill(pid, signal.SIGKILL)
            proc.kill()


@needs_launch
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "tiny-q4"])  # MLX ops; the native decoder
def test_chat_under_mlx_launch_matches_one_process_across_turns_and_reset(folders, name):
    # turn 2 reuses turn 1's KV on every rank; after /reset every rank starts over
    turns = "Hello\nTell me more\n/reset\nHello\n/quit\n"
    args = ["chat", "--model", str(folders[name]), "--max-tokens", "6", "--temp", "0", "--context", "512"]
    one = subprocess.run([str(CLI), *args], input=turns, capture_output=True, text=True, timeout=TIMEOUT)
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "--python", sys.executable, str(CLI), *args]
    two = subprocess.run(cmd, input=turns, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    speeds = re.compile(r"[\d.]+ tokens/s")  # timings differ; the replies and cached counts must not
    assert "cached" in one.stdout
    assert speeds.sub("", two.stdout) == speeds.sub("", one.stdout)
