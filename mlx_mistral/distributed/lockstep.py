"""The engine in lockstep on every rank of a sharded model.

Every rank runs the same `Engine` over its shard; each forward pass's all_sums need every rank
to run the same steps over the same sequences. Rank 0 alone takes requests (the terminal, the
HTTP socket, the Python API): at the start of each step it broadcasts what arrived and what was
cancelled since the last one, and every rank applies exactly that before stepping. Everything
else an engine decides (admission, prefill chunks, batching, retirement) follows from the same
inputs, so it comes out the same. The sampled ids are rank 0's, summed into every rank
(`_agree`), so temperature sampling and its random state live on rank 0 alone.

Rank 0's streams keep the caller's cancellation apart (`asked`) from the flag the engine reads
(`cancelled`), which only the step's broadcast sets: a server thread cancelling mid-step cannot
make rank 0 drop a sequence the other ranks still step.
"""

from __future__ import annotations

import dataclasses
import itertools
import signal
from collections import OrderedDict
from typing import Optional

import mlx.core as mx

from ..cache import ConversationCache
from ..engine import Engine, Request, Speculation
from ..engine.sequence import Stream
from ..errors import MistralError
from .group import broadcast

KEPT_ENGINES = 4  # followers keep the latest few engines (one per API call, one per server)
KEPT_CONVERSATIONS = 8  # and the copies of the conversations rank 0 passed most recently
# conversations outlive engines (the chat REPL makes an engine per turn): one registry per process
CONVERSATIONS: OrderedDict[int, ConversationCache] = OrderedDict()
_engine_ids = itertools.count()
_conversation_ids = itertools.count()


class LockstepStream(Stream):
    """A stream whose engine-visible cancellation arrives with a step's broadcast."""

    def __init__(self, request: Request):
        super().__init__(request)
        self.asked = False

    def cancel(self) -> None:
        self.asked = True


class LockstepEngine(Engine):
    """An Engine whose steps rank 0 leads and the other ranks follow."""

    def __init__(self, model, tokenizer, *, eid: Optional[int] = None, **options):
        super().__init__(model, tokenizer, **options)
        self.group = model.group
        self.leader = self.group.rank() == 0
        self.inbox: list[tuple[LockstepStream, Optional[ConversationCache]]] = []
        self.streams: dict[int, LockstepStream] = {}  # the same ids on every rank
        self._ids = itertools.count()
        if self.leader:
            eid = next(_engine_ids)
            broadcast(("engine", eid, options), self.group)
        self.eid = eid

    def submit(self, request: Request, cache: Optional[ConversationCache] = None) -> Stream:
        if not self.leader:
            raise MistralError("only rank 0 takes requests on a sharded model")
        if request.logits_processors:
            raise MistralError("custom logits processors run in one process: a sharded model cannot take them")
        if request.speculation.mode not in (None, "none") or request.speculation.draft_model is not None:
            raise MistralError("speculative decoding does not run on a sharded model")
        if cache is not None and not isinstance(cache, ConversationCache):
            raise MistralError("a sharded model's engine takes a ConversationCache, not a list of caches")
        if cache is not None and cache.tokens and all(c is not cache for c in CONVERSATIONS.values()):
            # the other ranks would start from an empty copy: a cache file holds one rank's KV
            raise MistralError("a prompt cache made outside this engine cannot be used on a sharded model")
        request = dataclasses.replace(request, speculation=Speculation("none"))
        self.check(request, cache)
        stream = LockstepStream(request)
        with self.wake:
            self.inbox.append((stream, cache))
            self.wake.notify()
        return stream

    @property
    def busy(self) -> bool:
        return super().busy or bool(self.inbox)

    def step(self) -> None:
        if self.leader:
            self._lead()
        super().step()
        for sid, stream in list(self.streams.items()):
            if not self.leader:
                stream.events.clear()  # nobody reads a follower's text
            if stream.done:
                del self.streams[sid]

    def _lead(self) -> None:
        """Broadcast the requests and cancellations since the last step, then apply them."""
        with self.lock:
            arrived, self.inbox = self.inbox, []
        news = []
        for stream, cache in arrived:
            sid = next(self._ids)
            self.streams[sid] = stream
            news.append((sid, stream.request, self._conversation_ref(cache)))
        cancels = [sid for sid, s in self.streams.items() if s.asked and not s.cancelled]
        broadcast(("step", self.eid, news, cancels), self.group)
        self.apply(news, cancels)

    def _conversation_ref(self, cache: Optional[ConversationCache]):
        """How the followers find their copy of rank 0's conversation: (id, KV settings, the ids
        it holds now; a caller may have reset it, as the chat REPL's /reset does)."""
        if cache is None:
            return None
        cid = next((c for c, known in CONVERSATIONS.items() if known is cache), None)
        if cid is None:
            cid = next(_conversation_ids)
            CONVERSATIONS[cid] = cache
        return cid, cache.settings, tuple(cache.tokens)

    def apply(self, news: list, cancels: list[int]) -> None:
        """Queue the broadcast requests and mark the broadcast cancellations (every rank)."""
        for sid, request, ref in news:
            stream = self.streams.setdefault(sid, LockstepStream(request))
            cache = None
            if ref is not None:
                cid, settings, held = ref
                if cid not in CONVERSATIONS:
                    CONVERSATIONS[cid] = ConversationCache(self.model, kv_bits=settings.kv_bits,
                                                                kv_group_size=settings.kv_group_size,
                                                                max_kv_size=settings.max_kv_size)
                cache = CONVERSATIONS[cid]
                CONVERSATIONS.move_to_end(cid)
                while not self.leader and len(CONVERSATIONS) > KEPT_CONVERSATIONS:
                    CONVERSATIONS.popitem(last=False)
                if not self.leader:  # trim this copy to what rank 0's holds (-1: no id, keeps all)
                    cache.reuse(list(held) + [-1])
            with self.lock:
                self.waiting.append((stream, cache))
        for sid in cancels:
            if sid in self.streams:
                self.streams[sid].cancelled = True

    def _agree(self, tokens: mx.array) -> mx.array:
        # on the step's own stream, after this rank's forward: collectives on two streams could
        # pair one rank's token sum with another's layer sum
        mine = tokens if self.leader else tokens * 0
        return mx.distributed.all_sum(mine, group=self.group)


def engine_for(model, tokenizer, **options) -> Engine:
    """The engine for `model`: in lockstep across the ranks when it is sharded."""
    if getattr(model, "group", None) is None:  # also models other than ours (mlx-lm style)
        return Engine(model, tokenizer, **options)
    return LockstepEngine(model, tokenizer, **options)


def follow(model, tokenizer, group) -> None:
    """A follower's life: make the engines rank 0 makes, step when it steps, until it exits."""
    # a signal could stop a follower between two collectives of a step and leave rank 0 waiting
    # forever; rank 0 handles Ctrl-C and SIGTERM (the server drains) and then releases everyone
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    engines: OrderedDict[int, LockstepEngine] = OrderedDict()
    while True:
        message = broadcast(None, group)
        if message[0] == "exit":
            return
        if message[0] == "engine":
            _, eid, options = message
            engines[eid] = LockstepEngine(model, tokenizer, eid=eid, **options)
            while len(engines) > KEPT_ENGINES:
                engines.popitem(last=False)
        elif message[0] == "step":
            _, eid, news, cancels = message
            engine = engines[eid]
            engine.apply(news, cancels)
            engine.step()

