"""Memory planner: weights + KV cache + working memory against this machine's budget.

Everything is arithmetic on config.json (no weights are read), so it can answer for a 24B
folder in milliseconds and refuse a combination that would swap before loading anything.
Contexts are counted in tokens, never bytes: `prompt_tokens` / `count_prompt_tokens` give the
exact ids a prompt becomes (the tokenizer loads in about a second, long before the weights), and
`context_tokens` turns prompt + reply into what a run must hold, at most what the model accepts
(max_position_embeddings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import mlx.core as mx

from .cache import KVSettings
from .config import ModelArgs, tensor_shapes
from .errors import MistralError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
SCALE_BIAS = 2  # an affine-quantized group stores a scale and a bias in the float dtype
PREFILL_STEP = 2048  # generate.DEFAULT_PREFILL_STEP (not imported: the planner loads no MLX graph code)


def gpu_backend() -> bool:
    return mx.metal.is_available() or mx.cuda.is_available()


def runtime_dtype_bytes(config: dict) -> int:
    """Bytes per float the runtime computes in: float32 on the CPU backend (see
    `load.compute_dtype`), the checkpoint's dtype on a GPU."""
    if not gpu_backend():
        return 4
    return DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"), 2)


def _quantization_of(args: ModelArgs, module: str, in_features: int) -> Optional[dict]:
    q = args.quantization
    if not q:
        return None
    override = q.get(module)  # mlx-lm's per-layer recipe entries
    if override is False:
        return None
    q = override if isinstance(override, dict) else q
    # rows that do not split into whole groups stay in the float dtype (convert and mlx-lm do so)
    return None if in_features % q["group_size"] else q


def weights_bytes(args: ModelArgs, dtype_bytes: int = 2) -> int:
    """Bytes the parameters take in memory: quantized matrices at `bits` per weight plus a
    scale and bias per group, everything else in the float dtype."""
    total = 0
    for name, shape in tensor_shapes(args):
        n = math.prod(shape)
        q = _quantization_of(args, name.removesuffix(".weight"), shape[-1]) if len(shape) == 2 else None
        if q is None:
            total += n * dtype_bytes
        else:
            total += n * q["bits"] // 8 + (n // q["group_size"]) * SCALE_BIAS * dtype_bytes
    return total


def kv_bytes_per_token(args: ModelArgs, dtype_bytes: int = 2, kv_bits: Optional[int] = None,
                       kv_group_size: int = 64) -> float:
    """K and V of one token over all layers: layers x kv heads x head_dim x 2 (K and V)."""
    elements = args.num_hidden_layers * args.num_key_value_heads * args.head_dim * 2
    if kv_bits is None:
        return elements * dtype_bytes
    return elements * kv_bits / 8 + elements / kv_group_size * SCALE_BIAS * dtype_bytes


