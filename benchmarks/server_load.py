"""Serving under concurrent load: `mlx-mistral serve` against `mlx_lm.server`, same folder, same run.

For each model and each runtime, the server runs as a subprocess on loopback; at each level of
1, 2, 4 and 8 concurrent streams, that many clients each send `--rounds` streaming chat
requests of `--max-tokens` greedy tokens (distinct questions). Reported per level: aggregate
decode tokens/s (completion tokens / wall time) and TTFT p50/p95. Writes JSON, a plot and a
markdown table under benchmarks/results/<device>/.

Both servers read one folder with one Hugging Face tokenizer (SmolLM2's), so they see the
same prompt ids: the small preset is written with SmolLM2's vocabulary size for that.

    python benchmarks/server_load.py                       # small preset (4-bit) and SmolLM2
    python benchmarks/server_load.py --models smollm2 --levels 1,8 --runtimes mlx-mistral
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/fixtures.py

import mlx_mistral  # noqa: E402,F401  (loads OpenBLAS before mlx.core)

import fixtures  # noqa: E402
import httpx  # noqa: E402
from rich.console import Console  # noqa: E402

from mlx_mistral.bench import chip_name as cpu_name, device_slug  # noqa: E402

TOPICS = ["rivers", "bridges", "violins", "glaciers", "lighthouses", "comets", "bees", "clocks"]
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
console = Console(stderr=True)


# -- the model folders ------------------------------------------------------------------------------

def small_folder() -> Path:
    """The small preset, 4-bit, with SmolLM2's tokenizer (and vocabulary size) instead of Tekken."""
    from mlx_mistral import synth

    out = fixtures.CACHE / "small-q4-smollm2-tokenizer"
    if not (out / "config.json").exists():
        synth.PRESETS["small-hf"] = dict(synth.PRESETS["small"], vocab_size=49152)
        synth.synth(out, "small-hf", bits=4, group_size=64, force=True)
        (out / "tekken.json").unlink()
        for name in HF_TOKENIZER_FILES:
            if (fixtures.smollm2_hf() / name).exists():
                shutil.copy(fixtures.smollm2_hf() / name, out / name)
    return out


def smollm2_folder() -> Path:
    from mlx_lm import convert  # the same folder benchmarks/cpu_peers.py uses

    out = fixtures.CACHE / "smollm2-mlx-q4g64"
    if not (out / "config.json").exists():
        convert(str(fixtures.smollm2_hf()), str(out), quantize=True, q_group_size=64, q_bits=4)
    return out


MODELS = {"small": small_folder, "smollm2": smollm2_folder}


# -- the servers ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# mlx_lm.server with its model cast to another compute dtype after loading (as compare.py's
# --mlx-lm-dtype does in-process): MLX's CPU quantized matmul is ~10x slower in bfloat16
MLX_LM_CAST = """
import sys, mlx.core as mx, mlx_lm.server as server
dtype, load = getattr(mx, sys.argv.pop(1)), server.load
def cast(*a, **k):
    out = load(*a, **k)
    out[0].set_dtype(dtype)
    return out
server.load = cast
server.main()
"""


def start(runtime: str, folder: Path, max_batch: int, mlx_lm_dtype: str = "checkpoint") -> tuple[subprocess.Popen, str]:
    port = free_port()
    if runtime == "mlx-mistral":
        cmd = [sys.executable, "-m", "mlx_mistral.cli", "serve", "-m", str(folder), "--port", str(port),
               "--max-batch", str(max_batch), "--no-ui"]
    elif mlx_lm_dtype == "checkpoint":
        cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(folder), "--port", str(port)]
    else:
        cmd = [sys.executable, "-c", MLX_LM_CAST, mlx_lm_dtype, "--model", str(folder), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{runtime} server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{runtime} server did not start within 300 s")


# -- the load -------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> dict:
    messages = [{"role": "user", "content": f"Request {i}: write a few sentences about {TOPICS[i % len(TOPICS)]}."}]
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    tic = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            choices = chunk.get("choices") or []
            if ttft is None and choices and choices[0].get("delta", {}).get("content"):
                ttft = time.perf_counter() - tic
    e2e = time.perf_counter() - tic
    return {"ttft_s": ttft if ttft is not None else e2e, "e2e_s": e2e, "completion_tokens": tokens}


async def level(url: str, streams: int, rounds: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=streams)) as client:
        await one_request(client, url, 99, 4)  # warm-up: first-call allocations stay out

        async def client_loop(c: int) -> list[dict]:
            return [await one_request(client, url, c * rounds + r, max_tokens) for r in range(rounds)]

        start = time.perf_counter()
        records = [r for rs in await asyncio.gather(*(client_loop(c) for c in range(streams))) for r in rs]
        wall = time.perf_counter() - start
    tokens = sum(r["completion_tokens"] for r in records)
    ttft = [r["ttft_s"] for r in records]
    return {"streams": streams, "requests": len(records), "wall_s": wall, "completion_tokens": tokens,
            "aggregate_decode_tokens_per_s": tokens / wall, "ttft_p50_s": percentile(ttft, 0.5),
            "ttft_p95_s": percentile(ttft, 0.95), "e2e_p50_s": statistics.median(r["e2e_s"] for r in records)}


