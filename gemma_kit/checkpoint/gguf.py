"""Reading a llama.cpp GGUF file of a Gemma 3 model: weights into gemma_kit's canonical parameter
tree, vocabulary into a SentencePiece model.

What llama.cpp changes when it writes a Gemma GGUF, and this module undoes:
  * every RMSNorm weight (the q/k norms too) is stored as 1 + scale, while gemma_kit keeps the
    official zero-centred scale;
  * matrices are stored as Hugging Face's (out, in) Linear weights rather than the official
    einsum layouts, so they are placed by the Hugging Face name table (gemma_kit.checkpoint.hf);
    Q and K rows are NOT permuted (llama.cpp runs Gemma with NEOX-style RoPE, the layout HF
    uses);
  * the vocabulary keeps its 30 runs of spaces as raw spaces and marks <start_of_turn> and
    <end_of_turn> as CONTROL tokens, which SentencePiece would never parse from text.
The file carries no local RoPE base, local/global layer pattern or query scale: those come from
the preset whose shapes the file matches.
"""

from __future__ import annotations

import os
from pathlib import Path

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

from gemma_kit.checkpoint import hf, official
from gemma_kit.config import PRESETS, Config, GlobalAttention, LocalAttention
from gemma_kit.errors import CheckpointNotFoundError, ConversionError

SUPPORTED_ARCHITECTURES = ("gemma3",)
_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))
_HINT = (
    "pass a .gguf file written by llama.cpp's convert_hf_to_gguf.py, e.g. the packaged Gemma 3 "
    "270M from gemma_kit.paths.default_gguf_path()"
)


# llama.cpp's convert_hf_to_gguf.py writes each tensor of a Hugging Face Gemma 3 checkpoint
# under its own name, in the same [out, in] layout. So a GGUF tensor is placed by the Hugging
# Face name table (gemma_kit.checkpoint.hf.text_rules): its Rule says which parameter it makes,
# in which slot of a stacked axis, and how its axes map, in the same dimension-letter notation.
GGUF_TO_HF_TOP = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
}
# The same for the tensors of block i, named "blk.{i}.<key>" here and "layers.{i}.<name>" there.
GGUF_TO_HF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def gguf_names(config: Config) -> list[str]:
    """Every tensor name a GGUF of `config` holds, top-level first, then block by block."""
    blocks = (f"blk.{i}.{key}" for i in range(config.num_layers) for key in GGUF_TO_HF_LAYER)
    return [*GGUF_TO_HF_TOP, *blocks]


def gguf_routes(config: Config) -> dict[str, tuple[hf.Rule, int | None]]:
    """GGUF tensor name -> (the Rule of the parameter it makes, its slot in a stacked axis)."""
    placed: dict[str, tuple[hf.Rule, int | None]] = {}
    for rule in hf.text_rules(config):
        for slot, name in enumerate(rule.hf):
            placed[name] = (rule, slot if len(rule.hf) > 1 else None)
    routes = {}
    for name in gguf_names(config):
        if name in GGUF_TO_HF_TOP:
            routes[name] = placed[GGUF_TO_HF_TOP[name]]
        else:
            _, layer, key = name.split(".", 2)
            routes[name] = placed[f"layers.{layer}.{GGUF_TO_HF_LAYER[key]}"]
    return routes


def _is_norm(rule: hf.Rule) -> bool:
    return rule.path[-1] == "scale"  # every RMSNorm weight, the q/k norms included


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
    found = dict(
        vocab_size=V,
        embed_dim=D,
        hidden_dim=F,
        num_heads=N,
        num_kv_heads=K,
        head_dim=H,
        num_layers=L,
    )
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
    local = next((kind for kind in config.layers if isinstance(kind, LocalAttention)), None)
    glob = next((kind for kind in config.layers if isinstance(kind, GlobalAttention)), None)
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
    wanted = gguf_names(config)
    for problem, names in (
        ("has tensors with no place in", sorted(set(shapes) - set(wanted))),
        ("lacks tensors needed by", [name for name in wanted if name not in shapes]),
    ):
        if names:
            raise ConversionError(
                f"{where} {problem} a {config.name} model: {', '.join(names[:8])}"
                f"{' ...' if len(names) > 8 else ''} ({len(names)} in all)."
            )
    routes = gguf_routes(config)
    sizes = hf.sizes_of(config)
    for name in wanted:  # every shape, before the slow dequantizing
        rule, _ = routes[name]
        if shapes[name] != rule.hf_shape(sizes):
            raise ConversionError(
                f"{where}: tensor {name} has shape {shapes[name]}, but {'/'.join(rule.path)} "
                f"of {config.name} needs {rule.hf_shape(sizes)}."
            )

    flat: dict[tuple[str, ...], np.ndarray] = {}
    stacked: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    bar = tqdm(reader.tensors, desc="Dequantizing GGUF", unit="tensor", disable=not progress)
    for tensor in bar:
        rule, slot = routes[tensor.name]
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise ConversionError(
                f"{where}: tensor {tensor.name} uses quantization {tensor.tensor_type.name}, which "
                f"the gguf package cannot dequantize ({e})."
            ) from e
        values = np.asarray(values, np.float32).reshape(shapes[tensor.name])
        if _is_norm(rule):  # stored as 1 + scale; gemma_kit keeps the zero-centred scale
            values = values - np.float32(1.0)
        values = np.ascontiguousarray(rule.part_to_gemma(values, sizes), dtype=dtype)
        if slot is None:
            flat[rule.path] = values
        else:
            stacked.setdefault(rule.path, {})[slot] = values
    for path, slots in stacked.items():
        flat[path] = np.stack([slots[i] for i in sorted(slots)])

    expected = {
        path: tuple(leaf.shape)
        for path, leaf in official.flatten(official.abstract_params(config)).items()
    }
    got = {path: value.shape for path, value in flat.items()}
    assert got == expected, "the name and shape checks above admit exactly the model's tree"
    return config, official.unflatten(flat)


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