@dataclass
class Plan:
    """What a run needs: the parts people decide on are separate lines."""

    args: ModelArgs
    context: int  # tokens of prompt + reply the run must hold
    kv: KVSettings
    dtype_bytes: int
    fused_attention: bool  # Metal/CUDA attention kernels do not materialise the scores

    @property
    def weights(self) -> int:
        return weights_bytes(self.args, self.dtype_bytes)

    @property
    def kv_per_token(self) -> float:
        return kv_bytes_per_token(self.args, self.dtype_bytes, self.kv.kv_bits, self.kv.kv_group_size)

    @property
    def kv_tokens(self) -> int:
        return min(self.context, self.kv.max_kv_size) if self.kv.max_kv_size else self.context

    @property
    def kv_bytes(self) -> int:
        return int(self.kv_per_token * self.kv_tokens)

    def working(self, tokens: Optional[int] = None) -> int:
        """Activations of one prefill chunk (float32 MLP and attention projections), plus the
        attention scores of one layer where attention is not fused."""
        a, step = self.args, min(PREFILL_STEP, max(self.context, 1))
        acts = step * (3 * a.intermediate_size + 4 * a.hidden_size) * 4
        if not self.fused_attention:
            acts += a.num_attention_heads * step * (self.kv_tokens if tokens is None else tokens) * 4
        return acts

    @property
    def total(self) -> int:
        return self.weights + self.kv_bytes + self.working()

    def tokens_that_fit(self, budget: int) -> int:
        """The largest context whose KV and scores fit beside the weights, at most the model's
        max_position_embeddings (a longer one is not accepted, whatever the memory)."""
        a = self.args
        per_token = self.kv_per_token + (0 if self.fused_attention else a.num_attention_heads * PREFILL_STEP * 4)
        room = budget - self.weights - self.working(tokens=0)
        return max(0, min(a.max_position_embeddings, int(room // per_token)))


def plan(config: dict, *, context: int = 0, kv_bits: Optional[int] = None, kv_group_size: int = 64,
         max_kv_size: Optional[int] = None, dtype_bytes: Optional[int] = None,
         fused_attention: Optional[bool] = None) -> Plan:
    """The plan for a folder's config.json dict and a run holding `context` tokens (prompt +
    reply: see `context_tokens`), capped at max_position_embeddings; `dtype_bytes` and
    `fused_attention` default to this runtime's."""
    args = ModelArgs.from_dict(config)
    if not isinstance(context, int) or isinstance(context, bool) or context < 0:
        raise MistralError(f"the context to plan for must be a whole number of tokens, not {context!r}")
    context = min(context, args.max_position_embeddings)
    kv = KVSettings(kv_bits, kv_group_size, max_kv_size).check(args.head_dim)
    fused = gpu_backend() if fused_attention is None else fused_attention
    return Plan(args, context, kv, dtype_bytes or runtime_dtype_bytes(config), fused)


def prompt_tokens(tokenizer, prompt: Any, *, system: Optional[str] = None,
                  tools: Optional[list[dict]] = None) -> int:
    """How many ids `prompt` becomes, exactly as generation encodes it: text is one user message
    (after `system`), a list of message dicts goes through the chat format, ids count as they are."""
    if isinstance(prompt, str):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return len(tokenizer.encode_chat(messages, tools=tools))
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        messages = list(prompt)
        if system and messages[0].get("role") != "system":
            messages.insert(0, {"role": "system", "content": system})
        return len(tokenizer.encode_chat(messages, tools=tools))
    if isinstance(prompt, (list, tuple, mx.array)):
        return len(prompt)
    raise MistralError("prompt must be text, a non-empty list of token ids, or a list of messages")


def count_prompt_tokens(folder: str | Path, prompt: Any, *, system: Optional[str] = None,
                        tools: Optional[list[dict]] = None) -> int:
    """`prompt_tokens` with the tokenizer of a model folder, before (and without) its weights."""
    from .tokenizer import load_tokenizer

    return prompt_tokens(load_tokenizer(folder), prompt, system=system, tools=tools)


def context_tokens(config: dict, *, prompt: int = 0, max_tokens: Optional[int] = None,
                   context: Optional[int] = None) -> int:
    """The tokens a run must hold: `context` when the user set one (--context), else `prompt`
    tokens plus a reply of `max_tokens` (None: up to the model's limit), at most
    max_position_embeddings. A prompt or context longer than the model accepts is refused."""
    limit = ModelArgs.from_dict(config).max_position_embeddings
    for name, value in (("prompt", prompt), ("max_tokens", max_tokens), ("context", context)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise MistralError(f"{name} must be a whole number of tokens, not {value!r}")
    if context is not None:
        if context > limit:
            raise MistralError(f"a context of {context} tokens is more than the model accepts "
                               f"(max_position_embeddings {limit})")
        return context
    if prompt > limit:
        raise MistralError(f"the prompt is {prompt} tokens, more than the model accepts "
                           f"(max_position_embeddings {limit})")
    return limit if max_tokens is None else min(limit, prompt + max_tokens)


@dataclass
class Budget:
    bytes: int  # what a run may use
    ram: int  # physical memory
    source: str  # where `bytes` comes from


def _meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0]) * 1024
    return out


def machine_budget() -> Budget:
    """On a Mac the GPU's wired limit (Metal's recommended working set, about two thirds to
    three quarters of RAM); elsewhere the RAM available now."""
    info = mx.device_info()
    if mx.metal.is_available():
        return Budget(info["max_recommended_working_set_size"], info["memory_size"],
                      "GPU wired limit (Metal's recommended working set)")
    try:
        import psutil

        vm = psutil.virtual_memory()
        ram, available = vm.total, vm.available
    except ImportError:
        mem = _meminfo()
        ram, available = mem["MemTotal"], mem["MemAvailable"]
    if mx.cuda.is_available() and "memory_size" in info:
        return Budget(info["memory_size"], ram, "GPU memory")
    return Budget(available, ram, "available RAM")


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def check_fits(p: Plan, budget: Budget, *, name: str = "the model") -> None:
    """Raise a MistralError with the numbers and what to change if `p` does not fit."""
    if p.total <= budget.bytes:
        return
    fits = p.tokens_that_fit(budget.bytes)
    advice = []
    if fits > 0:
        advice.append(f"a context of at most {fits} tokens (--context / --max-kv-size / --max-tokens)")
    if p.kv.kv_bits != 4 and p.kv.max_kv_size is None and p.kv_tokens:
        for bits in ((8, 4) if p.kv.kv_bits is None else (4,)):
            q = Plan(p.args, p.context, KVSettings(bits, p.kv.kv_group_size), p.dtype_bytes, p.fused_attention)
            if q.total <= budget.bytes:
                advice.append(f"--kv-bits {bits} (KV {gb(q.kv_bytes)})")
                break
    if fits == 0:
        advice.append("a smaller quantization of the weights (or a machine with more memory)")
    raise MistralError(
        f"{name} does not fit: weights {gb(p.weights)} + KV {gb(p.kv_bytes)} ({p.kv.describe()}, "
        f"{p.kv_tokens} tokens) + working memory {gb(p.working())} = {gb(p.total)}, "
        f"more than this machine's {gb(budget.bytes)} ({budget.source}); try " + " or ".join(advice)
    )


def raise_wired_limit() -> Optional[int]:
    """On Metal, let the GPU wire up to its recommended working set (as mlx-lm does), so the
    weights are not paged out between tokens. Returns the previous limit."""
    if not mx.metal.is_available():
        return None
    return mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])


