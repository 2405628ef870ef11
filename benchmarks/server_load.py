"""Load test of `mlx-mistral serve` on loopback: throughput and latency under concurrent clients.

Starts the server as a subprocess, sends N streaming chat requests from C concurrent clients
and reports requests/s, p50/p95 time to first token and end-to-end latency, and aggregate decode
tokens/s. As the baseline it first runs the same prompts one by one through `stream_generate`
in this process (no HTTP, no queue), so the JSON shows what serving costs on the same machine.

    python benchmarks/server_load.py                      # small 4-bit synth model in /tmp
    python benchmarks/server_load.py -m MODEL -n 32 -c 4 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx_mistral  # noqa: F401  (loads OpenBLAS before mlx.core)

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

DEFAULT_MODEL = Path("/tmp/mlx-mistral-small-q4")
RESULTS = Path(__file__).parent / "results" / "cpu"
TOPICS = ["rivers", "bridges", "violins", "glaciers", "lighthouses", "comets", "bees", "clocks"]
console = Console(stderr=True)


def prompts(n: int) -> list[list[dict]]:
    """Distinct questions: requests share the chat preamble but not the question."""
    return [[{"role": "user", "content": f"Request {i}: write a few sentences about {TOPICS[i % len(TOPICS)]}."}]
            for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(records: list[dict], wall_s: float) -> dict:
    ttft = [r["ttft_s"] for r in records]
    e2e = [r["e2e_s"] for r in records]
    tokens = sum(r["completion_tokens"] for r in records)
    decode = [(r["completion_tokens"] - 1) / (r["e2e_s"] - r["ttft_s"])
              for r in records if r["completion_tokens"] > 1 and r["e2e_s"] > r["ttft_s"]]
    return {
        "requests": len(records), "wall_s": wall_s, "requests_per_s": len(records) / wall_s,
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
        "e2e_p50_s": percentile(e2e, 0.5), "e2e_p95_s": percentile(e2e, 0.95),
        "completion_tokens": tokens, "aggregate_decode_tokens_per_s": tokens / wall_s,
        "per_request_decode_tokens_per_s_p50": statistics.median(decode) if decode else None,
    }


def progress_bar() -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console, transient=True)


# -- baseline: the Python API, one request at a time ----------------------------------------------

def run_direct(model_path: Path, messages: list[list[dict]], max_tokens: int) -> dict:
    from mlx_mistral import load, stream_generate

    model, tokenizer = load(model_path)
    stream_generate_kw = dict(max_tokens=max_tokens, temperature=0.0)
    for _ in stream_generate(model, tokenizer, messages[0], **stream_generate_kw):  # warm-up
        pass
    records = []
    with progress_bar() as progress:
        task = progress.add_task(f"{len(messages)} requests, one at a time", total=len(messages))
        start = time.perf_counter()
        for m in messages:
            tic = time.perf_counter()
            first = None
            for r in stream_generate(model, tokenizer, m, **stream_generate_kw):
                if first is None and r.token is not None:
                    first = time.perf_counter() - tic
            records.append({"ttft_s": first, "e2e_s": time.perf_counter() - tic,
                            "completion_tokens": r.generation_tokens})
            progress.advance(task)
        wall = time.perf_counter() - start
    return summarize(records, wall)


# -- the server ---------------------------------------------------------------------------------

def start_server(model_path: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "mlx_mistral.cli", "serve", "-m", str(model_path),
                             "--port", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        found = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


async def one_request(client: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    tic = time.perf_counter()
    ttft = None
    usage = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - tic
    e2e = time.perf_counter() - tic
    return {"ttft_s": ttft if ttft is not None else e2e, "e2e_s": e2e,
            "completion_tokens": usage["completion_tokens"], "cached_tokens":
            usage["prompt_tokens_details"]["cached_tokens"]}


async def run_load(url: str, messages: list[list[dict]], concurrency: int, max_tokens: int) -> tuple[dict, list]:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, messages[0], max_tokens)  # warm-up
        pending = list(messages)
        records = []
        with progress_bar() as progress:
            task = progress.add_task(f"{len(messages)} requests, {concurrency} at a time", total=len(messages))

            async def client_loop():
                while pending:
                    records.append(await one_request(client, url, pending.pop(0), max_tokens))
                    progress.advance(task)

            start = time.perf_counter()
            await asyncio.gather(*(client_loop() for _ in range(concurrency)))
            wall = time.perf_counter() - start
    return summarize(records, wall), records


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("ttft_s", "time to first token"), ("e2e_s", "end to end")):
        values = sorted(r[key] for r in records)
        ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=label)
    ax.set_xlabel("seconds")
    ax.set_ylabel("fraction of requests")
    ax.set_title("mlx-mistral serve: latency under load")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("-n", "--requests", type=int, default=32)
    ap.add_argument("-c", "--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=RESULTS / "server_load.json")
    args = ap.parse_args()
    if not args.model.exists():
        from mlx_mistral.synth import synth

        console.print(f"writing the small 4-bit synth model to {args.model}")
        synth(args.model, "small", bits=4, group_size=64)

    messages = prompts(args.requests)
    console.print("baseline: stream_generate, one request at a time")
    direct = run_direct(args.model, messages, args.max_tokens)
    proc, url = start_server(args.model)
    try:
        served, records = asyncio.run(run_load(url, messages, args.concurrency, args.max_tokens))
    finally:
        proc.terminate()
        proc.wait(60)

    result = {
        "benchmark": "server_load", "model": str(args.model), "requests": args.requests,
        "concurrency": args.concurrency, "max_tokens": args.max_tokens, "temperature": 0,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "server": served, "direct_sequential": direct,
        "ratio_server_to_direct_tokens_per_s": served["aggregate_decode_tokens_per_s"]
        / direct["aggregate_decode_tokens_per_s"],
        "cached_tokens_mean": statistics.mean(r["cached_tokens"] for r in records),
        "records": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(records, args.out.with_suffix(".png"))

    table = Table(title=f"{args.requests} requests, {args.concurrency} concurrent, {args.max_tokens} tokens each")
    table.add_column("")
    table.add_column("server", justify="right")
    table.add_column("stream_generate, sequential", justify="right")
    for key, fmt in (("requests_per_s", "{:.2f}"), ("ttft_p50_s", "{:.3f}"), ("ttft_p95_s", "{:.3f}"),
                     ("e2e_p50_s", "{:.3f}"), ("e2e_p95_s", "{:.3f}"), ("aggregate_decode_tokens_per_s", "{:.1f}")):
        table.add_row(key, fmt.format(served[key]), fmt.format(direct[key]))
    Console().print(table)
    console.print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
