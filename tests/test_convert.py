"""The converter: both layouts give the same model, quantized output matches mlx-lm's, real-weight
quality of 4-bit and mixed conversions, streaming memory, hub ids and the model cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_mistral.convert import pipeline
from mlx_mistral.convert.pipeline import convert
from mlx_mistral.convert.source import CONSOLIDATED_TO_HF, to_half_split, to_interleaved
from mlx_mistral.load import load_model

# Public-domain English (Jane Austen, Pride and Prejudice, 1813, chapter 1) for quality checks.
TEXT = """It is a truth universally acknowledged, that a single man in possession of a good fortune,
must be in want of a wife. However little known the feelings or views of such a man may be on his
first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding
families, that he is considered the rightful property of some one or other of their daughters.
"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let
at last?" Mr. Bennet replied that he had not. "But it is," returned she; "for Mrs. Long has just
been here, and she told me all about it." Mr. Bennet made no answer. "Do you not want to know who
has taken it?" cried his wife impatiently. "You want to tell me, and I have no objection to
hearing it." This was invitation enough. "Why, my dear, you must know, Mrs. Long says that
Netherfield is taken by a young man of large fortune from the north of England; that he came down
on Monday in a chaise and four to see the place, and was so much delighted with it, that he agreed
with Mr. Morris immediately; that he is to take possession before Michaelmas, and some of his
servants are to be in the house by the end of next week." "What is his name?" "Bingley." "Is he
married or single?" "Oh! Single, my dear, to be sure! A single man of large fortune; four or five
thousand a year. What a fine thing for our girls!" "How so? How can it affect them?" "My dear
Mr. Bennet," replied his wife, "how can you be so tiresome! You must know that I am thinking of
his marrying one of them." "Is that his design in settling here?" "Design! Nonsense, how can you
talk so! But it is very likely that he may fall in love with one of them, and therefore you must
visit him as soon as he comes." """


def logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def make_consolidated(hf_dir: Path, out: Path) -> Path:
    """Mistral's consolidated layout of an HF checkpoint: names mapped back, q/k rows permuted
    back to interleaved RoPE order, params.json instead of config.json."""
    config = json.loads((hf_dir / "config.json").read_text())
    hf_to_cons = {}
    for src, dst in CONSOLIDATED_TO_HF.items():
        for i in range(config["num_hidden_layers"]):
            hf_to_cons[dst.replace("{i}", str(i))] = src.replace("{i}", str(i))
    weights = {}
    for f in sorted(hf_dir.glob("model*.safetensors")):
        for name, w in mx.load(str(f)).items():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                w = to_interleaved(w, config["head_dim"])
            weights[hf_to_cons[name]] = w
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "consolidated.safetensors"), weights)
    params = {"dim": config["hidden_size"], "n_layers": config["num_hidden_layers"], "head_dim": config["head_dim"],
              "hidden_dim": config["intermediate_size"], "n_heads": config["num_attention_heads"],
              "n_kv_heads": config["num_key_value_heads"], "norm_eps": config["rms_norm_eps"],
              "vocab_size": config["vocab_size"], "rope_theta": config["rope_theta"]}
    (out / "params.json").write_text(json.dumps(params))
    (out / "tekken.json").write_bytes((hf_dir / "tekken.json").read_bytes())
    return out


@pytest.fixture(scope="module")
def consolidated_dir(tiny_dir, tmp_path_factory) -> Path:
    return make_consolidated(tiny_dir, tmp_path_factory.mktemp("cons") / "tiny-consolidated")


def test_permutation_turns_interleaved_rope_into_half_split_rope():
    """Attention scores with Mistral's interleaved RoPE on consolidated rows equal those with
    half-split RoPE on the permuted rows: the permutation goes the right way."""
    heads, hd, dim, T = 2, 16, 32, 5
    x = mx.random.normal((1, T, dim), key=mx.random.key(1))
    wq, wk = (mx.random.normal((heads * hd, dim), key=mx.random.key(s)) for s in (2, 3))

    def scores(wq, wk, traditional):
        q = (x @ wq.T).reshape(1, T, heads, hd).transpose(0, 2, 1, 3)  # (1, heads, T, hd)
        k = (x @ wk.T).reshape(1, T, heads, hd).transpose(0, 2, 1, 3)
        q = mx.fast.rope(q, hd, traditional=traditional, base=1e8, scale=1.0, offset=0)
        k = mx.fast.rope(k, hd, traditional=traditional, base=1e8, scale=1.0, offset=0)
        return np.array(q @ k.transpose(0, 1, 3, 2))

    ref = scores(wq, wk, traditional=True)
    ours = scores(to_half_split(wq, hd), to_half_split(wk, hd), traditional=False)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    assert not np.allclose(scores(wq, wk, traditional=False), ref, atol=1e-2)  # it does matter
    assert mx.array_equal(to_interleaved(to_half_split(wq, hd), hd), wq).item()


