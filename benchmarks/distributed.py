"""Tensor parallel on one machine: decode and prefill tokens/s and per-rank memory at 1 and 2
ranks (each rank pinned to its own core, one BLAS thread), plus a paper estimate for 2 and 4
Macs from memory bandwidth and the link's latency per all_sum. Also measured, in the same run
(distributed_paths.py): the sharded model on both CPU paths (MLX ops; the native decoder with
its all_sums called from C, what a sharded model takes now) next to the estimate that chose
the native one, and a 2-stage pipeline split against tensor parallel.

    python benchmarks/distributed.py [--preset small] [--prompt 128] [--tokens 32]

Writes benchmarks/results/<backend>/distributed.{json,png,md}. The 1- and 2-rank "runs" are
on MLX ops, so the two differ only by the split; "tp_native" is 2 ranks on the native decoder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CACHE_DIR = Path.home() / ".cache" / "mlx-mistral-bench"
OUT_DIR = Path(__file__).resolve().parent / "results"
ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MLX_CPU_THREADS")}

# Paper estimate: Mistral Small 3 (24B) 4-bit, decode of one row. Assumptions, not measurements:
WEIGHT_GB = 13.3  # the 4-bit folder
LAYERS, HIDDEN, VOCAB = 40, 5120, 131072
MAC_GBPS = 273.0  # M4 Pro memory bandwidth (Apple's figure)
EFFICIENCY = 0.75  # of peak bandwidth a decode step reaches on a Mac (typical for 4-bit GEMV)
LINKS = {  # one hop's latency (s) and bandwidth (bytes/s)
    "Thunderbolt 5 (ring, TCP)": (40e-6, 6e9),
    "Thunderbolt 5 (JACCL, RDMA)": (8e-6, 8e9),
    "10 GbE (ring, TCP)": (80e-6, 1.1e9),
}


def paper_estimate() -> list[dict]:
    """tokens/s = 1 / (weights / (N * bandwidth) + collectives). A ring all_sum over N ranks
    takes 2(N - 1) hops; each layer has two (after o and after down), plus the embedding's sum
    and the head's gather of VOCAB/N logits per rank. The pipeline rows: every Mac reads its
    layers in turn (one Mac's time) plus N hops per token (distributed_paths.paper_pipeline)."""
    from distributed_paths import paper_pipeline

    rows = []
    single = WEIGHT_GB * 1e9 / (MAC_GBPS * 1e9 * EFFICIENCY)
    rows.append({"macs": 1, "split": "-", "link": "-", "ms_per_token": single * 1e3, "tokens_per_s": 1 / single})
    for n in (2, 4):
        for link, (latency, bandwidth) in LINKS.items():
            hops = 2 * (n - 1)
            sums = (2 * LAYERS + 1) * hops * (latency + HIDDEN * 2 / n / bandwidth)  # bf16 rows, chunked
            gather = (n - 1) * (latency + VOCAB / n * 4 / bandwidth)
            for split, t in (("tensor", single / n + sums + gather),
                             ("pipeline", paper_pipeline(single, n, latency, HIDDEN, bandwidth))):
                rows.append({"macs": n, "split": split, "link": link, "ms_per_token": t * 1e3,
                             "tokens_per_s": 1 / t})
    return rows


def decide(runs: dict, shard: dict, pp: dict, native: dict, layers: int) -> dict:
    """The numbers that choose the sharded model's CPU path, and keep or drop the pipeline."""
    from distributed_paths import break_even_latency

    tp = runs["2"][0]
    latency = max(r["all_sum_latency_s"] for r in runs["2"])
    sums = 2 * layers + 2  # o and down per layer, the embedding's sum, the head's gather
    native_segments_ms = shard["shard_native"]["decode_ms"] + sums * latency * 1e3
    tp_ms = 1e3 / tp["decode_tps"]
    single = WEIGHT_GB * 1e9 / (MAC_GBPS * 1e9 * EFFICIENCY)
    return {
        "all_sums_per_token": sums, "all_sum_latency_ms": latency * 1e3,
        "tp_mlx_ops_decode_ms": tp_ms, "native_segments_decode_ms_estimate": native_segments_ms,
        "tp_native_decode_ms": native["decode_ms"], "tp_native_prefill_tps": native["prefill_tps"],
        "shard_mlx_ops_alone_decode_ms": shard["shard_mlx"]["decode_ms"],
        "sharded_path": "mlx-ops" if tp_ms <= native["decode_ms"] else "native",
        "pp_decode_ms": pp["decode_ms"], "pp_prefill_tps": pp["prefill_tps"],
        "tp_prefill_tps": tp["prefill_tps"],
        "pipeline": "keep" if pp["decode_ms"] < tp_ms and pp["prefill_tps"] > tp["prefill_tps"] else "drop",
        "break_even_hop_latency_us": {str(n): 1e6 * break_even_latency(single, n, LAYERS) for n in (2, 4)},
    }


def worker(mode: str, model: str, prompt_len: int, tokens: int, out: str) -> None:
    """One rank (or the single process) of `mode`: "tp" (tensor parallel on MLX ops, or one
    process), "tpn" (tensor parallel on the native decoder), "shard" (one rank's shard alone)
    or "pp" (a pipeline stage)."""
    import mlx_mistral  # noqa: F401  (loads OpenBLAS before MLX)

    import distributed_paths  # beside this script
    from mlx_mistral.distributed.group import world

    group = world()
    rank = group.rank() if group else 0
    os.sched_setaffinity(0, {rank % os.cpu_count()})  # each rank on its own core
    if mode == "shard":
        result = distributed_paths.shard_alone(Path(model), prompt_len, tokens)
    elif mode == "pp":
        result = distributed_paths.pipeline(Path(model), prompt_len, tokens, group)
    elif mode == "tpn":
        from mlx_mistral.distributed.load import load_sharded_model
        from mlx_mistral.engine.backend import Backend

        backend = Backend(load_sharded_model(Path(model), group), native=True)
        result = distributed_paths.timed(backend, prompt_len, tokens)
    else:
        result = tensor_parallel(model, prompt_len, tokens, group)
    Path(f"{out}.{rank}").write_text(json.dumps(dict(result, rank=rank)))


def tensor_parallel(model: str, prompt_len: int, tokens: int, group) -> dict:
    """Time prefill and decode of the sharded model (or the whole one), record memory."""
    import mlx.core as mx

    from mlx_mistral.distributed.load import load_sharded_model
    from mlx_mistral.engine.backend import backend_for
    from mlx_mistral.distributed.shard import resident_bytes
    from mlx_mistral.load import load_model

    model = load_sharded_model(Path(model), group) if group else load_model(model)  # called: MLX ops
    prompt = mx.random.randint(100, model.args.vocab_size, (1, prompt_len), key=mx.random.key(0))
    for _ in range(2):  # the first pass warms MLX's buffers; the second is timed
        cache = backend_for(model, native=False).make_cache()
        tic = time.perf_counter()
        y = mx.argmax(model(prompt, cache=cache)[:, -1], axis=-1)
        mx.eval(y)
        prefill = time.perf_counter() - tic
    tic = time.perf_counter()
    for _ in range(tokens):
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(y)
    decode = time.perf_counter() - tic
    latency = None
    if group:  # one all_sum of a decode row's hidden state, the collective a layer waits on
        x = mx.ones((1, model.args.hidden_size))
        mx.eval(mx.distributed.all_sum(x, group=group))
        tic = time.perf_counter()
        for _ in range(100):
            mx.eval(mx.distributed.all_sum(x, group=group))
        latency = (time.perf_counter() - tic) / 100
    return {"prefill_tps": prompt_len / prefill, "decode_tps": tokens / decode,
            "resident_weight_bytes": resident_bytes(model), "peak_memory_bytes": mx.get_peak_memory(),
            "all_sum_latency_s": latency}


def run(ranks: int, folder: Path, prompt_len: int, tokens: int, scratch: Path, mode: str = "tp") -> list[dict]:
    out = scratch / f"{mode}{ranks}"
    args = [str(Path(__file__).resolve()), "--worker", mode, "--model", str(folder), "--prompt", str(prompt_len),
            "--tokens", str(tokens), "--out", str(out)]
    env = dict(os.environ, **ONE_THREAD)
    if ranks == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [shutil.which("mlx.launch"), "-n", str(ranks), "--backend", "ring", "--python", sys.executable, *args]
    subprocess.run(cmd, check=True, env=env)
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(ranks)]


