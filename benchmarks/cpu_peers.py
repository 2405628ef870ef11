"""CPU peers: mlx-mistral on its native kernels vs mlx-lm vs llama.cpp, SmolLM2-135M real weights.

    python benchmarks/cpu_peers.py [--prompt 128] [--decode 64] [--threads 2] [--rounds 2]
    python benchmarks/cpu_peers.py --big /tmp/ms3-q4   # 24B shape: decode GB/s

The same prompt ids go to every runtime; runtimes alternate within each round and the best
round counts. mlx-mistral and mlx-lm load the same MLX 4-bit g64 folder (converted once from the
fp32 HF checkpoint with mlx_lm.convert); llama.cpp runs the original Q4_1 GGUF. Prefill tok/s is
prompt length over time to first token; decode tok/s counts the tokens after it.
Writes benchmarks/results/cpu/cpu_peers.json and .png (cpu_peers_Nthread.* for other thread
counts, then _avx2 with AVX-512 off and _float with MLX_MISTRAL_INT8=0; big_model.json /
big_model_Nthread.json for --big). MLX_MISTRAL_RESULTS_DEVICE names the folder instead of cpu.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/fixtures.py

import mlx_mistral  # noqa: E402,F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import fixtures  # noqa: E402
from mlx_mistral.bench import read_test_gbps  # noqa: E402
from mlx_mistral.engine.backend import NATIVE_ENV, backend_for  # noqa: E402
from mlx_mistral.generate import generate_step  # noqa: E402
from mlx_mistral.kernels import cpu  # noqa: E402
from mlx_mistral.load import load_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / os.environ.get("MLX_MISTRAL_RESULTS_DEVICE", "cpu")
PROMPT_TEXT = ("Explain, step by step and with examples, how a transformer language model turns a prompt "
               "into an answer: tokenization, embeddings, attention, the feed-forward layers, sampling. ") * 8


def cpu_name() -> str:
    """The CPU's name, family/model (names apart Xeons that /proc/cpuinfo calls alike) and SIMD level."""
    info = Path("/proc/cpuinfo")
    fields = {}
    for line in info.read_text().splitlines() if info.exists() else []:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if not fields:
        return f"{platform.machine()}, {os.cpu_count()} cpus"
    flags = set(fields.get("flags", "").split())
    simd = [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni") if f in flags]
    return (f"{fields.get('model name', platform.machine())} (family {fields.get('cpu family', '?')} model "
            f"{fields.get('model', '?')}; {' '.join(simd) or 'no AVX2'}), {os.cpu_count()} cpus")


def mlx_folder() -> Path:
    """SmolLM2 as an MLX 4-bit group-64 folder, converted once next to the HF fixture."""
    out = fixtures.CACHE / "smollm2-mlx-q4g64"
    if not (out / "config.json").exists():
        from mlx_lm import convert

        convert(str(fixtures.smollm2_hf()), str(out), quantize=True, q_group_size=64, q_bits=4)
    return out


def time_stream(tokens, n_prompt: int) -> dict:
    """Prefill/decode rates from a generator of tokens whose first item ends the prefill, and the
    process CPU time per decoded token (all threads; on a busy machine it shows the work done)."""
    start = time.perf_counter()
    first = first_cpu = None
    count = 0
    for _ in tokens:
        count += 1
        if first is None:
            first, first_cpu = time.perf_counter(), time.process_time()
    end, end_cpu = time.perf_counter(), time.process_time()
    return {"prefill_tps": n_prompt / (first - start), "decode_tps": (count - 1) / (end - first),
            "decode_cpu_ms_per_token": (end_cpu - first_cpu) / (count - 1) * 1e3}


def run_mlx_mistral(model, ids: list[int], n: int) -> dict:
    return time_stream((t for t, _ in generate_step(mx.array(ids), model, max_tokens=n)), len(ids))


def run_mlx_ops(model, ids: list[int], n: int) -> dict:
    """generate_step on the MLX-ops backend: the decoder switched off for the run."""
    os.environ[NATIVE_ENV] = "0"
    try:
        return run_mlx_mistral(model, ids, n)
    finally:
        del os.environ[NATIVE_ENV]


def run_mlx_lm(model, tokenizer, ids: list[int], n: int) -> dict:
    from mlx_lm.generate import stream_generate

    return time_stream(stream_generate(model, tokenizer, ids, max_tokens=n), len(ids))


def run_llama_cpp(ids: list[int], n: int, threads: int, package: Optional[Path] = None) -> dict:
    """llama.cpp in a child process: its thread pool stays out of ours, and a crash in it costs
    only its own column. `package`: a folder whose `llama_cpp` the child imports instead of the
    installed one (e.g. with an AVX2-only libggml-cpu.so, to compare on AVX2 kernels alone)."""
    paths = ([str(package)] if package else []) + [str(Path(__file__).resolve().parent)]  # package first
    code = ("import json, sys; sys.path[:0] = %r; import cpu_peers; "
            "print(json.dumps(cpu_peers.llama_cpp_child(json.loads(sys.argv[1]), %d, %d)))"
            % (paths, n, threads))
    run = subprocess.run([sys.executable, "-c", code, json.dumps(ids)], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"llama.cpp exited with {run.returncode}: {run.stderr.strip()[-300:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def llama_cpp_child(ids: list[int], n: int, threads: int) -> dict:
    import llama_cpp.llama_cpp as lc
    from llama_cpp import Llama

    # no "extra buffer types" (weight repacking / AMX): on this VM, which lists AMX, ggml's AMX path
    # crashes in llama_decode; Q4_1 is not repacked for AVX2/AVX-512 anyway
    defaults = lc.llama_model_default_params

    def model_params():
        params = defaults()
        params.use_extra_bufts = False
        return params

    lc.llama_model_default_params = model_params
    llm = Llama(model_path=str(fixtures.smollm2_gguf()), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                verbose=False)

    def tokens():
        for i, t in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True)):
            yield t
            if i + 1 == n:
                return

    out = time_stream(tokens(), len(ids))
    out["build"] = lc.llama_print_system_info().decode()  # which SIMD this llama.cpp was built for
    return out