def test_hf_and_consolidated_give_the_same_logits_as_transformers(tiny_dir, consolidated_dir, tmp_path, monkeypatch):
    import torch
    from mlx_lm.utils import load_model as mlx_lm_load_model
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(pipeline, "BLOCK_BYTES", 64 * 1024)  # many row blocks, q/k split by heads
    a = convert(tiny_dir, tmp_path / "from-hf", quantize=False, dtype="float32")
    b = convert(consolidated_dir, tmp_path / "from-cons", quantize=False, dtype="float32")
    assert (a.source.layout, b.source.layout) == ("hf", "consolidated")
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 8192, 40)]
    la, lb = logits(load_model(a.out), ids), logits(load_model(b.out), ids)
    np.testing.assert_array_equal(la, lb)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(la - ref).max() < 1e-4, np.abs(la - ref).max()
    lm, _ = mlx_lm_load_model(b.out)
    assert np.abs(logits(lm, ids) - la).max() < 1e-5


@pytest.mark.usefixtures("float_activations")  # float tolerances: int8 activations (the x86 default) are bounded elsewhere
def test_quantized_output_is_bit_identical_to_mlx_lm_convert(tiny_dir, tmp_path):
    """4-bit g64 of a bf16 checkpoint: the same tensors mlx-lm writes, and both loaders agree."""
    from mlx_lm import convert as mlx_lm_convert
    from mlx_lm.utils import load_model as mlx_lm_load_model

    ours = convert(tiny_dir, tmp_path / "ours", bits=4, group_size=64).out
    mlx_lm_convert(str(tiny_dir), mlx_path=str(tmp_path / "mlx-lm"), quantize=True, q_group_size=64, q_bits=4)
    a = {k: v for f in ours.glob("model*.safetensors") for k, v in mx.load(str(f)).items()}
    b = mx.load(str(tmp_path / "mlx-lm" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item(), k
    ids = [1, 5, 900, 3000, 42, 77, 1200]
    lm, _ = mlx_lm_load_model(ours)
    lm.set_dtype(mx.float32)  # ours computes in float32 on the CPU
    # our loader may route the matmuls through the native CPU kernels: same math, other summation order
    a, b = logits(load_model(ours), ids), logits(lm, ids)
    np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)
    assert (a.argmax(-1) == b.argmax(-1)).all()


@pytest.mark.usefixtures("float_activations")  # float tolerances: int8 activations (the x86 default) are bounded elsewhere
def test_mixed_recipe_writes_per_layer_overrides_both_loaders_honour(tiny_dir, tmp_path):
    import mlx_lm

    out = convert(tiny_dir, tmp_path / "mixed", bits=4, group_size=32, recipe="mixed").out
    q = json.loads((out / "config.json").read_text())["quantization"]
    high = {"group_size": 32, "bits": 6, "mode": "affine"}
    # 2 layers: layer 1 is in the last eighth, layer 0 is not sensitive
    assert q["model.embed_tokens"] == q["lm_head"] == high
    assert q["model.layers.1.self_attn.v_proj"] == q["model.layers.1.mlp.down_proj"] == high
    assert "model.layers.0.mlp.down_proj" not in q and q["bits"] == 4
    ours = load_model(out)
    lm, _ = mlx_lm.load(str(out))  # with its tokenizer, from tekken.json
    for model in (ours, lm):
        assert model.model.embed_tokens.bits == 6 and model.lm_head.bits == 6
        assert model.model.layers[1].mlp.down_proj.bits == 6 and model.model.layers[0].mlp.down_proj.bits == 4
    lm.set_dtype(mx.float32)
    ids = [1, 5, 900, 3000, 42]
    a, b = logits(ours, ids), logits(lm, ids)  # native CPU kernels on our side: summation order differs
    np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)


def test_small_shards_split_the_weights_and_load_the_same(tiny_dir, tmp_path):
    one = convert(tiny_dir, tmp_path / "one", bits=4)
    many = convert(tiny_dir, tmp_path / "many", bits=4, shard_bytes=1024**2)
    assert one.shards == 1 and many.shards >= 3
    index = json.loads((many.out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in many.out.glob("model-*.safetensors")}
    ids = [3, 9, 27, 81, 243]
    np.testing.assert_array_equal(logits(load_model(one.out), ids), logits(load_model(many.out), ids))


def _kl_and_top1(ref: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    """Mean KL(ref || q) of the next-token distributions, and how often their top-1 agree."""
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(q)
    kl = (np.exp(lp) * (lp - lq)).sum(-1).mean()
    return float(kl), float((ref.argmax(-1) == q.argmax(-1)).mean())


RSS_SCRIPT = """
import resource, sys
import mlx_mistral
from mlx_mistral.convert.pipeline import convert

def peak_rss():
    # Linux: the high-water mark of this program alone (ru_maxrss also counts the RSS the
    # parent had when it forked us); macOS: ru_maxrss, in bytes there
    if sys.platform == "darwin":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024

base = peak_rss()
convert(sys.argv[1], sys.argv[2], bits=4, group_size=64)
print(base, peak_rss())
"""


@pytest.fixture(scope="module")
def smollm2_q4(smollm2_dir, tmp_path_factory):
    """SmolLM2 converted to 4-bit g64 in a subprocess: (folder, RSS after imports, peak RSS)."""
    out = tmp_path_factory.mktemp("smollm2") / "q4"
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(smollm2_dir), str(out)],
                          capture_output=True, text=True, check=True)
    base, peak = map(int, proc.stdout.split())
    return out, base, peak