def measure(runtime: str, folder: Path, levels: list[int], rounds: int, max_tokens: int,
            mlx_lm_dtype: str = "checkpoint") -> list[dict]:
    proc, url = start(runtime, folder, max(levels), mlx_lm_dtype)
    try:
        out = []
        for n in levels:
            console.print(f"  {runtime}: {n} stream(s)")
            out.append(asyncio.run(level(url, n, rounds, max_tokens)))
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- the report -------------------------------------------------------------------------------------

def targets(rows: list[dict]) -> dict:
    """The issue's targets, on our own numbers: 8 streams vs 1."""
    by = {r["streams"]: r for r in rows}
    if 1 not in by or 8 not in by:
        return {}
    return {"decode_8_vs_1": by[8]["aggregate_decode_tokens_per_s"] / by[1]["aggregate_decode_tokens_per_s"],
            "ttft_p95_8_vs_ttft_1": by[8]["ttft_p95_s"] / by[1]["ttft_p50_s"]}


def table(report: dict) -> str:
    lines = ["| model | runtime | streams | decode tok/s (all streams) | TTFT p50 s | TTFT p95 s |",
             "|---|---|---:|---:|---:|---:|"]
    for model, runtimes in report["results"].items():
        for runtime, rows in runtimes.items():
            for r in rows:
                lines.append(f"| {model} | {runtime} | {r['streams']} | {r['aggregate_decode_tokens_per_s']:.1f} "
                             f"| {r['ttft_p50_s']:.3f} | {r['ttft_p95_s']:.3f} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["results"])
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 6), squeeze=False)
    for j, model in enumerate(models):
        for runtime, rows in report["results"][model].items():
            x = [r["streams"] for r in rows]
            axes[0][j].plot(x, [r["aggregate_decode_tokens_per_s"] for r in rows], "o-", label=runtime)
            axes[1][j].plot(x, [r["ttft_p95_s"] for r in rows], "o-", label=runtime)
        axes[0][j].set_title(f"{model}: decode tokens/s, all streams")
        axes[1][j].set_title(f"{model}: TTFT p95 (s)")
        for ax in axes[:, j]:
            ax.set_xscale("log", base=2)
            ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
            ax.set_xlabel("concurrent streams")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small,smollm2")
    ap.add_argument("--runtimes", default="mlx-mistral,mlx-lm")
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=2, help="requests per stream at each level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--mlx-lm-dtype", default="checkpoint", choices=["checkpoint", "float32", "bfloat16", "float16"],
                    help="mlx-lm's compute dtype (checkpoint: as it loads the folder, bfloat16 here)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    suffix = "" if args.mlx_lm_dtype == "checkpoint" else f"-mlx-lm-{args.mlx_lm_dtype}"
    out = args.out or Path(__file__).parent / "results" / device_slug() / f"server_load{suffix}.json"
    report = {"benchmark": "server_load", "device": device_slug(), "cpu": cpu_name(), "levels": levels,
              "rounds": args.rounds, "max_tokens": args.max_tokens, "temperature": 0,
              "mlx_lm_dtype": args.mlx_lm_dtype, "results": {}, "targets": {}}
    for model in args.models.split(","):
        folder = MODELS[model]()
        console.print(f"{model}: {folder}")
        report["results"][model] = {rt: measure(rt, folder, levels, args.rounds, args.max_tokens, args.mlx_lm_dtype)
                                    for rt in args.runtimes.split(",")}
        report["targets"][model] = targets(report["results"][model].get("mlx-mistral", []))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))  # after each model: a later failure keeps it
    plot(report, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(table(report) + "\n")
    print(table(report))
    print(json.dumps(report["targets"], indent=2))
    console.print(f"wrote {out}, {out.with_suffix('.png')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