def boundary_cost_us(reps: int = 2000) -> dict:
    """Per-call cost of the eval boundary: a native call from Python (eval x, zero-copy view,
    C call, result back into MLX) against the bare C call, on one small layer, single-threaded."""
    import numpy as np

    w, s, b = mx.quantize(mx.random.normal((64, 576)), group_size=64, bits=4)
    packed = cpu.Packed(w, s, b, 64, 4)
    x = mx.random.normal((1, 576))
    mx.eval(x)
    xn, y, lib = np.asarray(x), np.empty((1, 64), np.float32), cpu._library()[0]
    bare = lambda: lib.mm_qmm(xn.ctypes.data, 1, 576, packed.w, packed.scales, packed.biases, packed.dtype,  # noqa: E731
                              64, 64, 4, y.ctypes.data)
    cpu.set_threads(1)
    times = {}
    for name, fn in (("bare_c", bare), ("from_python", lambda: packed(x)), ("mlx_op", lambda: mx.eval(
            mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=4)))):
        fn()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        times[name] = (time.perf_counter() - start) / reps * 1e6
    times["boundary_overhead"] = times["from_python"] - times["bare_c"]
    return times


def peers(args) -> dict:
    folder = mlx_folder()
    from mlx_lm import load as mlx_lm_load

    lm_model, lm_tok = mlx_lm_load(str(folder))
    ids = lm_tok.encode(PROMPT_TEXT)[: args.prompt]
    ours = load_model(folder)  # the native decoder: one C call per forward
    per_op = load_model(folder)  # the same kernels called per matmul, MLX ops in between
    cpu.set_threads(args.threads)
    runners = {
        "mlx-mistral (native decoder)": lambda: run_mlx_mistral(ours, ids, args.decode),
        "mlx-mistral (per-op kernels)": lambda: run_mlx_ops(per_op, ids, args.decode),
        "mlx-lm": lambda: run_mlx_lm(lm_model, lm_tok, ids, args.decode),
    }
    if importlib.util.find_spec("llama_cpp"):
        runners["llama.cpp"] = lambda: run_llama_cpp(ids, args.decode, args.threads, args.llama_cpp_package)
    else:
        print("llama-cpp-python not installed: llama.cpp left out", file=sys.stderr)

    load_before = os.getloadavg()[0]
    best: dict[str, dict] = {}
    failures = {}
    for r in range(args.rounds):
        for name, run in list(runners.items()):
            try:
                res = run()
            except RuntimeError as e:  # a peer that fails is reported, not fatal
                print(f"round {r + 1} {name}: {e}", file=sys.stderr)
                failures[name] = str(e)
                del runners[name]
                continue
            print(f"round {r + 1} {name:30s} prefill {res['prefill_tps']:8.1f} tok/s  decode {res['decode_tps']:7.1f} tok/s",
                  flush=True)
            kept = best.setdefault(name, {})
            for key, value in res.items():  # best round: highest rate, least CPU
                pick = min if key.endswith("per_token") else max
                kept[key] = pick(kept[key], value) if key in kept else value
    if "llama.cpp" in best:
        ref = best["llama.cpp"]
        for res in best.values():
            res["prefill_vs_llama_cpp"] = res["prefill_tps"] / ref["prefill_tps"]
            res["decode_vs_llama_cpp"] = res["decode_tps"] / ref["decode_tps"]
    boundary = boundary_cost_us()
    cpu.set_threads(args.threads)
    calls = 4 * len(per_op.layers) + 1  # per-op path: qkv, o, gate/up, down per block; the head
    return {"model": "SmolLM2-135M-Instruct", "format": "MLX affine 4-bit g64 (llama.cpp: Q4_1 GGUF)",
            "load_average_before_after": [load_before, os.getloadavg()[0]],
            "native_decoder": backend_for(ours).name == "native-cpu",
            "per_op_native_calls_per_decode_token": calls, "call_cost_us": boundary,
            "prompt_tokens": len(ids), "decode_tokens": args.decode, "threads": args.threads,
            "rounds": args.rounds, "kernels": cpu.describe(), "results": best, "failed": failures}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, key, title in zip(axes, ("prefill_tps", "decode_tps"), ("prefill", "decode")):
        values = [report["results"][n][key] for n in names]
        bars = ax.bar(range(len(names)), values, color=["tab:orange", "tab:olive", "tab:gray", "tab:blue"][: len(names)])
        ax.bar_label(bars, fmt="%.1f")
        ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{title}, {report['prompt_tokens']}-token prompt, {report['threads']} threads")
    ours = report["kernels"].split(", built")[0].removeprefix("native CPU kernels (")
    simd = [f for f in ("AVX512", "AVX2") if f"{f} = 1" in report["results"].get("llama.cpp", {}).get("build", "")]
    fig.suptitle(f"{report['model']} on CPU\n{report['machine']}, load average "
                 f"{report['load_average_before_after'][0]:.1f}\nours: {ours}; llama.cpp: "
                 f"{simd[0] if simd else '?'} build", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def big(args) -> dict:
    """Decode rate of a large model folder and the weight bandwidth it implies."""
    model = load_model(args.big)
    cpu.set_threads(args.threads)
    # bytes read per decoded token: every matrix except the embedding table (one row of it)
    read = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if "embed_tokens" not in k)
    ids = list(range(1000, 1000 + args.prompt))
    res = run_mlx_mistral(model, ids, args.decode)
    res["gb_per_s"] = read * res["decode_tps"] / 1e9
    res["gb_per_cpu_s"] = read / (res["decode_cpu_ms_per_token"] / 1e3) / 1e9
    res["read_test_gbps"] = read_test_gbps()  # the machine's read ceiling (all cores), same run
    res["of_read_test"] = res["gb_per_s"] / res["read_test_gbps"]
    print(f"{args.big}: decode {res['decode_tps']:.2f} tok/s, {res['gb_per_s']:.1f} GB/s of weights "
          f"({read / 1e9:.2f} GB per token, {100 * res['of_read_test']:.0f}% of the read test's "
          f"{res['read_test_gbps']:.1f} GB/s); prefill {res['prefill_tps']:.1f} tok/s")
    return {"model": str(args.big), "load_average_after": os.getloadavg()[0], "bytes_per_token": read, "prompt_tokens": len(ids), "decode_tokens": args.decode,
            "threads": args.threads, "kernels": cpu.describe(),
            "native_decoder": backend_for(model).name == "native-cpu", **res}