def report(results: dict, estimate: list[dict], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "distributed.json").write_text(json.dumps({"measured": results, "paper_estimate": estimate}, indent=2))
    lines = ["| ranks | prefill tok/s | decode tok/s | weights per rank (MB) | peak per rank (MB) |",
             "|---|---|---|---|---|"]
    for n, rows in results["runs"].items():
        r0 = rows[0]
        lines.append(f"| {n} | {r0['prefill_tps']:.1f} | {r0['decode_tps']:.2f} | "
                     f"{max(r['resident_weight_bytes'] for r in rows) / 1e6:.1f} | "
                     f"{max(r['peak_memory_bytes'] for r in rows) / 1e6:.1f} |")
    latency = max(r["all_sum_latency_s"] or 0 for rows in results["runs"].values() for r in rows)
    lines += ["", f"One all_sum of a decode row between the ranks: {latency * 1e3:.2f} ms on {results['cpu']} "
              f"({results['preset']} preset, {results['prompt_tokens']}-token prompt, {results['decode_tokens']} "
              "decoded tokens)."]
    lines += decision_lines(results)
    lines += ["", "Paper estimate, Mistral Small 3 4-bit, decode of one stream (M4 Pro 273 GB/s at 75%):", "",
              "| Macs | split | link | ms/token | tokens/s |", "|---|---|---|---|---|"]
    lines += [f"| {e['macs']} | {e['split']} | {e['link']} | {e['ms_per_token']:.1f} | {e['tokens_per_s']:.1f} |"
              for e in estimate]
    even = results["decision"]["break_even_hop_latency_us"]
    lines += ["", f"Tensor parallel beats the pipeline per token while one hop takes less than {even['2']:.0f} µs "
              f"(2 Macs) or {even['4']:.0f} µs (4 Macs)."]
    (dest / "distributed.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(results["runs"])
    ax[0].bar([f"{n}, MLX ops" for n in names], [results["runs"][n][0]["decode_tps"] for n in names])
    ax[0].bar(["2, native"], [1e3 / results["decision"]["tp_native_decode_ms"]])
    ax[0].set(title="decode (small preset, this CPU)", xlabel="ranks", ylabel="tokens/s")
    ax[1].bar(names, [max(r["resident_weight_bytes"] for r in results["runs"][n]) / 1e6 for n in names])
    ax[1].set(title="weights per rank", xlabel="ranks", ylabel="MB")
    fig.tight_layout()
    fig.savefig(dest / "distributed.png", dpi=120)
    print("\n".join(lines))


def decision_lines(results: dict) -> list[str]:
    d, shard, pp = results["decision"], results["shard_alone"], results["pipeline"]
    return [
        "", "Which path a sharded model takes on this CPU (decode, ms per token, 2 ranks):", "",
        "| path | ms/token |", "|---|---|",
        f"| tensor parallel on the native decoder (all_sums from C), measured | {d['tp_native_decode_ms']:.1f} |",
        f"| tensor parallel on MLX ops, measured | {d['tp_mlx_ops_decode_ms']:.1f} |",
        f"| one rank's shard alone on MLX ops (no collectives) | {shard['shard_mlx']['decode_ms']:.1f} |",
        f"| one rank's shard alone on the native decoder | {shard['shard_native']['decode_ms']:.1f} |",
        f"| native segments, estimate: the line above + {d['all_sums_per_token']} all_sums x "
        f"{d['all_sum_latency_ms']:.2f} ms | {d['native_segments_decode_ms_estimate']:.1f} |",
        f"| whole model, one process, native decoder | {shard['whole_native']['decode_ms']:.1f} |",
        "", f"Faster on this CPU: **{d['sharded_path']}** (a sharded model takes the native decoder where it "
        "can run).", "",
        "Pipeline (2 stages, layers split in half) against tensor parallel, 2 ranks:", "",
        "| split | prefill tok/s | decode ms/token |", "|---|---|---|",
        f"| tensor, native decoder | {d['tp_native_prefill_tps']:.1f} | {d['tp_native_decode_ms']:.1f} |",
        f"| tensor, MLX ops | {d['tp_prefill_tps']:.1f} | {d['tp_mlx_ops_decode_ms']:.1f} |",
        f"| pipeline | {pp['prefill_tps']:.1f} | {pp['decode_ms']:.1f} |",
        "", f"Pipeline: **{d['pipeline']}**.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--worker", choices=["tp", "tpn", "shard", "pp"])
    parser.add_argument("--model")
    parser.add_argument("--out")
    opts = parser.parse_args()
    if opts.worker:
        return worker(opts.worker, opts.model, opts.prompt, opts.tokens, opts.out)
    from mlx_mistral.bench import device_slug
    from mlx_mistral.config import ModelArgs
    from mlx_mistral.load import read_config
    from mlx_mistral.synth import synth

    folder = CACHE_DIR / f"{opts.preset}-q4"
    if not (folder / "config.json").exists():  # made once, reused by later runs
        synth(folder, opts.preset, bits=4)
    scratch = CACHE_DIR / "distributed"
    scratch.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    runs = {str(n): run(n, folder, opts.prompt, opts.tokens, scratch) for n in (1, 2)}
    shard = run(1, folder, opts.prompt, opts.tokens, scratch, "shard")[0]
    pp = run(2, folder, opts.prompt, opts.tokens, scratch, "pp")[0]
    native = run(2, folder, opts.prompt, opts.tokens, scratch, "tpn")
    layers = ModelArgs.from_dict(read_config(folder)).num_hidden_layers
    results = {"preset": opts.preset, "prompt_tokens": opts.prompt, "decode_tokens": opts.tokens,
               "cpu": _cpu_name(), "runs": runs, "shard_alone": shard, "pipeline": pp, "tp_native": native,
               "decision": decide(runs, shard, pp, native[0], layers),
               "wall_s": time.perf_counter() - tic}
    report(results, paper_estimate(), OUT_DIR / device_slug())


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
