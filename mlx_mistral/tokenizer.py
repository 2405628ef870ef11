"""Tekken V7 tokenization through mistral-common, and streaming detokenization.

mistral-common is the source of truth for the chat format: `encode_chat` hands OpenAI-style
messages to `ChatCompletionRequest.from_openai` and returns exactly the ids it produces.
Folders without `tekken.json` (Llama-architecture checkpoints such as SmolLM2) fall back to the
folder's Hugging Face tokenizer so the same runtime can serve them.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Optional, Sequence

from .errors import MistralError


class StreamingDetokenizer:
    """Turns token ids into text pieces, never splitting a UTF-8 sequence.

    Tekken tokens are byte strings: a French accent, a CJK character or an emoji may span
    several tokens. An incremental UTF-8 decoder holds back an incomplete sequence until the
    bytes that finish it arrive.
    """

    def __init__(self, byte_piece):
        self._byte_piece = byte_piece
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add_token(self, token: int) -> str:
        return self._decoder.decode(self._byte_piece(token))

    def finalize(self) -> str:
        return self._decoder.decode(b"", final=True)


class _TextDiffDetokenizer:
    """For tokenizers without byte pieces: decode the tail and emit what became stable."""

    def __init__(self, decode):
        self._decode = decode
        self._tokens: list[int] = []
        self._emitted = 0  # characters of decode(self._tokens) already returned

    def add_token(self, token: int) -> str:
        self._tokens.append(token)
        text = self._decode(self._tokens)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character
            return ""
        piece, self._emitted = text[self._emitted :], len(text)
        return piece

    def finalize(self) -> str:
        text = self._decode(self._tokens)
        return text[self._emitted :]


class Tokenizer:
    """Tekken V7 tokenizer of Mistral Small 3."""

    def __init__(self, mistral_tokenizer):
        from mistral_common.tokens.tokenizers.tekken import SpecialTokenPolicy

        self.mistral = mistral_tokenizer  # MistralTokenizer: request encoding, validation
        self.tekken = mistral_tokenizer.instruct_tokenizer.tokenizer  # the raw Tekkenizer
        self._ignore = SpecialTokenPolicy.IGNORE
        self.bos_id = self.tekken.bos_id
        self.eos_token_ids = {self.tekken.eos_id}
        self.vocab_size = self.tekken.n_words

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        try:
            return cls(MistralTokenizer.from_file(str(path)))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # a damaged or foreign file
            raise MistralError(f"cannot read tokenizer {path}: {_first_line(e)}") from e

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        return self.tekken.encode(text, bos=bos, eos=eos)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tekken.decode(list(tokens), special_token_policy=self._ignore)

    def encode_chat(self, messages: list[dict], tools: Optional[list[dict]] = None) -> list[int]:
        """OpenAI-style messages (and tool definitions) -> ids, exactly as mistral-common."""
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest
        from pydantic import ValidationError

        try:
            request = ChatCompletionRequest.from_openai(messages=messages, tools=tools)
            return self.mistral.encode_chat_completion(request).tokens
        except (MistralCommonException, ValidationError, ValueError, TypeError, KeyError) as e:
            raise MistralError(f"invalid chat request: {_first_line(e)}") from e

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(lambda t: self.tekken.id_to_byte_piece(t, self._ignore))


class HFTokenizer:
    """A folder's Hugging Face tokenizer behind the same interface (non-Mistral checkpoints)."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.mistral = None
        self.bos_id = hf_tokenizer.bos_token_id
        self.eos_token_ids = {hf_tokenizer.eos_token_id} - {None}
        self.vocab_size = len(hf_tokenizer)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "HFTokenizer":
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(str(folder)))
        except (OSError, ValueError) as e:
            raise MistralError(f"cannot read tokenizer in {folder}: {_first_line(e)}") from e

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False)
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_token_ids:
            ids = ids + [min(self.eos_token_ids)]
        return ids

    def decode(self, tokens: Sequence[int]) -> str:
        return self.hf.decode(list(tokens), skip_special_tokens=True)

    def encode_chat(self, messages: list[dict], tools: Optional[list[dict]] = None) -> list[int]:
        try:
            ids = self.hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
        except (ValueError, TypeError, KeyError) as e:
            raise MistralError(f"invalid chat request: {_first_line(e)}") from e
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def detokenizer(self) -> _TextDiffDetokenizer:
        return _TextDiffDetokenizer(self.decode)


def load_tokenizer(folder: str | Path):
    """`tekken.json` if the folder has one, else the folder's HF tokenizer files."""
    folder = Path(folder)
    if (folder / "tekken.json").exists():
        return Tokenizer.from_file(folder / "tekken.json")
    if (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
        return HFTokenizer.from_folder(folder)
    raise MistralError(f"{folder} has no tekken.json (nor HF tokenizer files)")


def check_tokenizer(tokenizer, vocab_size: int, where: str | Path) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding table.

    A Tekken file must match vocab_size exactly (Mistral ships them cut to the model's size); an
    HF tokenizer may be smaller than a padded table, never larger."""
    n = tokenizer.vocab_size
    if (n != vocab_size) if tokenizer.mistral is not None else (n > vocab_size):
        raise MistralError(f"the tokenizer in {where} has {n} tokens but config.json's vocab_size is {vocab_size}: "
                           "they belong to different models")


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split("\n")[:3])[:300]