def float_suffix() -> str:
    """'_float' for an x86 run on float activations (MLX_MISTRAL_INT8=0), where int8 is the default."""
    lib = cpu._library()[0]
    return "_float" if lib is not None and lib.mm_simd() >= 2 and not lib.mm_int8() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--llama-cpp-package", type=Path,
                        help="a folder holding the llama_cpp package to run instead of the installed one")
    parser.add_argument("--big", type=Path, help="a large MLX 4-bit folder: decode tok/s and GB/s only")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"machine": cpu_name(), "mlx": mx.__version__}
    if args.big:
        report.update(big(args))
        name = "big_model" if args.threads == 2 else f"big_model_{args.threads}thread"
        name += float_suffix()
        (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2))
        return
    report.update(peers(args))
    print(f"native decoder: {report['native_decoder']}; the per-op path makes "
          f"{report['per_op_native_calls_per_decode_token']} native calls per token, each costing (us): "
          + ", ".join(f"{k} {v:.1f}" for k, v in report["call_cost_us"].items()))
    name = "cpu_peers" if args.threads == 2 else f"cpu_peers_{args.threads}thread"
    lib = cpu._library()[0]
    name += {3: "", 2: "_avx2"}.get(lib.mm_simd(), "_portable")  # a run with AVX-512 turned off
    name += float_suffix()
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    plot(report, RESULTS / f"{name}.png")
    print(json.dumps(report["results"], indent=2))


if __name__ == "__main__":
    main()
