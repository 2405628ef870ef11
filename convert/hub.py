"""Hub ids: downloading only the files a conversion needs, and the converted-model cache."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from ..errors import MistralError, first_line

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# one layout only: the real repo holds the same 47 GB twice (consolidated and HF shards)
CONSOLIDATED_PATTERNS = ["params.json", "consolidated*.safetensors", "tekken.json"]
HF_PATTERNS = ["config.json", "model*.safetensors", "model.safetensors.index.json", "tekken.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "tokenizer.model", "generation_config.json"]


def is_hub_id(src: str | Path) -> bool:
    return not Path(src).expanduser().exists() and bool(HUB_ID.match(str(src)))


def repo_info(repo: str) -> tuple[list[str], list[str]]:
    """(file names, tags) of a hub model repo."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo)
    # the hub client raises transport errors of whichever HTTP library it bundles, plus its own
    # HTTP and offline-mode errors; all of them mean the same thing to the user here
    except Exception as e:  # noqa: BLE001
        raise MistralError(f"cannot reach the Hugging Face Hub for {repo}: {first_line(e)}") from e
    return [s.rfilename for s in info.siblings or []], list(info.tags or [])


def source_patterns(files: list[str]) -> list[str]:
    """What to download to convert a repo holding `files`: the consolidated layout when present."""
    if "params.json" in files and any(re.fullmatch(r"consolidated.*\.safetensors", f) for f in files):
        return CONSOLIDATED_PATTERNS
    if "config.json" in files and any(re.fullmatch(r"model.*\.safetensors", f) for f in files):
        return HF_PATTERNS
    raise MistralError("the repo holds neither a consolidated (params.json + consolidated.safetensors) "
                       "nor an HF (config.json + model*.safetensors) checkpoint")


def download(repo: str, patterns: list[str]) -> Path:
    """The files of `repo` matching `patterns`, fetched into the HF cache with progress bars."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001  (as in repo_info)
        raise MistralError(f"cannot download {repo}: {first_line(e)}") from e


def cached_snapshot(repo: str, patterns: list[str]) -> Optional[Path]:
    """The copy of `repo` already in the HF cache, if any (no network)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001  (as in repo_info: not cached, whatever the client raises)
        return None


def download_source(repo: str) -> Path:
    """The files of hub checkpoint `repo` a conversion needs, in one layout."""
    try:
        files, _ = repo_info(repo)
    except MistralError as e:
        raise MistralError(f"{e} ({repo} is not a local folder either)") from None
    try:
        patterns = source_patterns(files)
    except MistralError as e:
        raise MistralError(f"{repo}: {e}") from None
    return download(repo, patterns)


def cache_root() -> Path:
    """Where hub models converted on first use live (MLX_MISTRAL_CACHE overrides it)."""
    return Path(os.environ.get("MLX_MISTRAL_CACHE", Path.home() / ".cache" / "mlx-mistral")).expanduser() / "models"


def converted_path(repo: str, bits: int = 4) -> Path:
    return cache_root() / f"{repo.replace('/', '--')}-{bits}bit"