def test_converting_streams_with_memory_well_below_the_checkpoint(smollm2_dir, smollm2_q4):
    ckpt_bytes = (smollm2_dir / "model.safetensors").stat().st_size  # 538 MB, fp32
    _, base, peak = smollm2_q4
    print(f"\nconvert SmolLM2 ({ckpt_bytes / 1e6:.0f} MB fp32) to 4-bit: peak RSS {peak / 1e6:.0f} MB, "
          f"{(peak - base) / 1e6:.0f} MB above the {base / 1e6:.0f} MB the imports take")
    # a few 32 MB row blocks at a time, whatever the checkpoint's size: ~0.37x this checkpoint,
    # ~0.004x the 47 GB release
    assert peak - base < 6 * pipeline.BLOCK_BYTES < 0.4 * ckpt_bytes


@pytest.mark.slow
def test_smollm2_4bit_and_mixed_quality_on_real_text(smollm2_dir, smollm2, smollm2_q4, tmp_path):
    """Real weights against full precision over every position of a real-text passage.

    These weights come from a Q4_1 GGUF (4-bit, groups of 32, min-max grid): MLX's affine grid
    keeps zero exact, so it cannot land on the old grid and 4-bit re-quantization costs more
    here than on the bf16 release; 8-bit shows the converter itself adds nothing.
    """
    from mlx_lm.utils import dequantize_model
    from transformers import AutoTokenizer

    folders = {"4-bit g64": smollm2_q4[0],
               "mixed 4/6 g64": convert(smollm2_dir, tmp_path / "mixed", recipe="mixed").out,
               "8-bit g64": convert(smollm2_dir, tmp_path / "q8", bits=8).out}
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(TEXT)["input_ids"]
    assert len(ids) >= 300
    ref = logits(smollm2[0], ids)
    results = {}
    for name, folder in folders.items():
        model = load_model(folder, fuse=False)  # inspects the per-layer quantization
        assert isinstance(model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
        # the same weights as dense float32 layers: identical math, and BLAS-fast on this CPU
        dequantize_model(model)
        model.set_dtype(mx.float32)
        results[name] = _kl_and_top1(ref, logits(model, ids))
        print(f"{name}: top-1 agreement {results[name][1]:.3f}, mean KL {results[name][0]:.4f} "
              f"over {len(ids)} positions")
    assert results["8-bit g64"][1] >= 0.9 and results["8-bit g64"][0] < 0.02
    assert results["4-bit g64"][1] >= 0.5 and results["4-bit g64"][0] < 0.7
    assert results["mixed 4/6 g64"][0] < results["4-bit g64"][0]  # more bits where it matters helps


def test_hub_patterns_for_the_real_repo_pick_one_layout():
    from mlx_mistral.convert.hub import CONSOLIDATED_PATTERNS, source_patterns

    files = ["config.json", "generation_config.json", "params.json", "consolidated.safetensors", "tekken.json",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "SYSTEM_PROMPT.txt",
             *[f"model-{i:05d}-of-00010.safetensors" for i in range(1, 11)]]
    assert source_patterns(files) == CONSOLIDATED_PATTERNS
    assert not any(p.startswith("model") for p in CONSOLIDATED_PATTERNS)
    assert "model*.safetensors" in source_patterns([f for f in files if not f.startswith(("params", "consolidated"))])


def test_resolve_converts_a_hub_checkpoint_once_and_reuses_it(consolidated_dir, tmp_path, monkeypatch):
    from mlx_mistral.convert import hub
    from mlx_mistral.load import resolve

    monkeypatch.setenv("MLX_MISTRAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "repo_info", lambda repo: (["params.json", "consolidated.safetensors", "tekken.json"], []))
    downloads = []
    monkeypatch.setattr(hub, "download", lambda repo, patterns: downloads.append(patterns) or consolidated_dir)
    folder = resolve("mistralai/Tiny-Instruct")
    assert folder == tmp_path / "cache" / "models" / "mistralai--Tiny-Instruct-4bit"
    assert downloads == [hub.CONSOLIDATED_PATTERNS]
    assert json.loads((folder / "config.json").read_text())["quantization"]["bits"] == 4

    def offline(repo):
        raise AssertionError("the cached conversion must not touch the network")

    monkeypatch.setattr(hub, "repo_info", offline)
    assert resolve("mistralai/Tiny-Instruct") == folder
    assert load_model(folder, fuse=False).model.layers[0].self_attn.q_proj.bits == 4
