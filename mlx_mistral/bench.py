"""Benchmark measurement core: prefill and decode speed, time to first token, memory, bandwidth.

Measured the way mlx-lm's `mlx_lm.benchmark` and llama.cpp's `llama-bench` do: random prompt
ids, a fixed number of generated tokens with end-of-sequence ignored, a warm-up, then timed
trials. The same harness drives any `generate_step`-shaped generator (ours or mlx-lm's), so a
side-by-side comparison times both runtimes with identical code.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .kernels.dispatch import backend

# (prompt ids, model, max_tokens=, prefill_step_size=) -> (token id, logprobs) pairs
StepFn = Callable[..., Iterator[tuple[Any, mx.array]]]
# listener(phase, done, total): phase is "prefill" or "decode"
Listener = Callable[[str, int, int], None]

# Peak memory bandwidth of the full chip (GB/s), from Apple's specifications. Binned parts read
# less (M3 Max 14-core CPU: 300, M4 Max 14-core CPU: 410): pass --peak-gbps for those.
APPLE_BANDWIDTH_GBPS = {
    "M1": 68, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800,
    "M2": 100, "M2 Pro": 200, "M2 Max": 400, "M2 Ultra": 800,
    "M3": 100, "M3 Pro": 150, "M3 Max": 400, "M3 Ultra": 819,
    "M4": 120, "M4 Pro": 273, "M4 Max": 546,
    "M5": 153, "M5 Max": 614,
}
_APPLE_CHIP = re.compile(r"\bM(\d+)(?:\s+(Pro|Max|Ultra))?\b")
COPY_TEST_MB = 256  # well past any last-level cache, small enough to run in well under a second


# --- the machine -------------------------------------------------------------------------------

def chip_name() -> str:
    """The accelerator's name on a GPU backend, else the CPU's brand string."""
    name = ""
    if backend() != "cpu":
        name = str(mx.device_info().get("device_name", ""))
    if not name and sys.platform == "darwin":
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        name = out.stdout.strip()
    if not name and sys.platform == "linux":
        try:
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1] for line in f if line.startswith("model name")), "")
        except OSError:
            name = ""
    return " ".join(name.split()) or platform.processor() or platform.machine()


def apple_bandwidth_gbps(chip: str) -> Optional[float]:
    """Known peak bandwidth of an Apple chip name such as "Apple M3 Max", else None."""
    m = _APPLE_CHIP.search(chip) if "Apple" in chip else None
    if not m:
        return None
    key = f"M{m.group(1)}" + (f" {m.group(2)}" if m.group(2) else "")
    return APPLE_BANDWIDTH_GBPS.get(key)


def device_slug() -> str:
    """A short folder name for results: "apple-m3-max", "cuda-nvidia-h100-80gb-hbm3",
    "cpu-xeon-2core"."""
    chip = chip_name()
    kind = backend()
    if kind == "metal":
        slug = chip
    elif kind == "cuda":
        slug = f"cuda {chip}"
    else:
        family = next((w for w in ("epyc", "xeon", "ryzen", "threadripper", "core", "graviton", "neoverse")
                       if w in chip.lower()), chip.split()[0] if chip else platform.machine())
        slug = f"cpu {family} {os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)", "", slug.lower())).strip("-")


def copy_test_gbps(megabytes: int = COPY_TEST_MB, repeats: int = 5) -> float:
    """Best-of-`repeats` memory copy rate in GB/s (bytes read + bytes written).

    On the CPU every core copies its own slice at once (one thread cannot saturate the memory
    bus); on a GPU MLX copies one large array.
    """
    if backend() == "cpu":
        import numpy as np

        threads = os.cpu_count() or 1
        n = megabytes * 2**20 // 8 // threads
        src = [np.ones(n) for _ in range(threads)]
        dst = [np.empty(n) for _ in range(threads)]
        with ThreadPoolExecutor(threads) as pool:
            def once() -> float:
                tic = time.perf_counter()
                list(pool.map(np.copyto, dst, src))  # numpy releases the GIL while copying
                return time.perf_counter() - tic

            best = min(once() for _ in range(repeats))
        return 2 * n * 8 * threads / best / 1e9
    a = mx.ones((megabytes * 2**20 // 4,), dtype=mx.float32)
    mx.eval(a)
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(a + 1)
        best = min(best, time.perf_counter() - tic)
    return 2 * a.nbytes / best / 1e9


def read_test_gbps(megabytes: int = COPY_TEST_MB, repeats: int = 5) -> float:
    """Best-of-`repeats` read rate in GB/s: every core sums its own slice of a buffer far larger
    than the caches. Decode only reads its weights, so this, not the copy test (which counts
    reads plus writes), is the ceiling a decode rate is quoted against on the CPU."""
    import numpy as np

    threads = os.cpu_count() or 1
    n = megabytes * 2**20 // 8 // threads
    bufs = [np.ones(n) for _ in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        def once() -> float:
            tic = time.perf_counter()
            list(pool.map(np.sum, bufs))  # numpy releases the GIL inside the reduction
            return time.perf_counter() - tic

        best = min(once() for _ in range(repeats))
    return n * 8 * threads / best / 1e9


@dataclass
class PeakBandwidth:
    gbps: float
    source: str  # "known: Apple M3 Max", "measured read test", "measured copy test", "--peak-gbps"


def peak_bandwidth(override: Optional[float] = None) -> PeakBandwidth:
    """The machine's peak memory bandwidth: given, known for the Apple chip, or measured (on the
    CPU by the read test: decode only reads; on a GPU by MLX's copy test)."""
    if override is not None:
        return PeakBandwidth(float(override), "--peak-gbps")
    chip = chip_name()
    known = apple_bandwidth_gbps(chip)
    if known is not None:
        return PeakBandwidth(float(known), f"known: {chip}")
    if backend() == "cpu":
        return PeakBandwidth(round(read_test_gbps(), 1), "measured read test (multi-threaded sum)")
    return PeakBandwidth(round(copy_test_gbps(), 1), "measured copy test")


