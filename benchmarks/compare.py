"""mlx-mistral against mlx-lm on the same model folder, side by side.

Both runtimes are timed by the same harness (`mlx_mistral.bench.run_trial`) driving their own
`generate_step` with the same random prompt, greedy, end of sequence ignored. By default both
models live in one process and their trials alternate (ours, theirs, theirs, ours, ...), so a
machine whose load drifts slows both alike. `--isolate` runs each (runtime, context) in its own
subprocess instead, one model in memory at a time: for models too big to hold twice.

    python benchmarks/compare.py -m MODEL [--contexts 16,64,128] [-g 8] [-n 2] [--isolate]

Writes compare-<model>.json, .md and .png into benchmarks/results/<device>/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import mlx_mistral  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
from mlx.utils import tree_flatten
from rich.console import Console
from rich.table import Table

from mlx_mistral.bench import (BenchConfig, Trial, device_info, device_slug, peak_bandwidth, random_prompt,
                               run_trial, summarize, warm_up, weight_bytes, weight_bytes_per_token,
                               with_bandwidth)
from mlx_mistral.cli.bench_view import human_bytes
from mlx_mistral.kernels import dispatch

OURS, THEIRS = "mlx-mistral", "mlx-lm"
RESULTS = Path(__file__).parent / "results"


# --- runtimes ----------------------------------------------------------------------------------

def load_runtime(name: str, path: Path, mlx_lm_dtype: str):
    """(model, generate_step) of one runtime, each loaded its own way."""
    if name == OURS:
        from mlx_mistral.generate import generate_step
        from mlx_mistral.load import load_model

        return load_model(path), generate_step
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, _ = load_model(path)  # the model only: the folder may carry tekken.json alone
    if mlx_lm_dtype != "checkpoint":
        model.set_dtype(getattr(mx, mlx_lm_dtype))
    return model, generate_step


def compute_dtype(model) -> str:
    return str(dispatch.compute_dtype(model)).removeprefix("mlx.core.")


def describe(model, vocab_size: int) -> dict:
    return {"compute_dtype": compute_dtype(model), "weight_bytes": weight_bytes(model),
            "weight_bytes_per_token": weight_bytes_per_token(model, vocab_size)}


def one_trial(model, step, prompt, args, bytes_per_token, peak_gbps, listener=None) -> Trial:
    trial = run_trial(step, model, prompt, args.gen, prefill_step=args.prefill_step, listener=listener)
    return with_bandwidth(trial, bytes_per_token, peak_gbps)


# --- the two ways to run -------------------------------------------------------------------------

def run_interleaved(args, vocab_size: int, peak_gbps: float, console: Console) -> tuple[dict, dict]:
    """Both models loaded; per context, trials alternate between the runtimes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    runtimes = {name: load_runtime(name, args.model, args.mlx_lm_dtype) for name in (OURS, THEIRS)}
    info = {name: describe(m, vocab_size) for name, (m, _) in runtimes.items()}
    trials: dict = {(name, p): [] for name in runtimes for p in args.contexts}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        if not args.no_warmup:
            for name, (m, step) in runtimes.items():
                progress.console.log(f"warm-up {name}")
                warm_up(step, m, vocab_size, args.prefill_step)
        overall = progress.add_task("runs", total=len(args.contexts) * args.trials * 2)
        current = progress.add_task("", total=1)
        for p in args.contexts:
            prompt = random_prompt(vocab_size, p, args.seed)
            for i in range(args.trials):
                for name in ((OURS, THEIRS) if i % 2 == 0 else (THEIRS, OURS)):
                    m, step = runtimes[name]

                    def listener(phase, done, total, name=name, p=p):
                        progress.update(current, description=f"{name} pp{p} {phase}", completed=done,
                                        total=total)

                    trial = one_trial(m, step, prompt, args, info[name]["weight_bytes_per_token"], peak_gbps,
                                      listener)
                    trials[(name, p)].append(trial)
                    progress.advance(overall)
                    progress.console.log(f"{name} pp{p}+tg{args.gen} trial {i + 1}: prefill "
                                         f"{trial.prefill_tps:.2f} tok/s, decode {trial.decode_tps:.2f} tok/s")
    return info, trials


def run_worker(args) -> None:
    """One runtime, one context, in this process: prints {info, trials} as JSON on stdout."""
    from mlx_mistral.cli.bench_view import live_progress

    name, p = args.worker, args.contexts[0]
    m, step = load_runtime(name, args.model, args.mlx_lm_dtype)
    vocab_size = json.loads((args.model / "config.json").read_text())["vocab_size"]
    info = describe(m, vocab_size)
    if not args.no_warmup:
        warm_up(step, m, vocab_size, args.prefill_step)
    prompt = random_prompt(vocab_size, p, args.seed)
    trials = []
    with live_progress(f"{name} pp{p}", args.trials, Console(stderr=True)) as follow:
        for i in range(1, args.trials + 1):
            listener = lambda phase, done, total, i=i: follow(i, phase, done, total)  # noqa: E731
            trials.append(one_trial(m, step, prompt, args, info["weight_bytes_per_token"], args.peak_gbps,
                                    listener))
    print(json.dumps({"info": info, "trials": [t.__dict__ for t in trials]}))