def plan_table(p: Plan, budget: Budget, *, title: str = "", on_disk: Optional[int] = None):
    """The plan as a rich Table."""
    from rich.table import Table

    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("")
    t.add_column("bytes", justify="right")
    t.add_column("", style="dim")
    q = p.args.quantization
    dtype = {4: "float32", 2: "16-bit"}[p.dtype_bytes]
    t.add_row("weights", gb(p.weights), (f"{q['bits']}-bit, group {q['group_size']}, " if q else "") + f"{dtype} floats")
    if on_disk is not None:
        t.add_row("weights on disk", gb(on_disk), "safetensors shards")
    t.add_row("KV per token", f"{p.kv_per_token / 1024:.1f} KiB", p.kv.describe())
    t.add_row(f"KV at {p.kv_tokens} tokens", gb(p.kv_bytes), f"{p.kv_bytes / 2**30:.2f} GiB")
    t.add_row("working memory", gb(p.working()),
              f"prefill chunk of {min(PREFILL_STEP, max(p.context, 1))}" + ("" if p.fused_attention else ", unfused attention scores"))
    t.add_row("total", gb(p.total), "", style="bold")
    t.add_row("budget", gb(budget.bytes), f"{budget.source}; RAM {gb(budget.ram)}")
    fits = p.total <= budget.bytes
    t.add_row("fits", "yes" if fits else "NO", f"up to {p.tokens_that_fit(budget.bytes)} tokens of context",
              style="green" if fits else "red")
    return t
