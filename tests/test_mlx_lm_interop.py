"""Every folder we write gives mlx-lm the same math as us, whatever config style the source used.

transformers 5 saves rope_theta only inside rope_parameters, and may omit keys whose default
differs between libraries (mlx-lm ties the embeddings unless told otherwise). mlx-lm reads only
top-level keys, so a folder that did not spell them out would load there silently with RoPE
base 10000 and different logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_mistral.convert.pipeline import convert
from mlx_mistral.load import load_model


def transformers5_style(src: Path, dst: Path, drop: tuple[str, ...]) -> Path:
    """A copy of checkpoint `src` whose config.json keeps RoPE only in rope_parameters."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    theta = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]
    for key in drop:
        config.pop(key, None)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def logits_both(folder: Path, tokens: list[int]) -> tuple[mx.array, mx.array]:
    """(ours, mlx-lm's) float32 logits of `tokens` from the same folder."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    theirs, _ = mlx_lm_load_model(folder)
    theirs.set_dtype(mx.float32)
    ours = load_model(folder, dtype=mx.float32)
    x = mx.array(tokens)[None]
    return ours(x)[0].astype(mx.float32), theirs(x)[0].astype(mx.float32)


def relative_gap(a: mx.array, b: mx.array) -> float:
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


def check_folder(src: Path, tmp_path: Path, tokens: list[int], tol: float, drop=("rope_theta",)) -> float:
    out = convert(transformers5_style(src, tmp_path / "src", drop), tmp_path / "out", quantize=False,
                  dtype="float32").out
    config = json.loads((out / "config.json").read_text())
    source = json.loads((tmp_path / "src" / "config.json").read_text())
    assert config["rope_theta"] == source["rope_parameters"]["rope_theta"]
    assert "tie_word_embeddings" in config
    ours, theirs = logits_both(out, tokens)
    gap = relative_gap(ours, theirs)
    assert gap < tol, gap
    # the test can fail: the same folder without the top-level keys gives mlx-lm other logits
    config.pop("rope_theta")
    (out / "config.json").write_text(json.dumps(config))
    _, drifted = logits_both(out, tokens)
    assert relative_gap(ours, drifted) > 10 * tol
    return gap


def test_tiny_folder_from_a_transformers5_config_matches_mlx_lm(tiny_dir, tmp_path):
    # tie_word_embeddings left out too: our default (and HF's for Mistral) is untied, mlx-lm's tied
    check_folder(tiny_dir, tmp_path, list(range(1, 40, 3)) + [500, 4000, 8000], tol=1e-4,
                 drop=("rope_theta", "tie_word_embeddings"))


@pytest.mark.slow
def test_smollm2_real_weights_match_mlx_lm_in_float32(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm2_dir)("The lighthouse keeper counted the ships that passed "
                                                    "the rocks each night, and wrote their names in a book.")["input_ids"]
    check_folder(smollm2_dir, tmp_path, ids, tol=1e-4)