def run_isolated(args, peak_gbps: float, console: Console) -> tuple[dict, dict]:
    """A subprocess per (runtime, context), one model in memory at a time; the order of the
    runtimes alternates from one context to the next."""
    info: dict = {}
    trials: dict = {}
    for k, p in enumerate(args.contexts):
        for name in ((OURS, THEIRS) if k % 2 == 0 else (THEIRS, OURS)):
            console.log(f"{name} pp{p}+tg{args.gen}, {args.trials} trial(s), own process")
            cmd = [sys.executable, __file__, "--worker", name, "-m", str(args.model), "--contexts", str(p),
                   "-g", str(args.gen), "-n", str(args.trials), "--prefill-step", str(args.prefill_step),
                   "--mlx-lm-dtype", args.mlx_lm_dtype, "--peak-gbps", str(peak_gbps), "--seed", str(args.seed)]
            if args.no_warmup:
                cmd.append("--no-warmup")
            out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if out.returncode != 0:
                sys.exit(f"compare: the {name} run at {p} prompt tokens failed (exit {out.returncode})")
            data = json.loads(out.stdout.strip().splitlines()[-1])
            info[name] = data["info"]
            trials[(name, p)] = [Trial(**t) for t in data["trials"]]
    return info, trials


# --- results -------------------------------------------------------------------------------------

def collect(args, info: dict, trials: dict, device: dict, elapsed: float) -> dict:
    results = []
    for p in args.contexts:
        row: dict = {"prompt_tokens": p, "generation_tokens": args.gen}
        for name in (OURS, THEIRS):
            row[name] = {"trials": [t.__dict__ for t in trials[(name, p)]], "summary": summarize(trials[(name, p)])}
        med = {k: {name: row[name]["summary"][f"{k}_tps"]["median"] for name in (OURS, THEIRS)}
               for k in ("prefill", "decode")}
        row["ratio"] = {k: v[OURS] / v[THEIRS] if v[THEIRS] else None for k, v in med.items()}
        results.append(row)
    import mlx_lm

    return {
        "model": args.model.name, "path": str(args.model),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "config": {"contexts": args.contexts, "generation_tokens": args.gen, "trials": args.trials,
                   "prefill_step": args.prefill_step, "warmup": not args.no_warmup, "seed": args.seed,
                   "mode": "isolated" if args.isolate else "interleaved", "mlx_lm_dtype": args.mlx_lm_dtype},
        "runtimes": {OURS: dict(info[OURS], version=mlx_mistral.__version__),
                     THEIRS: dict(info[THEIRS], version=mlx_lm.__version__)},
        "results": results, "elapsed_s": elapsed,
    }


def _mmm(s: dict) -> str:
    return f"{s['min']:.3g} / {s['median']:.3g} / {s['max']:.3g}"


def print_table(data: dict, console: Console) -> None:
    table = Table(title=f"{data['model']} on {data['device']['name']} ({data['device']['backend']}) "
                        f"{data['date']}", title_justify="left")
    for col in ("context", "runtime", "prefill tok/s min/med/max", "decode tok/s min/med/max", "TTFT s (med)"):
        table.add_column(col, justify="left" if col in ("context", "runtime") else "right")
    for row in data["results"]:
        for name in (OURS, THEIRS):
            s = row[name]["summary"]
            table.add_row(f"pp{row['prompt_tokens']}+tg{row['generation_tokens']}", name, _mmm(s["prefill_tps"]),
                          _mmm(s["decode_tps"]), f"{s['ttft_s']['median']:.2f}")
        r = row["ratio"]
        table.add_row("", "[bold]ours / mlx-lm[/]", f"[bold]{r['prefill']:.2f}x[/]", f"[bold]{r['decode']:.2f}x[/]", "")
        table.add_section()
    console.print(table)


