"""Decode speed and peak memory against context length, fp and 8-bit KV, ours and mlx-lm.

    python benchmarks/context.py [--preset small] [--max-context 32768] [--budget-s 600]

One growing context is prefilled once (by our prefill); at each length its K/V are parked in
NumPy (outside MLX's allocator, so they do not count in MLX's peak memory) and every
configuration decodes from its own copy: ours (`generate_step`) and mlx-lm's (`generate_step`
on `mlx_lm.utils.load_model` of the same folder), with a full-precision KV cache and with the
same cache quantized to 8 bits, each the best of REPEATS interleaved runs. Both models compute in the same dtype and both stay loaded, so
peak memory includes both sets of weights; the plot shows the KV cache plus what decoding
allocates on top. Lengths stop doubling
when the next prefill would overrun --budget-s. Writes JSON and a PNG to
benchmarks/results/<backend>/.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import mlx_mistral  # noqa: F401  (loads OpenBLAS before MLX)
import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import load_model as mlx_lm_load_model
from rich.console import Console
from rich.table import Table

from mlx_mistral.generate import generate_step, prefill
from mlx_mistral.cache import make_cache
from mlx_mistral.kernels.dispatch import backend, compute_dtype
from mlx_mistral.load import load_model
from mlx_mistral.synth import synth

LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 32768]
DECODE = 16  # tokens timed per configuration, after one untimed token
REPEATS = 2  # the best of these runs is kept: a shared CPU's noise only ever slows a run down
CACHE_DIR = Path.home() / ".cache" / "mlx-mistral-bench"


def park(cache: list) -> list:
    """K/V of a filled fp cache as NumPy arrays (outside MLX's memory accounting)."""
    return [(np.array(c.keys[..., : c.offset, :]), np.array(c.values[..., : c.offset, :])) for c in cache]


def unpark(parked: list, kv_bits) -> list:
    out = []
    for k, v in parked:
        c = KVCache()
        c.update_and_fetch(mx.array(k), mx.array(v))
        out.append(c.to_quantized(group_size=64, bits=kv_bits) if kv_bits else c)
    mx.eval([c.state for c in out])
    return out


def time_decode(step_fn, model, cache, token: int) -> tuple[float, float, float]:
    """(tokens/s over DECODE tokens, peak MLX memory in GB, peak above the memory in use
    before decoding: the decode's own working memory)."""
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    steps = step_fn(mx.array([token]), model, prompt_cache=cache, max_tokens=DECODE + 1)
    next(steps)
    tic = time.perf_counter()
    n = sum(1 for _ in steps)
    elapsed = time.perf_counter() - tic
    peak = mx.get_peak_memory()
    return n / elapsed, peak / 1e9, (peak - before) / 1e9


def ours_step(prompt, model, *, prompt_cache, max_tokens):
    return generate_step(prompt, model, prompt_cache=prompt_cache, max_tokens=max_tokens)


def mlx_lm_step(prompt, model, *, prompt_cache, max_tokens):
    return (tok for tok, _ in mlx_lm_generate_step(prompt, model, prompt_cache=prompt_cache, max_tokens=max_tokens))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for impl, style in (("ours", "-"), ("mlx-lm", "--")):
        for kv, color in (("fp", "C0"), ("kv8", "C1")):
            rows = [r for r in results["rows"] if r["impl"] == impl and r["kv"] == kv]
            xs = [r["context"] for r in rows]
            a.plot(xs, [r["tokens_per_s"] for r in rows], style, color=color, marker="o", label=f"{impl} {kv}")
            b.plot(xs, [r["kv_gb"] + r["decode_extra_gb"] for r in rows], style, color=color, marker="o",
                   label=f"{impl} {kv}")
    for ax, label in ((a, "decode tokens/s"), (b, "KV cache + decode working memory (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{results['preset']} preset, {results['device']}, {results['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--max-context", type=int, default=32768)
    ap.add_argument("--budget-s", type=float, default=600.0, help="stop before a length that would overrun this")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    folder = CACHE_DIR / args.preset
    if not (folder / "config.json").exists():
        synth(folder, args.preset, seed=0, force=True)
    dtype = compute_dtype() or mx.float16
    ours = load_model(folder, dtype=dtype)
    if ours.args.head_dim % 64:
        ap.error(f"the {args.preset} preset's head_dim {ours.args.head_dim} cannot hold 8-bit KV groups of 64")
    theirs = mlx_lm_load_model(folder)[0]
    theirs.set_dtype(dtype)
    mx.eval(theirs.parameters())
    out = args.out or Path(__file__).parent / "results" / ("cpu" if backend() == "cpu" else "gpu")

    console = Console()
    rng = np.random.default_rng(0)
    vocab = ours.args.vocab_size
    tokens = mx.array(rng.integers(1000, vocab, size=args.max_context + 1), dtype=mx.int32)
    cache = make_cache(ours)
    rows, start, done = [], time.perf_counter(), 0
    last_prefill_rate = None  # seconds per token^2 (attention dominates at long context)
    for length in [n for n in LENGTHS if n <= args.max_context]:
        elapsed = time.perf_counter() - start
        if last_prefill_rate is not None:
            estimate = last_prefill_rate * (length**2 - done**2) + 4 * (elapsed / max(len(rows), 1))
            if elapsed + estimate > args.budget_s:
                console.print(f"[yellow]stopping before {length}: about {estimate:.0f} s more would overrun "
                              f"the {args.budget_s:.0f} s budget[/]")
                break
        tic = time.perf_counter()
        prefill(ours, tokens[done:length], cache)
        last_prefill_rate = (time.perf_counter() - tic) / (length**2 - done**2)
        done = length
        parked = park(cache)
        del cache
        configs = [(impl, model, step_fn, kv, bits)
                   for impl, model, step_fn in (("ours", ours, ours_step), ("mlx-lm", theirs, mlx_lm_step))
                   for kv, bits in (("fp", None), ("kv8", 8))]
        best = {}
        for _ in range(REPEATS):  # interleaved, so a busy spell does not hit one configuration only
            for impl, model, step_fn, kv, bits in configs:
                c = unpark(parked, bits)
                tps, peak, extra = time_decode(step_fn, model, c, int(tokens[length].item()))
                kv_gb = sum(x.nbytes for x in c) / 1e9
                del c
                if (impl, kv) not in best or tps > best[impl, kv]["tokens_per_s"]:
                    best[impl, kv] = dict(impl=impl, kv=kv, context=length, tokens_per_s=tps, peak_gb=peak,
                                          decode_extra_gb=extra, kv_gb=kv_gb)
        for (impl, kv), row in best.items():
            rows.append(row)
            console.print(f"{length:>6} {impl:>7} {kv:>4}: {row['tokens_per_s']:7.2f} tokens/s, "
                          f"peak {row['peak_gb']:.3f} GB, KV {row['kv_gb']:.3f} GB")
        cache = unpark(parked, None)

    results = dict(preset=args.preset, device=f"{platform.machine()} {mx.default_device()}",
                   dtype=str(dtype), decode_tokens=DECODE, mlx=mx.__version__,
                   command=" ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])), rows=rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "context.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "context.png")

    table = Table(title=f"decode tokens/s and peak memory, {args.preset} preset")
    for col in ("context", "ours fp", "mlx-lm fp", "ours kv8", "mlx-lm kv8", "KV fp/kv8 (GB)", "peak fp/kv8 (ours, GB)"):
        table.add_column(col, justify="right")
    for length in sorted({r["context"] for r in rows}):
        get = {(r["impl"], r["kv"]): r for r in rows if r["context"] == length}
        table.add_row(str(length), *(f"{get[k]['tokens_per_s']:.2f}" for k in
                                     (("ours", "fp"), ("mlx-lm", "fp"), ("ours", "kv8"), ("mlx-lm", "kv8"))),
                      f"{get['ours', 'fp']['kv_gb']:.3f} / {get['ours', 'kv8']['kv_gb']:.3f}",
                      f"{get['ours', 'fp']['peak_gb']:.3f} / {get['ours', 'kv8']['peak_gb']:.3f}")
    console.print(table)
    console.print(f"wrote {out / 'context.json'} and {out / 'context.png'}")


if __name__ == "__main__":
    main()
