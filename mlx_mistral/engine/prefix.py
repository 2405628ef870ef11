"""Conversations kept between requests, so a follow-up turn computes only its new ids.

Each kept conversation is a `ConversationCache` (its K/V and the ids they hold). A new request
takes the one sharing the longest prefix with its prompt (trimmed to that prefix); a request
sharing nothing starts a fresh cache, so an unrelated request never evicts a conversation it
could not use. Requests that arrive together often share a long start (one system prompt, one
tool list) while the kept conversation can go to only one of them: the others copy that start
from whichever running reply's cache holds it, rather than computing it again. When a reply
ends, its conversation goes back to the pool as the most recent; past `capacity` the least
recently used is dropped.
"""

from __future__ import annotations

import copy
from typing import Sequence

import mlx.core as mx
from mlx.utils import tree_map

from ..cache import ConversationCache, KVSettings, can_trim_prompt_cache, common_prefix_length, trim_prompt_cache


MIN_SHARED = 16  # ids of a running reply's prompt worth copying (a chat template's system prompt)


class PrefixPool:
    def __init__(self, model, capacity: int):
        self.model = model
        self.capacity = capacity
        self.kept: list[ConversationCache] = []  # least recently used first
        self.lent: list[ConversationCache] = []  # in use by running sequences
        self.prompts: dict[int, list[int]] = {}  # id(lent conversation) -> the prompt it runs

    def take(self, ids: Sequence[int], settings: KVSettings) -> ConversationCache:
        """The kept conversation with the longest common prefix with `ids`; or, when a running
        reply's cache already holds a longer one (requests that arrive together with one system
        prompt), a copy of that prefix; else a fresh one."""
        best, best_n = None, 0
        for conversation in self.kept:
            if conversation.settings != settings:
                continue
            n = common_prefix_length(conversation.tokens, ids)
            if n > best_n:
                best, best_n = conversation, n
        running, running_n = self._running_prefix(ids, settings)
        if running is not None and running_n >= MIN_SHARED and running_n > best_n:
            best = self._copy(running, ids[:running_n])
        elif best is not None:
            self.kept.remove(best)
        else:
            best = ConversationCache(self.model, kv_bits=settings.kv_bits, kv_group_size=settings.kv_group_size,
                                     max_kv_size=settings.max_kv_size)
        self.lent.append(best)
        self.prompts[id(best)] = list(ids)
        return best

    def _running_prefix(self, ids: Sequence[int], settings: KVSettings):
        """The running conversation whose cache holds the longest prefix of `ids` now: its
        prompt's first `offset` ids (a reply's cache holds its prompt before anything else)."""
        best, best_n = None, 0
        for conversation in self.lent:
            if conversation.settings != settings or not can_trim_prompt_cache(conversation.cache):
                continue
            held = conversation.cache[0].offset
            n = min(common_prefix_length(self.prompts[id(conversation)], ids), held, len(ids) - 1)
            if n > best_n:
                best, best_n = conversation, n
        return best, best_n

    def _copy(self, source: ConversationCache, prefix: Sequence[int]) -> ConversationCache:
        cache = fork(source.cache)
        trim_prompt_cache(cache, cache[0].offset - len(prefix))
        s = source.settings
        return ConversationCache(self.model, kv_bits=s.kv_bits, kv_group_size=s.kv_group_size,
                                 max_kv_size=s.max_kv_size, cache=cache, tokens=prefix)

    def give(self, conversation: ConversationCache) -> None:
        """A reply ended: keep its conversation for the next turn (if the pool keeps any)."""
        self.lent.remove(conversation)
        self.prompts.pop(id(conversation), None)
        if self.capacity <= 0 or not len(conversation):
            return
        self.kept.append(conversation)
        while len(self.kept) > self.capacity:
            self.kept.pop(0)

    def reset(self) -> None:
        self.kept.clear()
        self.lent.clear()
        self.prompts.clear()


def fork(cache: list) -> list:
    """A copy of one sequence's per-layer caches that grows on its own (n > 1 replies to one
    prompt share its prefill). The copies are new arrays: a later write to either side, in place
    by the native decoder or through MLX, cannot reach the other."""
    out = []
    for layer in cache:
        twin = copy.copy(layer)
        twin.state = tree_map(lambda a: mx.array(a) if isinstance(a, mx.array) else a, layer.state)
        mx.eval(twin.state)
        out.append(twin)
    return out
