"""Speculative decoding on SmolLM2-135M-Instruct real weights: none vs lookup vs draft.

    python benchmarks/speculate.py [--tokens 64] [--precisions fp32,q4] [--num-draft 4]
                                   [--modes "mlx-lm none,none,lookup,draft"] [--repeats 1]

Three prompts (edit this code, summarise this document, free chat), greedy decoding, each mode
checked to give the plain output token for token. Draft model: SmolLM2 cut to its first layers
(same vocabulary, a fraction of the cost), the only smaller model with this vocabulary at hand.
The baseline is mlx-lm's generate_step on the same model object, run in the same process.
Decode tokens/s counts the tokens after the first forward pass (prefill and the first pass, which
may emit several tokens at once, are left out) over the time they took, so every mode pays the
same prompt cost. With --repeats N the modes take turns N times and the median counts (the CPU
here is shared, so single runs are noisy). Writes JSON and a PNG to benchmarks/results/<backend>/.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import platform
import sys
import time
from pathlib import Path

import mlx_mistral  # noqa: F401  (loads OpenBLAS before MLX)
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from rich.console import Console
from rich.table import Table

from mlx_mistral.generate import encode_prompt, generate_step
from mlx_mistral.load import load, runtime_summary
from mlx_mistral.engine.speculate import SpeculationStats, draft_generate_step, lookup_generate_step

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import fixtures  # noqa: E402

CODE = '''import csv


def load_scores(path):
    rows = []
    with open(path) as f:
        for row in csv.reader(f):
            rows.append((row[0], int(row[1])))
    return rows


def best(rows):
    top = None
    for name, score in rows:
        if top is None or score > top[1]:
            top = (name, score)
    return top


def average(rows):
    total = 0
    for name, score in rows:
        total += score
    return total / len(rows)
'''

DOCUMENT = (
    "The lighthouse at Cape Verity was built in 1871 after three ships ran aground on the reef in a "
    "single winter. Its first keeper, Thomas Hale, kept a log of every storm, every passing ship and "
    "every repair. The tower is 32 metres tall and its lamp could be seen 20 nautical miles away. In "
    "1923 the oil lamp was replaced by an electric one, and in 1968 the light was automated and the "
    "last keeper left. The keeper's cottage became a museum in 1985. Today the museum shows Hale's "
    "logs, the original lens and photographs of the wrecks. The reef is now a protected marine area, "
    "and the lighthouse still guides ships along the coast every night."
)

PROMPTS = {
    "edit code": "Rename the variable `rows` to `records` in this code and return the whole file:\n\n" + CODE,
    "summarise": "Summarise this document in a few sentences:\n\n" + DOCUMENT,
    "free chat": "What are three good habits for someone learning to play the guitar?",
}
DRAFT_LAYERS = 8  # of SmolLM2's 30: about a quarter of the cost per token


def quantized(model, bits=4, group_size=64):
    q = copy.deepcopy(model)
    nn.quantize(q, group_size=group_size, bits=bits)
    mx.eval(q.parameters())
    return q


def truncated(model, layers):
    d = copy.deepcopy(model)
    d.model.layers = d.model.layers[:layers]
    return d


def run(step, ids, tokens, stats):
    """(token ids, wall seconds, decode tokens/s) of one greedy generation."""
    tic = time.perf_counter()
    out, first_pass_done, later = [], None, 0
    for t, _ in step(mx.array(ids, dtype=mx.int32), tokens):
        out.append(t)
        # plain decoding runs one pass per token; speculation counts its passes in stats
        passes = stats.forward_passes if stats.forward_passes else len(out)
        if passes == 1:
            first_pass_done = time.perf_counter()
        else:
            later += 1
    wall = time.perf_counter() - tic
    return out, wall, later / (time.perf_counter() - first_pass_done)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--precisions", default="fp32,q4")
    ap.add_argument("--num-draft", type=int, default=4)
    ap.add_argument("--draft-num-draft", type=int, default=2)
    ap.add_argument("--modes", default="mlx-lm none,none,lookup,draft")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    console = Console()
    base, tok = load(fixtures.smollm2_hf())
    backend = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
    out_dir = Path(args.out or Path(__file__).parent / "results" / backend)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for precision in args.precisions.split(","):
        model = base if precision == "fp32" else quantized(base, bits=int(precision.lstrip("q")))
        draft = truncated(model, DRAFT_LAYERS)
        modes = {
            "mlx-lm none": lambda ids, n: mlx_lm_generate_step(ids, model, max_tokens=n),
            "none": lambda ids, n: generate_step(ids, model, max_tokens=n),
            "lookup": lambda ids, n: lookup_generate_step(ids, model, max_tokens=n, num_draft=args.num_draft,
                                                          stats=stats),
            "draft": lambda ids, n: draft_generate_step(ids, model, draft, max_tokens=n,
                                                        num_draft=args.draft_num_draft, stats=stats),
        }
        for name, text in PROMPTS.items():
            ids = encode_prompt(tok, text)
            run(modes["none"], ids, 4, SpeculationStats())  # warm up this prompt length
            want = None
            timings: dict[str, list[float]] = {}
            counts: dict[str, SpeculationStats] = {}
            for _ in range(args.repeats):
                for mode in args.modes.split(","):
                    stats = SpeculationStats()
                    got, _, tps = run(modes[mode], ids, args.tokens, stats)
                    timings.setdefault(mode, []).append(tps)
                    counts[mode] = stats  # the same every repeat: greedy output is fixed
                    want = got if want is None else want
                    assert got == want, f"{mode} changed the greedy output"
            for mode in args.modes.split(","):
                stats = counts[mode]
                tps = statistics.median(timings[mode])
                row = dict(precision=precision, prompt=name, mode=mode, prompt_tokens=len(ids),
                           tokens=len(want), decode_tps=tps, decode_tps_runs=timings[mode], identical=True,
                           acceptance=stats.acceptance if stats.drafted else None,
                           tokens_per_pass=stats.tokens_per_pass if stats.forward_passes else 1.0,
                           load_average=os.getloadavg()[0])
                results.append(row)
                console.print(f"{precision:5} {name:10} {mode:12} {row['decode_tps']:6.2f} tok/s "
                              f"acc={row['acceptance'] if row['acceptance'] is None else round(row['acceptance'], 2)} "
                              f"tok/pass={row['tokens_per_pass']:.2f} same={row['identical']} "
                              f"load={row['load_average']:.1f}")
    for row in results:
        none = next(r for r in results if r["precision"] == row["precision"] and r["prompt"] == row["prompt"]
                    and r["mode"] == "none")
        row["speedup_vs_none"] = row["decode_tps"] / none["decode_tps"]
        # what one verification pass costs in one-token passes: the break-even tokens per pass
        row["pass_cost_vs_none"] = row["tokens_per_pass"] * none["decode_tps"] / row["decode_tps"]

    table = Table(title=f"speculative decoding, SmolLM2-135M, {args.tokens} greedy tokens")
    for col in ("precision", "prompt", "mode", "tok/s", "vs none", "acceptance", "tok/pass", "pass cost", "same"):
        table.add_column(col)
    for r in results:
        table.add_row(r["precision"], r["prompt"], r["mode"], f"{r['decode_tps']:.2f}", f"{r['speedup_vs_none']:.2f}x",
                      "-" if r["acceptance"] is None else f"{100 * r['acceptance']:.0f}%",
                      f"{r['tokens_per_pass']:.2f}", f"{r['pass_cost_vs_none']:.2f}", str(r["identical"]))
    console.print(table)
    meta = dict(model="SmolLM2-135M-Instruct", tokens=args.tokens, num_draft=args.num_draft, repeats=args.repeats,
                draft=f"SmolLM2 first {DRAFT_LAYERS} of 30 layers, num_draft {args.draft_num_draft}",
                runtime=runtime_summary(), machine=platform.platform(), cpus=os.cpu_count())
    (out_dir / "speculate.json").write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    plot(results, out_dir / "speculate.png", meta)
    console.print(f"wrote {out_dir / 'speculate.json'} and {out_dir / 'speculate.png'}")


def plot(results, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precisions = sorted({r["precision"] for r in results})
    modes = list(dict.fromkeys(r["mode"] for r in results))
    fig, axes = plt.subplots(1, len(precisions), figsize=(6 * len(precisions), 4.5), squeeze=False)
    for ax, precision in zip(axes[0], precisions):
        rows = [r for r in results if r["precision"] == precision]
        prompts = list(dict.fromkeys(r["prompt"] for r in rows))
        width = 0.8 / len(modes)
        for j, mode in enumerate(modes):
            xs, ys, labels = [], [], []
            for i, p in enumerate(prompts):
                r = next(r for r in rows if r["prompt"] == p and r["mode"] == mode)
                xs.append(i + (j - (len(modes) - 1) / 2) * width)
                ys.append(r["decode_tps"])
                labels.append("" if r["acceptance"] is None else f"{100 * r['acceptance']:.0f}%")
            bars = ax.bar(xs, ys, width, label=mode)
            ax.bar_label(bars, labels, fontsize=7)
        ax.set_xticks(range(len(prompts)), prompts)
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"SmolLM2-135M {precision} (labels: draft acceptance)")
        ax.legend(fontsize=8)
    fig.suptitle(meta["runtime"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
