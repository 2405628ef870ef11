"""One batched decode step of B sequences (`Backend.decode`) on the native CPU decoder and on
the MLX-ops path: time per step and tokens/s over the batch.

    python benchmarks/batched_decode.py [--model smollm2|small] [--batches 1,2,4,8] [--rounds 15]

Each sequence holds its own context (64 + 3b tokens, so the rows differ in length). The two
backends step in turn, so a busy spell on a shared machine hits both; the best and the median
step are reported. Writes JSON and a PNG to benchmarks/results/<backend>/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # fixtures: SmolLM2 weights

import mlx_mistral  # noqa: E402,F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import fixtures  # noqa: E402
from mlx_mistral.bench import chip_name  # noqa: E402
from mlx_mistral.engine.backend import backend_for  # noqa: E402
from mlx_mistral.kernels import dispatch  # noqa: E402
from mlx_mistral.load import load_model  # noqa: E402
from mlx_mistral.synth import synth  # noqa: E402

CACHE_DIR = Path.home() / ".cache" / "mlx-mistral-bench"
CONTEXT = 64  # tokens each sequence holds before the timed steps


def model_of(name: str):
    if name == "smollm2":
        return fixtures.quantized_model(fixtures.smollm2_hf(), 64, 4)
    folder = CACHE_DIR / f"{name}-q4"
    if not (folder / "config.json").exists():
        synth(folder, name, bits=4, group_size=64, seed=0, force=True)
    return load_model(folder)


def prefilled(runner, B: int) -> list[list]:
    rng = np.random.default_rng(B)
    caches = []
    for b in range(B):
        cache = runner.make_cache()
        mx.eval(runner(mx.array([rng.integers(3, runner.model.args.vocab_size, CONTEXT + 3 * b).tolist()]), cache))
        caches.append(cache)
    return caches


def step_s(runner, tokens: list[int], caches: list[list]) -> float:
    tic = time.perf_counter()
    mx.eval(runner.decode(tokens, caches))
    return time.perf_counter() - tic


def measure(model, batches: list[int], rounds: int) -> list[dict]:
    runners = [backend_for(model), backend_for(model, native=False)]
    rows = []
    for B in batches:
        tokens = list(range(100, 100 + B))
        caches = [prefilled(r, B) for r in runners]
        times: list[list[float]] = [[], []]
        for r, c in zip(runners, caches):
            step_s(r, tokens, c)  # warm-up
        for _ in range(rounds):  # interleaved: load spikes hit both backends
            for i, (r, c) in enumerate(zip(runners, caches)):
                times[i].append(step_s(r, tokens, c))
        for r, t in zip(runners, times):
            best, median = min(t), statistics.median(t)
            rows.append(dict(backend=r.name, B=B, best_ms=best * 1e3, median_ms=median * 1e3,
                             best_tokens_per_s=B / best, median_tokens_per_s=B / median))
            print(f"{r.name:10s} B={B}: {best * 1e3:7.1f} ms best, {median * 1e3:7.1f} ms median, "
                  f"{B / best:6.1f} tokens/s best", flush=True)
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in sorted({r["backend"] for r in results["rows"]}):
        rows = [r for r in results["rows"] if r["backend"] == name]
        ax.plot([r["B"] for r in rows], [r["best_tokens_per_s"] for r in rows], marker="o", label=name)
    ax.set_xlabel("sequences per step (B)")
    ax.set_ylabel("tokens/s over the batch (best step)")
    ax.set_title(f"{results['model']} 4-bit, {results['device']}, load {results['load_average'][0]:.1f}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (real weights) or a synth preset name")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error(f"--batches takes comma-separated integers, not {args.batches!r}")
    model = model_of(args.model)
    load = os.getloadavg()
    rows = measure(model, batches, args.rounds)
    results = dict(model=args.model, device=chip_name(), cpus=os.cpu_count(), mlx=mx.__version__,
                   load_average=[load[0], os.getloadavg()[0]], context=CONTEXT, rounds=args.rounds, rows=rows)
    out = args.out or Path(__file__).parent / "results" / ("cpu" if dispatch.backend() == "cpu" else "gpu")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"batched_decode_{args.model}.json").write_text(json.dumps(results, indent=2))
    plot(results, out / f"batched_decode_{args.model}.png")
    print(f"wrote {out / f'batched_decode_{args.model}.json'} and the PNG beside it")


if __name__ == "__main__":
    main()
