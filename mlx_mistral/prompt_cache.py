"""Prompt caches on disk: the KV of a fixed prefix (system prompt, tools, a long document).

A file is mlx-lm's prompt-cache safetensors (`save_prompt_cache` / `load_prompt_cache`) with
metadata that says what it is for: the model's fingerprint, the KV settings and the prefix ids.
Loading refuses a file made for another model or other KV settings: its K/V would be silently
wrong there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from .cache import KEEP, ConversationCache, KVCache, KVSettings, RotatingKVCache, adopt, common_prefix_length, portable
from .errors import MistralError, first_line
from .engine.steps import prefill
from .kernels.dispatch import compute_dtype

FORMAT = "mlx-mistral-prompt-cache/1"
# the document and the question of a request are joined with this (see `PromptCacheFile.messages`)
DOCUMENT_SEPARATOR = "\n\n"
SAMPLE = 64  # leading elements of each parameter that go into the fingerprint


def model_fingerprint(model) -> str:
    """A short hash of the config and of a sample of every weight tensor.

    Cheap for a 24B model (64 values per tensor) yet different for two checkpoints of the same
    shape; floats are hashed as float32 so the compute dtype does not change it."""
    h = hashlib.sha256(json.dumps(model.args.to_hf_dict(), sort_keys=True).encode())
    for name, p in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        sample = p.reshape(-1)[:SAMPLE]
        if mx.issubdtype(sample.dtype, mx.floating):
            sample = sample.astype(mx.float32)
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(np.array(sample).tobytes())
    return h.hexdigest()[:16]


def prefix_ids(tokenizer, *, system: Optional[str] = None, document: Optional[str] = None,
               tools: Optional[list[dict]] = None) -> list[int]:
    """The ids every request with this system prompt, tools and document starts with.

    Found as the common prefix of two requests that differ only in the question, so it
    follows whatever the chat format puts where."""
    def ids(question: str) -> list[int]:
        text = document + DOCUMENT_SEPARATOR + question if document else question
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return tokenizer.encode_chat(messages, tools=tools)

    a, b = ids("A"), ids("B")
    return a[: common_prefix_length(a, b)]


@dataclass
class PromptCacheFile:
    """A loaded prompt cache: the conversation cache to generate with and what it was made of."""

    conversation: ConversationCache
    system: Optional[str] = None
    document: Optional[str] = None
    tools: Optional[list[dict]] = None
    metadata: dict = field(default_factory=dict)

    def messages(self, prompt: str) -> list[dict]:
        """A request for `prompt` that starts with the cached prefix."""
        text = self.document + DOCUMENT_SEPARATOR + prompt if self.document else prompt
        return ([{"role": "system", "content": self.system}] if self.system else []) + [{"role": "user", "content": text}]


def _safetensors_path(out: str | Path) -> Path:
    out = Path(out).expanduser()
    return out if out.suffix == ".safetensors" else out.with_name(out.name + ".safetensors")


def cache_prompt(model, tokenizer, out: str | Path, *, system: Optional[str] = None,
                 document: Optional[str] = None, tools: Optional[list[dict]] = None,
                 kv_bits: Optional[int] = None, kv_group_size: int = 64,
                 progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Compute the KV of the prefix for (system, tools, document) and write it to `out`
    (`.safetensors` is appended if missing). Returns the path written."""
    if not (system or document or tools):
        raise MistralError("nothing to cache: give a system prompt, a document or tools")
    out = writable_output(_safetensors_path(out))  # before the prefill, which may take minutes
    ids = prefix_ids(tokenizer, system=system, document=document, tools=tools)
    conversation = ConversationCache(model, kv_bits=kv_bits, kv_group_size=kv_group_size)
    prefill(model, mx.array(ids, dtype=mx.int32), conversation.cache, progress=progress)
    conversation.record(ids)
    metadata = {
        "format": FORMAT,
        "model": model_fingerprint(model),
        **conversation.settings.as_metadata(),
        "tokens": json.dumps(conversation.tokens),
        "system": system or "",
        "document": document or "",
        "tools": json.dumps(tools) if tools else "",
    }
    tmp = out.with_name(f".{out.stem}.partial.safetensors")
    try:
        save_prompt_cache(str(tmp), portable(conversation.cache), metadata)
        os.replace(tmp, out)  # a reader never sees half a file
    except (OSError, RuntimeError, ValueError) as e:  # MLX reports a failed write as RuntimeError
        raise MistralError(f"cannot write the prompt cache {out}: {_reason(e)}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return out


def _reason(e: Exception) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)


