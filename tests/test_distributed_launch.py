"""A sharded model under the launcher: `bench` on 2 ranks, misconfiguration (a rank count that
does not divide the heads, hosts that do not answer) and failures inside a step, each ending
every rank with one line and a non-zero status instead of a hang; the conversation registry
stays bounded and in step on every rank."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from launching import (CLI, ROOT, error_lines, finish, free_port, free_ports, launch, needs_launch, ring_hostfile,
                       start_rank, wait_healthy)

from mlx_mistral.synth import synth

PROBE = ROOT / "tests" / "lockstep_probe.py"
QUICK = 300  # s: a misconfigured run must end well before TIMEOUT


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("launch") / "tiny", "tiny")


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory):
    """4-bit: a sharded model of it takes the native decoder, its all_sums called from C."""
    return synth(tmp_path_factory.mktemp("launch") / "tiny", "tiny", bits=4)


def by_hand(tmp_path, ranks: int, *args, env=None, timeout=QUICK):
    """Every rank started without the launcher (which kills the others once one fails)."""
    hostfile = ring_hostfile(tmp_path / "ring.json", free_ports(ranks))
    return finish([start_rank(r, hostfile, *args, env=env) for r in range(ranks)], timeout=timeout)


def assert_one_line_each(results, needle: str) -> None:
    for rank, (status, _, stderr) in enumerate(results):
        assert status != 0, f"rank {rank} exited 0"
        assert "Traceback" not in stderr, stderr[-2000:]
        lines = error_lines(stderr)
        assert len(lines) == 1 and needle in lines[0], f"rank {rank}: {stderr[-2000:]}"


@needs_launch
@pytest.mark.slow
def test_bench_under_mlx_launch_times_the_sharded_model(tiny):
    from mlx_mistral.bench import weight_bytes
    from mlx_mistral.load import load_model

    done = launch(CLI, "bench", "--model", tiny, "--prompt-tokens", "16", "--generation-tokens", "8",
                  "--num-trials", "1", "--peak-gbps", "10", "--json")
    assert done.returncode == 0 and "exited with code" not in done.stderr, done.stderr[-2000:]
    result = json.loads(done.stdout)  # rank 0 alone prints
    assert result["runtime"] == "mlx-mistral, 2 ranks"
    assert len(result["trials"]) == 1 and result["trials"][0]["generation_tokens"] == 8
    assert result["median"]["decode_tps"] > 0 and result["median"]["prefill_tps"] > 0
    assert result["weight_bytes"] <= 0.55 * weight_bytes(load_model(tiny))  # rank 0's shard
    # a rank reads one row of its embedding slice per token, all of its head slice
    assert result["weight_bytes_per_token"] < result["weight_bytes"]


@needs_launch
@pytest.mark.slow
def test_three_ranks_on_two_kv_heads_end_every_rank_with_one_line(tiny, tmp_path):
    args = (CLI, "generate", "--model", tiny, "--prompt", "hi", "--max-tokens", "2")
    assert_one_line_each(by_hand(tmp_path, 3, *args), "3 ranks do not divide the model's 2 KV heads: run on 1 or 2")
    done = launch(*args, n=3, timeout=QUICK)  # the launcher: the first rank to fail ends the others
    assert "exited with code 1" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert error_lines(done.stderr) and all("do not divide" in line for line in error_lines(done.stderr))


@needs_launch
def test_a_rank_whose_peers_never_answer_ends_with_one_line(tiny, tmp_path):
    # MLX's accepting side waits forever and its connecting side retries for ~30 s: each rank
    # started alone, on a ring of its own where nobody listens at the other address
    args = (CLI, "generate", "--model", tiny, "--prompt", "hi")
    env = {"MLX_MISTRAL_CONNECT_TIMEOUT": "3"}
    tic = time.monotonic()
    alone = finish([start_rank(r, ring_hostfile(tmp_path / f"ring{r}.json", free_ports(2)), *args, env=env)
                    for r in (0, 1)], timeout=120)
    assert time.monotonic() - tic < 60
    assert_one_line_each(alone, "the other ranks did not answer within 3 s")
    assert "127.0.0.1" in alone[0][2]  # the addresses it waited for are named


@needs_launch
@pytest.mark.slow
def test_a_hostfile_address_no_host_has_is_one_line(tiny, tmp_path):
    hosts = tmp_path / "hosts.json"  # rank 1 runs here, but its address (TEST-NET-1) is nobody's
    hosts.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "127.0.0.1", "ips": ["192.0.2.1"]}]))
    done = launch(CLI, "generate", "--model", tiny, "--prompt", "hi", hostfile=hosts, timeout=QUICK)
    assert "Traceback" not in done.stderr and "rank 1 exited with code 1" in done.stderr, done.stderr[-2000:]
    (line,) = error_lines(done.stderr)
    assert "rank 1 cannot reach the other ranks" in line and "192.0.2.1" in line


def probe(folder, tmp_path, ranks: int, mode: str, failing: int = 0) -> list[dict]:
    """Each rank's report from tests/lockstep_probe.py (run alone when `ranks` is 1)."""
    out = tmp_path / f"{mode}-{ranks}"
    args = (PROBE, "--model", folder, "--out", out, "--mode", mode, "--rank", failing)
    if ranks == 1:
        alone = subprocess.Popen([sys.executable, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, cwd=ROOT)
        results = finish([alone], timeout=600)
    else:
        results = by_hand(tmp_path, ranks, *args, timeout=600)
    for status, _, stderr in results:
        assert status == 0, stderr[-2000:]
    return [json.loads(out.with_name(f"{out.name}.{r}").read_text()) for r in range(ranks)]


@needs_launch
@pytest.mark.slow
def test_a_kept_conversation_outlives_many_others_on_every_rank(tiny, tmp_path):
    one = probe(tiny, tmp_path, 1, "conversations")
    two = probe(tiny, tmp_path, 2, "conversations")
    # 12 conversations came and went after it; its copy on rank 1 is still the one rank 0 uses
    assert two[0]["second"] == one[0]["second"]
    # rank 0 holds weak references (its caller let go of all); rank 1 holds a copy of the kept one only
    assert two[0]["held"] == 0 and two[1]["held"] == 1


@needs_launch
@pytest.mark.slow
@pytest.mark.parametrize("failing", [0, 1])
def test_a_reply_whose_sampling_fails_on_one_rank_fails_on_every_rank(tiny, tmp_path, failing):
    one = probe(tiny, tmp_path, 1, "fail-sample")
    two = probe(tiny, tmp_path, 2, "fail-sample", failing)
    expected = "injected sampling failure" if failing == 0 else "failed on another rank"
    assert expected in two[0]["failed"]
    assert two[0]["next"] == one[0]["next"]  # the ranks still step together: the next reply is right


@needs_launch
@pytest.mark.slow
@pytest.mark.parametrize("failing", [0, 1])
def test_a_step_that_raises_on_one_rank_ends_every_rank_with_one_line(tiny, tmp_path, failing):
    args = (PROBE, "--model", tiny, "--out", tmp_path / "fail", "--mode", "fail-step", "--rank", failing)
    results = by_hand(tmp_path, 2, *args)
    assert_one_line_each(results, "")
    assert "injected forward failure" in error_lines(results[failing][2])[0]
    other = results[1 - failing][2]
    assert "lost the other ranks" in error_lines(other)[0] or "connection to a peer was lost" in error_lines(other)[0]


@needs_launch
@pytest.mark.slow
@pytest.mark.parametrize("failing", [0, 1])
def test_a_server_whose_step_raises_on_one_rank_ends_every_rank_with_one_line(tiny_q4, tmp_path, failing):
    # On MLX ops, rank 0 can wait forever in MLX's ring all_reduce once rank 1 has gone (seen with
    # failing=1 on the unquantized tiny model): this runs the native path, where it ends
    import httpx

    port = free_port()
    args = (PROBE, "--model", tiny_q4, "--out", tmp_path / "serve", "--mode", "fail-serve", "--rank", failing,
            "--port", port)
    hostfile = ring_hostfile(tmp_path / "ring.json", free_ports(2))
    ranks = [start_rank(r, hostfile, *map(str, args)) for r in range(2)]
    try:
        wait_healthy(f"http://127.0.0.1:{port}", ranks[0])
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=QUICK)
        assert reply.status_code >= 500 and "failed" in reply.text, reply.text
    finally:
        results = finish(ranks, timeout=QUICK)  # every rank ends by itself, or is killed and the test fails
    for rank, (status, _, stderr) in enumerate(results):
        assert status == 1, f"rank {rank} exited {status}: {stderr[-2000:]}"
    assert_one_line_each(results, "")
    assert "injected forward failure" in error_lines(results[failing][2])[0]