def markdown(data: dict) -> str:
    dev, rt = data["device"], data["runtimes"]
    lines = [
        f"`{data['model']}`, {dev['name']} ({dev['cpus']} CPUs), MLX {dev['mlx']} {dev['backend']} backend, "
        f"{data['date'][:10]}; mlx-mistral {rt[OURS]['version']} computes in {rt[OURS]['compute_dtype']}, "
        f"mlx-lm {rt[THEIRS]['version']} in {rt[THEIRS]['compute_dtype']}; {data['config']['trials']} trial(s), "
        f"{data['config']['mode']}, median (min–max) tokens/s.",
        "",
        "| test | mlx-mistral prefill | mlx-lm prefill | ratio | mlx-mistral decode | mlx-lm decode | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(s):
        return f"{s['median']:.3g} ({s['min']:.3g}–{s['max']:.3g})"

    for row in data["results"]:
        a, b = row[OURS]["summary"], row[THEIRS]["summary"]
        lines.append(f"| pp{row['prompt_tokens']}+tg{row['generation_tokens']} | {cell(a['prefill_tps'])} | "
                     f"{cell(b['prefill_tps'])} | {row['ratio']['prefill']:.2f}x | {cell(a['decode_tps'])} | "
                     f"{cell(b['decode_tps'])} | {row['ratio']['decode']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    contexts = [row["prompt_tokens"] for row in data["results"]]
    for ax, key, label in zip(axes, ("prefill_tps", "decode_tps"), ("prefill", "decode")):
        for name, marker in ((OURS, "o"), (THEIRS, "s")):
            s = [row[name]["summary"][key] for row in data["results"]]
            med = [x["median"] for x in s]
            err = [[m - x["min"] for m, x in zip(med, s)], [x["max"] - m for m, x in zip(med, s)]]
            dtype = data["runtimes"][name]["compute_dtype"]
            ax.errorbar(contexts, med, yerr=err, marker=marker, capsize=3, label=f"{name} ({dtype})")
        for row, c in zip(data["results"], contexts):
            ratio = row["ratio"][label]
            if ratio:
                y = row[OURS]["summary"][key]["median"]
                ax.annotate(f"{ratio:.2f}x", (c, y), textcoords="offset points", xytext=(0, 8), ha="center",
                            fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.minorticks_off()
        ax.margins(x=0.15, y=0.25)  # room for the ratio labels and the legend
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens (context)")
        ax.set_ylabel(f"{label} tokens/s")
        ax.set_title(f"{label}: median, min–max bars, ours/mlx-lm ratio")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    dev = data["device"]
    fig.suptitle(f"{data['model']} · {dev['name']} · {dev['backend']} · MLX {dev['mlx']} · {data['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- command line --------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", type=Path, required=True, help="Model folder (mlx-lm layout).")
    ap.add_argument("--contexts", default="16,64,128",
                    type=lambda s: [int(x) for x in s.split(",")], help="Prompt lengths, comma-separated.")
    ap.add_argument("-g", "--gen", type=int, default=8, help="Generated tokens per run.")
    ap.add_argument("-n", "--trials", type=int, default=2, help="Timed trials per runtime and context.")
    ap.add_argument("--prefill-step", type=int, default=2048)
    ap.add_argument("--isolate", action="store_true", help="One subprocess per runtime and context.")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--mlx-lm-dtype", default="checkpoint", choices=["checkpoint", "float32", "bfloat16", "float16"],
                    help="mlx-lm's compute dtype (default: as it loads the checkpoint).")
    ap.add_argument("--peak-gbps", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="Folder (default: benchmarks/results/<device>).")
    ap.add_argument("--worker", choices=[OURS, THEIRS], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not (args.model / "config.json").exists():
        ap.error(f"{args.model} is not a model folder (no config.json)")
    if args.gen < 2 or args.trials < 1 or min(args.contexts) < 1:
        ap.error("need -g >= 2, -n >= 1 and contexts >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    console = Console(stderr=True)
    tic = time.perf_counter()
    peak = peak_bandwidth(args.peak_gbps)
    vocab_size = json.loads((args.model / "config.json").read_text())["vocab_size"]
    if args.isolate:
        info, trials = run_isolated(args, peak.gbps, console)
    else:
        info, trials = run_interleaved(args, vocab_size, peak.gbps, console)
    data = collect(args, info, trials, device_info(peak), time.perf_counter() - tic)
    out = args.out or RESULTS / device_slug()
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.mlx_lm_dtype == "checkpoint" else f"-mlx-lm-{args.mlx_lm_dtype}"
    stem = out / f"compare-{args.model.name}{suffix}"
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(data))
    plot(data, stem.with_suffix(".png"))
    stdout = Console()
    if not stdout.is_terminal:
        stdout = Console(width=120)  # a log file or pipe: keep each row on one line
    print_table(data, stdout)
    for name in (OURS, THEIRS):
        rt = data["runtimes"][name]
        console.print(f"{name}: {rt['compute_dtype']}, {human_bytes(rt['weight_bytes'])} of weights, "
                      f"{human_bytes(rt['weight_bytes_per_token'])} read per decoded token")
    console.print(f"wrote {stem}.json, .md, .png in {data['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
