"""Reading a llama.cpp GGUF file of a Gemma 3 model: weights into gemma_kit's canonical parameter
tree, vocabulary into a SentencePiece model.

What llama.cpp changes when it writes a Gemma GGUF, and this module undoes:
  * every RMSNorm weight (the q/k norms too) is stored as 1 + scale, while gemma_kit keeps the
    official zero-centred scale;
  * matrices are stored as (out, in) Linear weights rather than the official einsum layouts; Q and K
    rows are NOT permuted (llama.cpp runs Gemma with NEOX-style RoPE, the layout HF uses);
  * the vocabulary keeps its 30 runs of spaces as raw spaces and marks <start_of_turn> and
    <end_of_turn> as CONTROL tokens, which SentencePiece would never parse from text.
The file carries no local RoPE base, local/global layer pattern or query scale: those come from
the preset whose shapes the file matches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

try:
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
except ImportError as e:  # both come with the optional extra, not with gemma_kit itself
    raise ImportError(
        f"Reading GGUF files needs the gguf and protobuf packages ({e.name} is missing): "
        "pip install 'gemma-kit[default-model]'"
    ) from e

from gemma_kit.config import PRESETS, Config
from gemma_kit.errors import CheckpointNotFoundError, ConversionError

SUPPORTED_ARCHITECTURES = ("gemma3",)
_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))
_HINT = (
    "pass a .gguf file written by llama.cpp's convert_hf_to_gguf.py, e.g. the packaged Gemma 3 "
    "270M from gemma_kit.paths.default_gguf_path()"
)


def _same(w: np.ndarray, c: Config) -> np.ndarray:
    return w


def _norm(w: np.ndarray, c: Config) -> np.ndarray:
    return w - np.float32(1.0)


def _heads_in(w: np.ndarray, c: Config) -> np.ndarray:
    # (heads * H, D) -> (heads, D, H): q_einsum and each half of kv_einsum.
    return w.reshape(-1, c.head_dim, c.embed_dim).transpose(0, 2, 1)


def _heads_out(w: np.ndarray, c: Config) -> np.ndarray:
    # (D, N * H) -> (N, H, D)
    return w.reshape(c.embed_dim, c.num_heads, c.head_dim).transpose(1, 2, 0)


def _transpose(w: np.ndarray, c: Config) -> np.ndarray:
    return w.T


Transform = Callable[[np.ndarray, Config], np.ndarray]

# GGUF tensor name -> (canonical path, slot in a stacked parameter or None, transform).
_TOP_LEVEL: dict[str, tuple[tuple[str, ...], int | None, Transform]] = {
    "token_embd.weight": (("embedder", "input_embedding"), None, _same),
    "output_norm.weight": (("final_norm", "scale"), None, _norm),
}
# The same for the tensors of block i, named "blk.{i}.<key>", placed under "layer_{i}".
_PER_LAYER: dict[str, tuple[tuple[str, ...], int | None, Transform]] = {
    "attn_norm.weight": (("pre_attention_norm", "scale"), None, _norm),
    "post_attention_norm.weight": (("post_attention_norm", "scale"), None, _norm),
    "ffn_norm.weight": (("pre_ffw_norm", "scale"), None, _norm),
    "post_ffw_norm.weight": (("post_ffw_norm", "scale"), None, _norm),
    "attn_q_norm.weight": (("attn", "_query_norm", "scale"), None, _norm),
    "attn_k_norm.weight": (("attn", "_key_norm", "scale"), None, _norm),
    "attn_q.weight": (("attn", "q_einsum", "w"), None, _heads_in),
    "attn_k.weight": (("attn", "kv_einsum", "w"), 0, _heads_in),
    "attn_v.weight": (("attn", "kv_einsum", "w"), 1, _heads_in),
    "attn_output.weight": (("attn", "attn_vec_einsum", "w"), None, _heads_out),
    "ffn_gate.weight": (("mlp", "gating_einsum", "w"), 0, _same),
    "ffn_up.weight": (("mlp", "gating_einsum", "w"), 1, _same),
    "ffn_down.weight": (("mlp", "linear", "w"), None, _transpose),
}


def canonical_shapes(c: Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Path -> shape of every parameter of a Gemma 3 text model with separate q and kv einsums."""
    V, D, F = c.vocab_size, c.embed_dim, c.hidden_dim
    N, K, H = c.num_heads, c.num_kv_heads, c.head_dim
    shapes = {("embedder", "input_embedding"): (V, D), ("final_norm", "scale"): (D,)}
    per_layer = {
        ("pre_attention_norm", "scale"): (D,),
        ("post_attention_norm", "scale"): (D,),
        ("pre_ffw_norm", "scale"): (D,),
        ("post_ffw_norm", "scale"): (D,),
        ("attn", "q_einsum", "w"): (N, D, H),
        ("attn", "kv_einsum", "w"): (2, K, D, H),
        ("attn", "attn_vec_einsum", "w"): (N, H, D),
        ("attn", "_query_norm", "scale"): (H,),
        ("attn", "_key_norm", "scale"): (H,),
        ("mlp", "gating_einsum", "w"): (2, F, D),
        ("mlp", "linear", "w"): (F, D),
    }
    for i in range(c.num_layers):
        shapes.update({(f"layer_{i}", *path): shape for path, shape in per_layer.items()})
    return shapes


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """Opens (memory-maps) a GGUF file, turning every way that can fail into a gemma_kit error."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(f"No GGUF file at {path}; {_HINT}.")
    if path.is_dir():
        raise ConversionError(f"{path} is a directory; {_HINT}.")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConversionError(f"{path} is not a GGUF file (bad magic {magic!r}); {_HINT}.")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader reports truncation and bad headers in many ways
        raise ConversionError(
            f"{path} is a damaged or truncated GGUF file ({type(e).__name__}: {e}); "
            "assemble or download it again."
        ) from e


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _architecture(reader: gguf.GGUFReader) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"{reader.data.filename} holds a {arch!r} model; gemma_kit converts only "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} GGUF files."
        )
    return arch


def _match_preset(reader: gguf.GGUFReader, shapes: dict[str, tuple[int, ...]]) -> Config:
    try:
        V, D = shapes["token_embd.weight"]
        F = shapes["blk.0.ffn_gate.weight"][0]
        (H,) = shapes["blk.0.attn_q_norm.weight"]
        N = shapes["blk.0.attn_q.weight"][0] // H
        K = shapes["blk.0.attn_k.weight"][0] // H
    except (KeyError, ValueError) as e:
        raise ConversionError(
            f"{reader.data.filename} lacks the tensors of a Gemma 3 model ({e})."
        ) from None
    # The highest block, not a count, so that a file missing a middle layer fails the name check.
    L = 1 + max((int(name.split(".")[1]) for name in shapes if name.startswith("blk.")), default=-1)
    found = dict(vocab_size=V, embed_dim=D, hidden_dim=F, num_heads=N, num_kv_heads=K,
                 head_dim=H, num_layers=L)
    for config in PRESETS.values():
        if config.family == "gemma3" and all(getattr(config, k) == v for k, v in found.items()):
            return config
    known = ", ".join(c.name for c in PRESETS.values() if c.family == "gemma3")
    raise ConversionError(
        f"{reader.data.filename} matches no gemma_kit preset: its tensors say "
        f"{', '.join(f'{k}={v}' for k, v in found.items())}. Known Gemma 3 presets: {known}."
    )


def _check_metadata(reader: gguf.GGUFReader, arch: str, config: Config) -> None:
    """The few numerics the file does state must agree with the preset that supplies the rest."""
    local = next((kind for kind in config.layers if kind.is_local), None)
    glob = next((kind for kind in config.layers if not kind.is_local), None)
    expected = {
        "attention.sliding_window": local.window if local else None,
        "attention.layer_norm_rms_epsilon": config.norm_eps,
        "rope.freq_base": glob.rope_base if glob else None,
        "rope.scaling.factor": glob.rope_scale if glob else None,
    }
    for key, want in expected.items():
        got = _field(reader, f"{arch}.{key}")
        if got is None or want is None:
            continue
        if not np.isclose(float(got), float(want), rtol=1e-4):
            raise ConversionError(
                f"{reader.data.filename} says {arch}.{key} = {got}, but preset {config.name!r} "
                f"uses {want}; gemma_kit would compute a different model than the file describes."
            )


def _route(name: str) -> tuple[tuple[str, ...], int | None, Transform]:
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    _, layer, key = name.split(".", 2)  # "blk.{i}.<key>"
    path, slot, transform = _PER_LAYER[key]
    return (f"layer_{layer}", *path), slot, transform


def read_gguf(
    source: str | os.PathLike | gguf.GGUFReader, dtype=np.float32, *, progress: bool = True
) -> tuple[Config, dict]:
    """Dequantizes a Gemma 3 GGUF into (preset, canonical parameter tree of numpy arrays).

    dtype is float32 (what the dequantizer computes), bfloat16 or float16.
    Opening a GGUF parses its 262k-entry vocabulary in Python (~20 s), so to also build the
    tokenizer, open it once with open_gguf() and pass the reader to both functions.
    """
    dtype = np.dtype(dtype)
    if dtype not in _DTYPES:
        raise ConversionError(f"dtype must be one of {[str(d) for d in _DTYPES]}, got {dtype}.")
    reader = source if isinstance(source, gguf.GGUFReader) else open_gguf(source)
    where = reader.data.filename
    arch = _architecture(reader)
    # GGUF lists dimensions innermost first; numpy wants them outermost first.
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    config = _match_preset(reader, shapes)
    _check_metadata(reader, arch, config)

    # Every tensor must land somewhere and every parameter must come from somewhere.
    blocks = (f"blk.{i}.{key}" for i in range(config.num_layers) for key in _PER_LAYER)
    wanted = [*_TOP_LEVEL, *blocks]
    for problem, names in (
        ("has tensors with no place in", sorted(set(shapes) - set(wanted))),
        ("lacks tensors needed by", [name for name in wanted if name not in shapes]),
    ):
        if names:
            raise ConversionError(
                f"{where} {problem} a {config.name} model: {', '.join(names[:8])}"
                f"{' ...' if len(names) > 8 else ''} ({len(names)} in all)."
            )
    expected = canonical_shapes(config)

    flat: dict[tuple[str, ...], np.ndarray] = {}
    stacked: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    bar = tqdm(reader.tensors, desc="Dequantizing GGUF", unit="tensor", disable=not progress)
    for tensor in bar:
        canonical, slot, transform = _route(tensor.name)
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise ConversionError(
                f"{where}: tensor {tensor.name} uses quantization {tensor.tensor_type.name}, which "
                f"the gguf package cannot dequantize ({e})."
            ) from e
        want = expected[canonical][1:] if slot is not None else expected[canonical]
        try:
            values = transform(np.asarray(values, np.float32).reshape(shapes[tensor.name]), config)
        except ValueError:  # a size that no reshape can fix
            values = None
        if values is None or values.shape != want:
            raise ConversionError(
                f"{where}: tensor {tensor.name} has shape {shapes[tensor.name]}, which does not "
                f"map to {'/'.join(canonical)} of shape {want} in {config.name}."
            )
        values = np.ascontiguousarray(values, dtype=dtype)
        if slot is None:
            flat[canonical] = values
        else:
            stacked.setdefault(canonical, {})[slot] = values
    for canonical, slots in stacked.items():
        flat[canonical] = np.stack([slots[i] for i in sorted(slots)])

    assert flat.keys() == expected.keys(), "the name checks above admit exactly the expected set"
    params: dict = {}
    for canonical, value in flat.items():
        node = params
        for key in canonical[:-1]:
            node = node.setdefault(key, {})
        node[canonical[-1]] = value
    return config, params


# llama.cpp writes SentencePiece's own token-type numbers; naming them keeps the mapping honest.
_PIECE_TYPES = {
    1: sp_pb2.ModelProto.SentencePiece.NORMAL,
    2: sp_pb2.ModelProto.SentencePiece.UNKNOWN,
    3: sp_pb2.ModelProto.SentencePiece.CONTROL,
    4: sp_pb2.ModelProto.SentencePiece.USER_DEFINED,
    5: sp_pb2.ModelProto.SentencePiece.UNUSED,
    6: sp_pb2.ModelProto.SentencePiece.BYTE,
}


def build_sentencepiece(source: str | os.PathLike | gguf.GGUFReader) -> bytes:
    """A serialized SentencePiece BPE model of the GGUF's vocabulary.

    Changes to what the file says:
      * runs of raw spaces are respelled with U+2581, the character SentencePiece turns spaces into;
      * CONTROL tokens other than bos/eos/pad become USER_DEFINED, so that markup written in the
        text (<start_of_turn>, <end_of_turn>, <mask>, <unusedN>) is one token, as transformers'
        tokenizer has it; SentencePiece never matches a CONTROL piece in text, which is what
        bos/eos/pad keep, so that no text can forge them;
      * the unk token is typed UNKNOWN, which SentencePiece requires.
    Encoding then equals transformers' GGUF tokenizer except on typed "<bos>", "<eos>", "<pad>",
    "<unk>" and on runs of over 31 spaces, which SentencePiece (like llama.cpp) splits longest
    piece first and transformers does not.
    """
    reader = source if isinstance(source, gguf.GGUFReader) else open_gguf(source)
    where = reader.data.filename
    if _field(reader, "tokenizer.ggml.model") != "llama":
        raise ConversionError(
            f"{where} has a {_field(reader, 'tokenizer.ggml.model')!r} tokenizer, not the "
            "SentencePiece ('llama') vocabulary of a Gemma model."
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    if not tokens or len(scores) != len(tokens) or len(types) != len(tokens):
        raise ConversionError(f"{where} has an incomplete tokenizer vocabulary.")
    special = {
        name: int(_field(reader, f"tokenizer.ggml.{name}_token_id", default))
        for name, default in (("bos", 2), ("eos", 1), ("unknown", 3), ("padding", 0))
    }

    proto = sp_pb2.ModelProto()
    Piece = sp_pb2.ModelProto.SentencePiece
    for index, (token, score, token_type) in enumerate(zip(tokens, scores, types)):
        piece = proto.pieces.add()
        piece.piece = "\u2581" * len(token) if token and not token.strip(" ") else token
        piece.score = float(score)
        kind = _PIECE_TYPES.get(int(token_type), Piece.NORMAL)
        if index == special["unknown"]:
            kind = Piece.UNKNOWN
        elif kind == Piece.CONTROL and index not in special.values():
            kind = Piece.USER_DEFINED
        piece.type = kind

    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    # Characters outside the vocabulary become their UTF-8 bytes (<0x..> pieces), never <unk>.
    trainer.byte_fallback = any(int(t) == 6 for t in types)
    # Training-time settings of the official Gemma tokenizer, recorded for fidelity; encoding
    # does not consult them.
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    # SentencePiece looks its special ids up by these names; its defaults are <s>, </s>.
    trainer.unk_id, trainer.unk_piece = special["unknown"], tokens[special["unknown"]]
    trainer.bos_id, trainer.bos_piece = special["bos"], tokens[special["bos"]]
    trainer.eos_id, trainer.eos_piece = special["eos"], tokens[special["eos"]]
    trainer.pad_id, trainer.pad_piece = special["padding"], tokens[special["padding"]]

    normalizer = proto.normalizer_spec
    # Gemma normalizes nothing (no NFKC), keeps every space, and adds no leading space.
    normalizer.name = "identity"
    charsmap = _field(reader, "tokenizer.ggml.precompiled_charsmap")
    if charsmap:
        normalizer.precompiled_charsmap = bytes(np.asarray(charsmap, dtype=np.uint8))
    normalizer.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", False))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()