def device_info(peak: PeakBandwidth) -> dict:
    """What a result was measured on."""
    return {"name": chip_name(), "slug": device_slug(), "backend": backend(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "mlx": mx.__version__,
            "peak_gbps": peak.gbps, "peak_source": peak.source}


# --- the model ---------------------------------------------------------------------------------

def _is_embedding(name: str) -> bool:
    # "model.embed_tokens.weight", or a sharded model's "model.embed_tokens.embed.weight"
    return "embed_tokens" in name.split(".")[:-1]


def weight_bytes(model) -> int:
    """Bytes of all parameters as they sit in memory (quantized weights, scales, norms)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def weight_bytes_per_token(model, vocab_size: int) -> int:
    """Bytes of weights one decoded token reads: every parameter, except that the embedding
    table is read one row at a time (all of it when it doubles as the output head)."""
    params = tree_flatten(model.parameters())
    tied = not any(name.startswith("lm_head.") for name, _ in params)
    total = 0
    for name, v in params:
        if _is_embedding(name) and not tied:
            total += v.nbytes // v.shape[0]  # one row of weight (and of scales, biases); a rank holds vocab / N
        else:
            total += v.nbytes
    return total


def random_prompt(vocab_size: int, length: int, seed: int = 0) -> mx.array:
    """`length` random token ids, as `mlx_lm.benchmark` uses: the content does not change the
    cost of a dense model."""
    return mx.random.randint(0, vocab_size, (length,), key=mx.random.key(seed)).astype(mx.int32)


# --- one timed run ----------------------------------------------------------------------------

@dataclass
class Trial:
    prompt_tokens: int
    generation_tokens: int
    prefill_tps: float  # prompt tokens / time to first token
    decode_tps: float  # tokens after the first / time since the first (steady state)
    ttft_s: float
    total_s: float
    peak_memory_gb: float  # MLX's peak allocation, weights included
    cpu_s: float  # this process's CPU time over the trial: below total_s x cores, others took the rest
    achieved_gbps: float = 0.0  # weight bytes per token x decode tokens/s
    peak_pct: float = 0.0  # achieved / the machine's peak bandwidth, in percent


def settle() -> None:
    """Wait for all queued work, including the step a generator computes ahead on its own stream
    (ours or mlx-lm's): left running, it would eat into the next trial's time."""
    import sys

    from .engine.steps import generation_stream

    streams = [mx.default_stream(mx.default_device()), generation_stream]
    theirs = sys.modules.get("mlx_lm.generate")
    if theirs is not None:
        streams.append(theirs.generation_stream)
    for stream in streams:
        mx.synchronize(stream)


def run_trial(step_fn: StepFn, model, prompt: mx.array, generation_tokens: int, *,
              prefill_step: int = 2048, listener: Optional[Listener] = None) -> Trial:
    """Generate `generation_tokens` tokens after `prompt` (no stop condition) and time it."""
    settle()
    mx.reset_peak_memory()
    if listener:
        listener("prefill", 0, prompt.size)
    cpu = time.process_time()
    tic = time.perf_counter()
    first = tic
    n = 0
    for n, _ in enumerate(step_fn(prompt, model, max_tokens=generation_tokens,
                                  prefill_step_size=prefill_step), start=1):
        if n == 1:
            first = time.perf_counter()
            if listener:
                listener("prefill", prompt.size, prompt.size)
        if listener:
            listener("decode", n, generation_tokens)
    mx.synchronize()
    end = time.perf_counter()
    cpu = time.process_time() - cpu
    ttft = first - tic
    return Trial(
        prompt_tokens=prompt.size, generation_tokens=n,
        prefill_tps=prompt.size / ttft,
        decode_tps=(n - 1) / (end - first) if n > 1 else 0.0,
        ttft_s=ttft, total_s=end - tic, peak_memory_gb=mx.get_peak_memory() / 1e9, cpu_s=cpu,
    )


def with_bandwidth(trial: Trial, bytes_per_token: int, peak_gbps: float) -> Trial:
    trial.achieved_gbps = bytes_per_token * trial.decode_tps / 1e9
    trial.peak_pct = 100 * trial.achieved_gbps / peak_gbps if peak_gbps else 0.0
    return trial


WARMUP_PROMPT, WARMUP_TOKENS = 8, 4  # short: on a CPU a full-size warm-up would double the run


def warm_up(step_fn: StepFn, model, vocab_size: int, prefill_step: int) -> None:
    """A short untimed run: first-call allocations and kernel builds stay out of the trials."""
    prompt = random_prompt(vocab_size, WARMUP_PROMPT, seed=1)
    run_trial(step_fn, model, prompt, WARMUP_TOKENS, prefill_step=prefill_step)


# --- many runs ---------------------------------------------------------------------------------

METRICS = ("prefill_tps", "decode_tps", "ttft_s", "peak_memory_gb", "achieved_gbps", "peak_pct")


def summarize(trials: list[Trial]) -> dict:
    """{metric: {"min", "median", "max"}} over trials."""
    out = {}
    for key in METRICS:
        values = [getattr(t, key) for t in trials]
        out[key] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    return out


@dataclass
class BenchConfig:
    prompt_tokens: int = 512
    generation_tokens: int = 128
    trials: int = 3
    prefill_step: int = 2048
    warmup: bool = True
    seed: int = 0


@dataclass
class BenchResult:
    model: str
    runtime: str
    config: BenchConfig
    device: dict
    weight_bytes: int
    weight_bytes_per_token: int
    trials: list[Trial] = field(default_factory=list)
    date: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc)
                      .strftime("%Y-%m-%dT%H:%M:%SZ"))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["summary"] = summarize(self.trials)
        out["median"] = {k: v["median"] for k, v in out["summary"].items()}
        return out


def benchmark(step_fn: StepFn, model, *, model_name: str, runtime: str, vocab_size: int,
              config: BenchConfig, peak: PeakBandwidth,
              listener: Optional[Callable[[int, str, int, int], None]] = None) -> BenchResult:
    """Warm up, then `config.trials` timed runs of the same random prompt.

    `listener(trial, phase, done, total)` follows progress; trial 0 is the warm-up.
    """
    prompt = random_prompt(vocab_size, config.prompt_tokens, config.seed)
    result = BenchResult(model=model_name, runtime=runtime, config=config, device=device_info(peak),
                         weight_bytes=weight_bytes(model),
                         weight_bytes_per_token=weight_bytes_per_token(model, vocab_size))
    if config.warmup:
        if listener:
            listener(0, "warm-up", 0, 1)
        warm_up(step_fn, model, vocab_size, config.prefill_step)
    for i in range(1, config.trials + 1):
        follow = (lambda phase, done, total, i=i: listener(i, phase, done, total)) if listener else None
        trial = run_trial(step_fn, model, prompt, config.generation_tokens,
                          prefill_step=config.prefill_step, listener=follow)
        result.trials.append(with_bandwidth(trial, result.weight_bytes_per_token, peak.gbps))
    return result
