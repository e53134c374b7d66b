#!/usr/bin/env python
"""Writes tests/golden/vision_shapes.json: the official shapes of Gemma 3's image encoder.

Like scripts/write_preset_golden.py (the text weights), and on purpose without importing
gemma_kit: the numbers are copied out of the official code (google-deepmind/gemma) into `DIMS`
below with the file, class and expression each comes from, and the parameter tree is built by
the rules of the official Flax linen modules (`flat_shapes`, whose comments cite them).
tests/test_vision_checkpoint.py compares gemma_kit's `jax.eval_shape` tree against this table.

Names are those of the released checkpoints ("flat" layout): the encoder under
`SigLiPFromPatches_0/siglip_encoder`, the multimodal projection under `transformer/embedder`.

Usage:
    python scripts/write_vision_golden.py                   # (re)write the golden file
    python scripts/write_vision_golden.py --check           # fail if the file is out of date
    python scripts/write_vision_golden.py --verify-official PATH/TO/google-deepmind/gemma
        # re-read every number of DIMS from the official source (a checkout or a bare git
        # repository) and fail on any difference
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import pathlib
import subprocess
import sys
from typing import Any

GOLDEN = pathlib.Path(__file__).resolve().parent.parent / "tests" / "golden" / "vision_shapes.json"

OFFICIAL_REPO = "google-deepmind/gemma"
OFFICIAL_COMMIT = "7691fd4e7f26c9ec5db38110dddb3addfab4d767"
UTILS_PY = "gemma/gm/nn/vision/_vision_utils.py"
VISION_PY = "gemma/gm/nn/vision/_vision.py"
GEMMA_PY = "gemma/gm/nn/_gemma.py"

# --------------------------------------------------------------------------------------------
# The numbers. W encoder width, depth blocks, F MLP hidden, N heads, p patch side, S image
# side, M soft tokens per image after pooling, P patches before pooling. Every value is
# (number, where it is written).

ENCODER: dict[str, tuple[int, str]] = {
    "W": (1152, f"{UTILS_PY} ViTModel: width: int = 1152"),
    "depth": (27, f"{UTILS_PY} ViTModel: depth: int = 27"),
    "F": (4304, f"{UTILS_PY} ViTModel: mlp_dim: int | None = 4304"),
    "N": (16, f"{UTILS_PY} ViTModel: num_heads: int = 16"),
    "p": (14, f"{UTILS_PY} ViTModel: patch_size: Sequence[int] = (14, 14)"),
    "S": (896, f"{VISION_PY} SigLiPFromPatches: image_height: int = 896 (and image_width)"),
    "P": (4096, f"{VISION_PY} SigLiPFromPatches: num_mm_tokens_per_image_prepool: int = 4096"),
    "M": (256, f"{VISION_PY} SigLiPFromPatches: num_mm_tokens_per_image: int = 256"),
}

# The text width D each vision model projects to (the text sizes are in preset_shapes.json).
TEXT_WIDTH: dict[str, tuple[int, str]] = {
    "gemma3-4b": (
        2560,
        f"{GEMMA_PY} Gemma3_4B: embed_dim=2560; vision_encoder=gemma_vision.SigLiPFromPatches()",
    ),
    "gemma3-12b": (
        3840,
        f"{GEMMA_PY} Gemma3_12B: embed_dim=30 * 128; "
        "vision_encoder=gemma_vision.SigLiPFromPatches()",
    ),
    "gemma3-27b": (
        5376,
        f"{GEMMA_PY} Gemma3_27B: embed_dim=5376; vision_encoder=gemma_vision.SigLiPFromPatches()",
    ),
}
OFFICIAL_CLASS = {"gemma3-4b": "Gemma3_4B", "gemma3-12b": "Gemma3_12B", "gemma3-27b": "Gemma3_27B"}

# The Gemma 3 report (arXiv 2503.19786), Table 1: "Vision Encoder 417M" parameters for the
# 4B, 12B and 27B models. Rounded to three digits.
PUBLISHED_ENCODER_PARAMS = 417e6

# --------------------------------------------------------------------------------------------
# The rules (Flax linen, as the official modules use them):
# - _vision_utils.py ViTModel: nn.Conv(width, patch_size, name="embedding") -> kernel
#   (p, p, in_channels=3, W) and bias (W,); _get_posemb("learn") -> param "pos_embedding"
#   (1, prod(seqshape), W) with seqshape the (S/p, S/p) patch grid; Encoder(name="Transformer").
# - Encoder: blocks named f"encoderblock_{i}" (scan=False), then nn.LayerNorm(name="encoder_norm").
# - Encoder1DBlock: nn.LayerNorm (LayerNorm_0), nn.MultiHeadDotProductAttention
#   (MultiHeadDotProductAttention_0), nn.LayerNorm (LayerNorm_1), MlpBlock (MlpBlock_0).
# - flax.linen.MultiHeadDotProductAttention: query/key/value are DenseGeneral with features
#   (num_heads, W / num_heads): kernel (W, N, W/N), bias (N, W/N); out is DenseGeneral over
#   axes (-2, -1): kernel (N, W/N, W), bias (W,).
# - MlpBlock: nn.Dense(mlp_dim) (Dense_0) then nn.Dense(W) (Dense_1): kernel (in, out), bias (out,).
# - nn.LayerNorm: scale and bias over the last axis.
# - _modules.py Embedder.setup with vision_proj_dim (= siglip_encoder.width, _transformer.py):
#   mm_soft_embedding_norm = _layers.RMSNorm() -> scale (W,); mm_input_projection =
#   _layers.Einsum((vision_proj_dim, embed_dim)) -> w (W, D).
# - gm/ckpts/_checkpoint.py _nested_to_flat: the encoder's params go under 'SigLiPFromPatches_0/'
#   (the nested tree's 'vision_encoder'), the rest under 'transformer/'.


def dims() -> dict[str, int]:
    return {key: value for key, (value, _) in ENCODER.items()}


def flat_shapes(preset: str) -> dict[str, dict[str, list[int]]]:
    """{flat module path: {leaf: shape}} of one preset's image encoder and projection."""
    d = dims()
    W, F, N, p, S = d["W"], d["F"], d["N"], d["p"], d["S"]
    H = W // N
    D = TEXT_WIDTH[preset][0]
    root = "SigLiPFromPatches_0/siglip_encoder"
    out: dict[str, dict[str, list[int]]] = {
        "transformer/embedder/mm_input_projection": {"w": [W, D]},
        "transformer/embedder/mm_soft_embedding_norm": {"scale": [W]},
        root: {"pos_embedding": [1, (S // p) ** 2, W]},
        f"{root}/embedding": {"kernel": [p, p, 3, W], "bias": [W]},
    }
    for j in range(d["depth"]):
        block = f"{root}/Transformer/encoderblock_{j}"
        out[f"{block}/LayerNorm_0"] = {"scale": [W], "bias": [W]}
        for name in ("query", "key", "value"):
            out[f"{block}/MultiHeadDotProductAttention_0/{name}"] = {
                "kernel": [W, N, H],
                "bias": [N, H],
            }
        out[f"{block}/MultiHeadDotProductAttention_0/out"] = {"kernel": [N, H, W], "bias": [W]}
        out[f"{block}/LayerNorm_1"] = {"scale": [W], "bias": [W]}
        out[f"{block}/MlpBlock_0/Dense_0"] = {"kernel": [W, F], "bias": [F]}
        out[f"{block}/MlpBlock_0/Dense_1"] = {"kernel": [F, W], "bias": [W]}
    out[f"{root}/Transformer/encoder_norm"] = {"scale": [W], "bias": [W]}
    return out


def golden() -> dict:
    d = dims()
    assert (d["S"] // d["p"]) ** 2 == d["P"], "patch grid and prepool token count disagree"
    presets = {}
    for name in TEXT_WIDTH:
        shapes = flat_shapes(name)
        encoder = sum(
            math.prod(s)
            for module, leaves in shapes.items()
            if module.startswith("SigLiPFromPatches_0/")
            for s in leaves.values()
        )
        total = sum(math.prod(s) for leaves in shapes.values() for s in leaves.values())
        presets[name] = {
            "dims": {**d, "D": TEXT_WIDTH[name][0]},
            "encoder_param_count": encoder,
            "param_count": total,
            "params": shapes,
        }
    return {
        "about": "Official shapes of the Gemma 3 image encoder and multimodal projection, flat "
        "(released checkpoint) names. Generated by scripts/write_vision_golden.py; do "
        "not edit.",
        "source": f"{OFFICIAL_REPO}@{OFFICIAL_COMMIT}",
        "presets": presets,
    }


def render(tree: dict | None = None) -> str:
    """The golden JSON, one module per line so that a diff shows which parameter changed."""
    tree = golden() if tree is None else tree

    def dump(value, indent: int) -> str:
        if not isinstance(value, dict) or not any(isinstance(v, dict) for v in value.values()):
            return json.dumps(value)
        pad = " " * (indent + 2)
        items = [f"{pad}{json.dumps(k)}: {dump(v, indent + 2)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"

    return dump(tree, 0) + "\n"


# --------------------------------------------------------------------------------------------
# Verification against the official source


def _read_official(repo: pathlib.Path, relpath: str) -> str:
    if (repo / relpath).is_file():
        return (repo / relpath).read_text()
    return subprocess.run(
        ["git", "-C", str(repo), "show", f"HEAD:{relpath}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def _class_defaults(source: str, cls: str) -> dict[str, Any]:
    """Literal defaults of a dataclass-style class body (field: type = literal)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            out = {}
            for stmt in node.body:
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(stmt.target, ast.Name)
                    and stmt.value is not None
                ):
                    try:
                        out[stmt.target.id] = ast.literal_eval(stmt.value)
                    except ValueError:
                        pass
            return out
    raise ValueError(f"class {cls} not found")


def _config_kwargs(source: str, cls: str) -> dict[str, str]:
    """The TransformerConfig(...) keywords of a _gemma.py class, as source text."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for stmt in node.body:
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(stmt.target, ast.Name)
                    and stmt.target.id == "config"
                    and isinstance(stmt.value, ast.Call)
                ):
                    return {
                        k.arg: ast.unparse(k.value)
                        for k in stmt.value.keywords
                        if k.arg is not None
                    }
    raise ValueError(f"class {cls} not found")


def _arithmetic(text: str) -> int:
    """Evaluates integer arithmetic such as `30 * 128` (and nothing else)."""

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Add, ast.FloorDiv)):
            a, b = value(node.left), value(node.right)
            return (
                a * b
                if isinstance(node.op, ast.Mult)
                else a + b
                if isinstance(node.op, ast.Add)
                else a // b
            )
        raise ValueError(f"not integer arithmetic: {text!r}")

    return value(ast.parse(text, mode="eval").body)


def verify_official(repo: pathlib.Path) -> list[str]:
    """Differences between this script's numbers and the official source."""
    vit = _class_defaults(_read_official(repo, UTILS_PY), "ViTModel")
    siglip = _class_defaults(_read_official(repo, VISION_PY), "SigLiPFromPatches")
    official = {
        "W": vit["width"],
        "depth": vit["depth"],
        "F": vit["mlp_dim"],
        "N": vit["num_heads"],
        "p": vit["patch_size"][0],
        "S": siglip["image_height"],
        "P": siglip["num_mm_tokens_per_image_prepool"],
        "M": siglip["num_mm_tokens_per_image"],
    }
    problems = [
        f"{key} = {value} here, {official[key]} in the official code"
        for key, value in dims().items()
        if official[key] != value
    ]
    if (
        vit["patch_size"][0] != vit["patch_size"][1]
        or siglip["image_width"] != siglip["image_height"]
    ):
        problems.append("the official patches or images are not square")
    if vit.get("posemb") != "learn":
        problems.append(f"ViTModel posemb is {vit.get('posemb')!r}, not a learned embedding")
    gemma = _read_official(repo, GEMMA_PY)
    for preset, cls in OFFICIAL_CLASS.items():
        kw = _config_kwargs(gemma, cls)
        if "SigLiPFromPatches()" not in kw.get("vision_encoder", ""):
            problems.append(f"{preset}: {cls} has vision_encoder={kw.get('vision_encoder')}")
        if _arithmetic(kw["embed_dim"]) != TEXT_WIDTH[preset][0]:
            problems.append(f"{preset}: embed_dim {kw['embed_dim']} in {cls}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the golden file is stale")
    parser.add_argument(
        "--verify-official",
        type=pathlib.Path,
        metavar="REPO",
        help="compare the numbers with a google-deepmind/gemma checkout or git repo",
    )
    args = parser.parse_args(argv)
    if args.verify_official:
        problems = verify_official(args.verify_official)
        for line in problems:
            print("MISMATCH", line)
        if problems:
            return 1
        print(f"all {len(ENCODER) + len(TEXT_WIDTH)} numbers agree with {args.verify_official}")
        return 0
    text = render()
    if args.check:
        if not GOLDEN.is_file() or GOLDEN.read_text() != text:
            print(f"{GOLDEN} is out of date; run {pathlib.Path(__file__).name}")
            return 1
        print(f"{GOLDEN} is up to date")
        return 0
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(text)
    print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
