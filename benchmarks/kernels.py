"""Our quantized matmuls against what mlx-lm runs, at the 24B model's real layer shapes.

For each projection of Mistral Small 3 (4-bit, group 64) at M = 1 (decode) and M = 8 (draft
verification), and at M = 64 (prefill) for the two smallest, times in one process, alternating, the median of several repeats of:
- ours: the kernel dispatcher on the fused matrix (q/k/v as one 5120->6144 matrix; gate/up as
  one 5120->65536 matrix with the SiLU-multiply epilogue);
- mlx: what mlx-lm does, mx.quantized_matmul per projection (three for q/k/v; two plus the
  elementwise SwiGLU for gate/up).
Prints µs, weight GB/s and the speed ratio; writes benchmarks/results/<backend>/kernels.json
(and a PNG). With --model FOLDER it also times prefill and greedy decode of that 4-bit folder,
fused and dispatched against unfused, in tokens/s.

    python benchmarks/kernels.py [--repeats 7] [--model /tmp/small-q4] [--tokens 64] [--prompt 128]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import mlx_mistral  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from mlx_mistral.engine.backend import backend_for
from mlx_mistral.kernels import dispatch

GROUP_SIZE, BITS = 64, 4
HIDDEN, Q, KV, FFN, VOCAB = 5120, 4096, 1024, 32768, 131072
# name: (K, output parts); parts of one row read the same input
LAYERS = {
    "qkv (fused)": (HIDDEN, (Q, KV, KV)),
    "o_proj": (Q, (HIDDEN,)),
    "gate_up+silu (fused)": (HIDDEN, (FFN, FFN)),
    "down_proj": (FFN, (HIDDEN,)),
    "lm_head": (HIDDEN, (VOCAB,)),
}
console = Console()


def random_quantized(N: int, K: int, key: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """A 4-bit matrix made directly (random codes, plausible scales): no fp32 (N, K) in memory."""
    k1, k2 = mx.random.split(key)
    w = mx.random.randint(0, 256, (N, K * BITS // 8), dtype=mx.uint8, key=k1).view(mx.uint32)  # codes
    scales = mx.abs(mx.random.normal((N, K // GROUP_SIZE), key=k2)) * 0.003 + 1e-3
    biases = -8 * scales
    dtype = dispatch.compute_dtype() or mx.bfloat16  # the compute dtype policy (GPU: bf16 checkpoints)
    return w, scales.astype(dtype), biases.astype(dtype)


def nbytes(*arrays: mx.array) -> int:
    return sum(a.nbytes for a in arrays)


def _once(fn) -> float:
    start = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - start


def layer_case(name: str, M: int, key: mx.array):
    """(ours, baseline, weight bytes, implementation) for one layer and M."""
    K, parts = LAYERS[name]
    dtype = dispatch.compute_dtype() or mx.bfloat16
    x = mx.random.normal((M, K), key=key).astype(dtype)
    keys = mx.random.split(key, len(parts))
    separate = [random_quantized(N, K, keys[i]) for i, N in enumerate(parts)]
    # the fused matrix is its own copy, as after loading: the baseline's parts are separate arrays
    fused = tuple(mx.concatenate([p[i] for p in separate]) for i in range(3))
    mx.eval(x, separate, fused)
    kw = dict(group_size=GROUP_SIZE, bits=BITS)

    def baseline():
        ys = [mx.quantized_matmul(x, *p, transpose=True, **kw) for p in separate]
        return nn.silu(ys[0]) * ys[1] if name.startswith("gate_up") else ys

    if name.startswith("gate_up"):
        op = "gate_up_silu"

        def ours():
            return dispatch.gate_up_silu(x, *fused, **kw)
    else:
        op = "qmv"
        cuts = [sum(parts[: i + 1]) for i in range(len(parts) - 1)]

        def ours():
            y = dispatch.quantized_matmul(x, *fused, **kw)
            return mx.split(y, cuts, axis=-1) if cuts else y

    impl = dispatch.choose(op, x, fused[0], fused[1], GROUP_SIZE, BITS)
    return ours, baseline, nbytes(*fused), impl


def bench_layers(repeats: int) -> list[dict]:
    rows = []
    # decode and verification at every layer; prefill-sized M only where MLX's CPU qmm (which
    # costs M whole GEMVs) finishes in seconds
    cases = [(name, M) for name in LAYERS for M in (1, 8)] + [("qkv (fused)", 64), ("o_proj", 64)]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("layers", total=len(cases))
        for i, (name, M) in enumerate(cases):
            progress.update(task, description=f"{name} M={M}")
            ours, baseline, weight_bytes, impl = layer_case(name, M, mx.random.key(i))
            mx.eval(ours()), mx.eval(baseline())  # warm up (and compile kernels on a GPU)
            t_ours, t_mlx = [], []
            for rep in range(repeats):  # alternate, swapping who goes first: drift hits both alike
                for fn, times in ((ours, t_ours), (baseline, t_mlx))[:: 1 if rep % 2 else -1]:
                    times.append(_once(fn))
            ours_s, mlx_s = statistics.median(t_ours), statistics.median(t_mlx)
            rows.append(dict(layer=name, M=M, impl=impl, weight_bytes=weight_bytes,
                             ours_us=ours_s * 1e6, mlx_us=mlx_s * 1e6,
                             ours_gbs=weight_bytes / ours_s / 1e9, mlx_gbs=weight_bytes / mlx_s / 1e9,
                             speedup=mlx_s / ours_s))
            del ours, baseline
            mx.clear_cache()
            progress.advance(task)
    return rows


def bench_model(folder: Path, tokens: int, prompt_len: int, repeats: int) -> dict:
    """Prefill and greedy-decode tokens/s of one 4-bit folder, ours (fused, dispatched) against
    the layout mlx-lm runs (unfused, mx.quantized_matmul), alternating."""
    from mlx_mistral.generate import generate_step
    from mlx_mistral.load import load_model

    models = {"ours": load_model(folder), "mlx": load_model(folder, fuse=False)}
    vocab = models["ours"].args.vocab_size
    prompt = mx.random.randint(1000, vocab, (prompt_len,), key=mx.random.key(0))  # past the special ids

    def prefill(model) -> float:
        start = time.perf_counter()
        runner = backend_for(model)
        mx.eval(runner(prompt[None], cache=runner.make_cache()))
        return prompt_len / (time.perf_counter() - start)

    def decode(model) -> float:
        steps = generate_step(prompt[:8], model, max_tokens=tokens + 1)
        next(steps)  # prompt and first token: not decode
        start = time.perf_counter()
        for _ in steps:
            pass
        return tokens / (time.perf_counter() - start)

    runs = {(phase, name): [] for phase in ("prefill", "decode") for name in models}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("model", total=(repeats + 1) * 4)
        for rep in range(repeats + 1):  # the first round warms up; who goes first alternates
            for name, model in list(models.items())[:: 1 if rep % 2 else -1]:
                for phase, fn in (("prefill", prefill), ("decode", decode)):
                    value = fn(model)
                    if rep:
                        runs[phase, name].append(value)
                    progress.advance(task)
    out = dict(model=str(folder), prompt_tokens=prompt_len, decode_tokens=tokens, repeats=repeats)
    for phase in ("prefill", "decode"):
        ours, base = statistics.median(runs[phase, "ours"]), statistics.median(runs[phase, "mlx"])
        out[phase] = dict(ours_tok_s=ours, mlx_tok_s=base, speedup=ours / base,
                          ours_runs=runs[phase, "ours"], mlx_runs=runs[phase, "mlx"])  # the spread, too
    return out


def device_name() -> str:
    where = dispatch.backend()
    if where == "cpu":
        cpu = platform.processor() or platform.machine()
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                     if line.startswith("model name")]
            cpu = f"{names[0]} x{len(names)}" if names else cpu
        return f"MLX CPU backend on {cpu}"
    return f"MLX {where} backend: {mx.device_info().get('device_name', where)}"


def print_layers(rows: list[dict]) -> None:
    table = Table(title=f"4-bit g{GROUP_SIZE} quantized matmul, ours vs mlx-lm's calls ({device_name()})")
    for col in ("layer", "M", "impl", "ours µs", "mlx µs", "ours GB/s", "mlx GB/s", "speedup"):
        table.add_column(col, justify="left" if col in ("layer", "impl") else "right")
    for r in rows:
        table.add_row(r["layer"], str(r["M"]), r["impl"], f"{r['ours_us']:.0f}", f"{r['mlx_us']:.0f}",
                      f"{r['ours_gbs']:.2f}", f"{r['mlx_gbs']:.2f}", f"{r['speedup']:.2f}x")
    console.print(table)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        console.print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r['layer'].split()[0]}\nM={r['M']}" for r in rows]
    ax.bar(range(len(rows)), [r["speedup"] for r in rows], color=["tab:green" if r["speedup"] >= 1 else "tab:red" for r in rows])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("speedup over mlx-lm's calls")
    ax.set_title(device_name(), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model", type=Path, help="a 4-bit model folder: also time prefill and decode, fused vs unfused")
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens per run")
    parser.add_argument("--prompt", type=int, default=128, help="prefill tokens per run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--skip-layers", action="store_true", help="keep the layer results already in the JSON")
    args = parser.parse_args()

    out = args.out / dispatch.backend()
    if args.skip_layers:  # re-time the model only, keeping the layer table of an earlier run
        result = json.loads((out / "kernels.json").read_text())
        rows = result["layers"]
    else:
        rows = bench_layers(args.repeats)
        earlier = json.loads((out / "kernels.json").read_text()) if (out / "kernels.json").exists() else {}
        result = dict(device=device_name(), backend=dispatch.backend(), group_size=GROUP_SIZE, bits=BITS,
                      repeats=args.repeats, cpu_kernels=dispatch.cpu_kernels() is not None,
                      mlx_version=mx.__version__, layers=rows)
        if "model" in earlier and not args.model:  # keep the model timings of an earlier run
            result["model"] = earlier["model"]
    print_layers(rows)
    if args.model:
        result["model"] = bench_model(args.model, args.tokens, args.prompt, args.repeats)
        for phase in ("prefill", "decode"):
            d = result["model"][phase]
            console.print(f"{phase} {args.model}: ours (fused) {d['ours_tok_s']:.2f} tok/s, "
                          f"mlx-lm layout {d['mlx_tok_s']:.2f} tok/s ({d['speedup']:.2f}x)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out / "kernels.png")
    console.print(f"wrote {out / 'kernels.json'}")


if __name__ == "__main__":
    main()