def writable_output(out: Path) -> Path:
    """`out`, once its folder exists and a regular file can be written there; else one line."""
    if out.exists() and not out.is_file():
        raise MistralError(f"cannot write the prompt cache {out}: it exists and is not a regular file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.with_name(f".{out.stem}.probe")
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise MistralError(f"cannot write the prompt cache {out}: {_reason(e)}") from None
    return out


CACHE_CLASSES = ("KVCache", "QuantizedKVCache", "RotatingKVCache")  # what `cache_prompt` writes


def _read_header(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, read from its header alone (no arrays)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100 * 2**20:  # the safetensors limit on a header
                raise ValueError("no safetensors header")
            raw = json.loads(f.read(size)).get("__metadata__", {})
        if not isinstance(raw, dict):
            raise ValueError("its metadata is not an object")
    except FileNotFoundError:
        raise MistralError(f"no such prompt cache file: {path}") from None
    except IsADirectoryError:
        raise MistralError(f"{path} is a folder, not a prompt cache file") from None
    except (OSError, ValueError, AttributeError) as e:
        raise MistralError(f"{path} is not a prompt cache file ({first_line(e)})") from e
    return raw


def _check_metadata(meta: dict, classes: list) -> Optional[str]:
    """What is wrong with a prompt cache's metadata, or None."""
    for key in ("model", "tokens", "system", "document", "tools", "kv_bits", "kv_group_size", "max_kv_size"):
        if not isinstance(meta.get(key), str):
            return f"its metadata lacks {key}"
    try:
        tokens = json.loads(meta["tokens"])
        tools = json.loads(meta["tools"]) if meta["tools"] else []
    except json.JSONDecodeError as e:
        return f"its tokens or tools are not JSON ({e.msg})"
    if not (isinstance(tokens, list) and tokens and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                        for t in tokens)):
        return "its tokens are not a list of token ids"
    if not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return "its tools are not a list of tool definitions"
    try:
        KVSettings.from_metadata(meta)
    except MistralError as e:
        return f"its KV settings are wrong: {e}"
    if not classes or any(c not in CACHE_CLASSES for c in classes):
        bad = next((c for c in classes if c not in CACHE_CLASSES), None)
        return f"it holds an unknown cache class {bad!r}" if classes else "it names no cache classes"
    return None


def peek_prompt_cache(path: str | Path) -> dict[str, str]:
    """A prompt cache file's metadata, read from the safetensors header alone (no arrays) and
    checked: every field `cache_prompt` writes is there and well formed."""
    path = Path(path).expanduser()
    raw = _read_header(path)
    # mlx-lm flattens [user metadata, cache classes, scalars]: ours are the "0." keys
    meta = {k[2:]: v for k, v in raw.items() if k.startswith("0.")}
    if meta.get("format") != FORMAT:
        raise MistralError(f"{path} is not an mlx-mistral prompt cache (format {meta.get('format')!r})")
    classes = [v for k, v in sorted(raw.items(), key=lambda kv: _index(kv[0])) if k.startswith("1.")]
    problem = _check_metadata(meta, classes)
    if problem:
        raise MistralError(f"{path} is a damaged prompt cache: {problem}")
    return meta


def _index(key: str) -> int:
    head, _, rest = key.partition(".")
    return int(rest) if rest.isdigit() else -1


def load_prompt_cache_file(path: str | Path, model, *, kv_bits: Optional[int] = None,
                           kv_group_size: int = 64, max_kv_size: Optional[int] = None) -> PromptCacheFile:
    """Load a file written by `cache_prompt` for `model`, with the KV settings asked for."""
    path = Path(path).expanduser()
    peek_prompt_cache(path)
    try:
        cache, meta = load_prompt_cache(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise MistralError(f"cannot read prompt cache {path}: {first_line(e)}") from e
    remake = "remake it with `mlx-mistral cache-prompt` for this model and these settings"
    if len(cache) != len(model.layers):
        raise MistralError(f"{path} holds {len(cache)} layers of K/V but the model has {len(model.layers)}: {remake}")
    if meta["model"] != model_fingerprint(model):
        raise MistralError(f"{path} was made for another model (fingerprint {meta['model']}, "
                           f"this model's is {model_fingerprint(model)}): {remake}")
    made = KVSettings.from_metadata(meta)
    asked = KVSettings(kv_bits, kv_group_size, max_kv_size)
    if (made.kv_bits, made.kv_group_size if made.kv_bits else 0) != (asked.kv_bits, asked.kv_group_size if asked.kv_bits else 0):
        raise MistralError(f"{path} holds {made.describe()} but {asked.describe()} was asked for: "
                           f"pass the same --kv-bits/--kv-group-size or {remake}")
    if kv_bits is None:
        dtype = compute_dtype(model)  # the file may come from a backend computing in another dtype
        for c in cache:
            c.keys, c.values = c.keys.astype(dtype), c.values.astype(dtype)
    tokens = json.loads(meta["tokens"])
    if any(c.offset != len(tokens) for c in cache) or max(tokens) >= model.args.vocab_size:
        raise MistralError(f"{path} is a damaged prompt cache: its K/V and its {len(tokens)} token ids disagree")
    if max_kv_size is not None:
        cache = [_as_rotating(c, max_kv_size) for c in cache]
    elif kv_bits is None:
        cache = adopt(model, cache)
    conversation = ConversationCache(model, kv_bits=kv_bits, kv_group_size=kv_group_size,
                                     max_kv_size=max_kv_size, cache=cache, tokens=tokens)
    return PromptCacheFile(conversation, meta["system"] or None, meta["document"] or None,
                           json.loads(meta["tools"]) if meta["tools"] else None, meta)


def _as_rotating(c: KVCache, max_kv_size: int) -> RotatingKVCache:
    """The same K/V as a bounded cache that has not wrapped yet."""
    n = c.offset
    if n >= max_kv_size:
        raise MistralError(f"the cached prefix ({n} tokens) does not fit in max_kv_size {max_kv_size}")
    return RotatingKVCache.from_state((c.keys[..., :n, :], c.values[..., :n, :], n, KEEP, max_kv_size, n))
