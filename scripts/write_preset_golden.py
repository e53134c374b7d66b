#!/usr/bin/env python
"""Writes tests/golden/preset_shapes.json: the official text-weight shapes of every preset.

The shapes are derived here from first principles, on purpose without importing gemma_kit: the
dimension numbers are copied out of the official code (google-deepmind/gemma) into `DIMS`
below, each with the file, class and expression it comes from, and the parameter tree is built
by the rules of the official modules (`flat_shapes`, whose comments cite them).
tests/test_presets.py then compares gemma_kit's `jax.eval_shape` tree against this table, so a
wrong number in gemma_kit/config.py, or a wrong shape rule in its modules, cannot hide behind
itself.

Names are those of the released checkpoints ("flat" layout): one key per module path under
`transformer/`, holding a dict of leaves. Only text weights: the Gemma 3 4B/12B/27B checkpoints
also hold the SigLIP encoder and the embedder's mm_* projection, which are not listed here.

Usage:
    python scripts/write_preset_golden.py                   # (re)write the golden file
    python scripts/write_preset_golden.py --check           # fail if the file is out of date
    python scripts/write_preset_golden.py --verify-official PATH/TO/google-deepmind/gemma
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

GOLDEN = pathlib.Path(__file__).resolve().parent.parent / "tests" / "golden" / "preset_shapes.json"

# The official commit the numbers were read from (and verified against with --verify-official).
OFFICIAL_REPO = "google-deepmind/gemma"
OFFICIAL_COMMIT = "7691fd4e7f26c9ec5db38110dddb3addfab4d767"
GEMMA_PY = "gemma/gm/nn/_gemma.py"
CONFIG_PY = "gemma/gm/nn/_config.py"

# --------------------------------------------------------------------------------------------
# The numbers. Letters: V vocab rows, D embed, F ffw hidden (per GeGLU branch), N query heads,
# K kv heads, H head dim, L layers. Flags: transpose_gating (gating einsum stored [2, F, D]
# rather than [2, D, F]), qk_norm (_query_norm/_key_norm present), post_norms
# (post_attention_norm and post_ffw_norm present). Every value is (number, where it is written).
# "default" means the class leaves the field unset and TransformerConfig's default applies.

_CFG_DEFAULT_GATING = (
    f"{CONFIG_PY} TransformerConfig: transpose_gating_einsum: bool = False "
    "(default; the class leaves it unset)"
)
_CFG_DEFAULT_QK = (
    f"{CONFIG_PY} TransformerConfig: use_qk_norm: bool = False (default; the class leaves it unset)"
)


def _src(cls: str, text: str) -> str:
    return f"{GEMMA_PY} {cls}: {text}"


def _gemma2_layers(cls: str, constant: str, n: int) -> str:
    return _src(
        cls, f"attention_types=(LOCAL_SLIDING, GLOBAL) * int({constant} / 2); {constant} = {n}"
    )


def _gemma3_layers(cls: str, constant: str, n: int) -> str:
    return _src(
        cls,
        "attention_types=make_attention_layers_types(GEMMA3_ATTENTION_PATTERN, "
        f"num_layers={constant}); {constant} = {n}",
    )


_POST_NORMS = "use_post_attn_norm=True, use_post_ffw_norm=True"


DIMS: dict[str, dict[str, tuple[int | bool, str]]] = {
    "gemma2-2b": {
        "V": (256128, _src("Gemma2_2B", "num_embed=256128")),
        "D": (2304, _src("Gemma2_2B", "embed_dim=2304")),
        "F": (9216, _src("Gemma2_2B", "hidden_dim=9216")),
        "N": (8, _src("Gemma2_2B", "num_heads=8")),
        "K": (4, _src("Gemma2_2B", "num_kv_heads=4")),
        "H": (256, _src("Gemma2_2B", "head_dim=256")),
        "L": (26, _gemma2_layers("Gemma2_2B", "_NUM_LAYERS_GEMMA2_2B", 26)),
        "transpose_gating": (False, _CFG_DEFAULT_GATING),
        "qk_norm": (False, _CFG_DEFAULT_QK),
        "post_norms": (True, _src("Gemma2_2B", _POST_NORMS)),
    },
    "gemma2-9b": {
        "V": (256128, _src("Gemma2_9B", "num_embed=256128")),
        "D": (3584, _src("Gemma2_9B", "embed_dim=3584")),
        "F": (14336, _src("Gemma2_9B", "hidden_dim=14336")),
        "N": (16, _src("Gemma2_9B", "num_heads=16")),
        "K": (8, _src("Gemma2_9B", "num_kv_heads=8")),
        "H": (256, _src("Gemma2_9B", "head_dim=256")),
        "L": (42, _gemma2_layers("Gemma2_9B", "_NUM_LAYERS_GEMMA2_9B", 42)),
        "transpose_gating": (True, _src("Gemma2_9B", "transpose_gating_einsum=True")),
        "qk_norm": (False, _CFG_DEFAULT_QK),
        "post_norms": (True, _src("Gemma2_9B", _POST_NORMS)),
    },
    "gemma2-27b": {
        "V": (256128, _src("Gemma2_27B", "num_embed=256128")),
        "D": (4608, _src("Gemma2_27B", "embed_dim=4608")),
        "F": (36864, _src("Gemma2_27B", "hidden_dim=36864")),
        "N": (32, _src("Gemma2_27B", "num_heads=32")),
        "K": (16, _src("Gemma2_27B", "num_kv_heads=16")),
        "H": (128, _src("Gemma2_27B", "head_dim=128")),
        "L": (46, _gemma2_layers("Gemma2_27B", "_NUM_LAYERS_GEMMA2_27B", 46)),
        "transpose_gating": (True, _src("Gemma2_27B", "transpose_gating_einsum=True")),
        "qk_norm": (False, _CFG_DEFAULT_QK),
        "post_norms": (True, _src("Gemma2_27B", _POST_NORMS)),
    },
    "gemma3-270m": {
        "V": (262144, _src("Gemma3_270M", "num_embed=262144")),
        "D": (640, _src("Gemma3_270M", "embed_dim=640")),
        "F": (2048, _src("Gemma3_270M", "hidden_dim=2048")),
        "N": (4, _src("Gemma3_270M", "num_heads=4")),
        "K": (1, _src("Gemma3_270M", "num_kv_heads=1")),
        "H": (256, _src("Gemma3_270M", "head_dim=256")),
        "L": (18, _gemma3_layers("Gemma3_270M", "_NUM_LAYERS_GEMMA3_270M", 18)),
        "transpose_gating": (True, _src("Gemma3_270M", "transpose_gating_einsum=True")),
        "qk_norm": (True, _src("Gemma3_270M", "use_qk_norm=True")),
        "post_norms": (True, _src("Gemma3_270M", _POST_NORMS)),
    },
    "gemma3-1b": {
        "V": (262144, _src("Gemma3_1B", "num_embed=262144")),
        "D": (1152, _src("Gemma3_1B", "embed_dim=1152")),
        "F": (6912, _src("Gemma3_1B", "hidden_dim=6 * 1152")),
        "N": (4, _src("Gemma3_1B", "num_heads=4")),
        "K": (1, _src("Gemma3_1B", "num_kv_heads=1")),
        "H": (256, _src("Gemma3_1B", "head_dim=256")),
        "L": (26, _gemma3_layers("Gemma3_1B", "_NUM_LAYERS_GEMMA3_1B", 26)),
        "transpose_gating": (True, _src("Gemma3_1B", "transpose_gating_einsum=True")),
        "qk_norm": (True, _src("Gemma3_1B", "use_qk_norm=True")),
        "post_norms": (True, _src("Gemma3_1B", _POST_NORMS)),
    },
    "gemma3-4b": {
        "V": (262144, _src("Gemma3_4B", "num_embed=262_144")),
        "D": (2560, _src("Gemma3_4B", "embed_dim=2560")),
        "F": (10240, _src("Gemma3_4B", "hidden_dim=2560 * 8 // 2")),
        "N": (8, _src("Gemma3_4B", "num_heads=8")),
        "K": (4, _src("Gemma3_4B", "num_kv_heads=4")),
        "H": (256, _src("Gemma3_4B", "head_dim=256")),
        "L": (34, _gemma3_layers("Gemma3_4B", "_NUM_LAYERS_GEMMA3_4B", 34)),
        "transpose_gating": (True, _src("Gemma3_4B", "transpose_gating_einsum=True")),
        "qk_norm": (True, _src("Gemma3_4B", "use_qk_norm=True")),
        "post_norms": (True, _src("Gemma3_4B", _POST_NORMS)),
    },
    "gemma3-12b": {
        "V": (262144, _src("Gemma3_12B", "num_embed=262144")),
        "D": (3840, _src("Gemma3_12B", "embed_dim=30 * 128")),
        "F": (15360, _src("Gemma3_12B", "hidden_dim=8 * 30 * 128 // 2")),
        "N": (16, _src("Gemma3_12B", "num_heads=16")),
        "K": (8, _src("Gemma3_12B", "num_kv_heads=8")),
        "H": (256, _src("Gemma3_12B", "head_dim=256")),
        "L": (48, _gemma3_layers("Gemma3_12B", "_NUM_LAYERS_GEMMA3_12B", 48)),
        "transpose_gating": (True, _src("Gemma3_12B", "transpose_gating_einsum=True")),
        "qk_norm": (True, _src("Gemma3_12B", "use_qk_norm=True")),
        "post_norms": (True, _src("Gemma3_12B", _POST_NORMS)),
    },
    "gemma3-27b": {
        "V": (262144, _src("Gemma3_27B", "num_embed=262144")),
        "D": (5376, _src("Gemma3_27B", "embed_dim=5376")),
        "F": (21504, _src("Gemma3_27B", "hidden_dim=5376 * 8 // 2")),
        "N": (32, _src("Gemma3_27B", "num_heads=32")),
        "K": (16, _src("Gemma3_27B", "num_kv_heads=16")),
        "H": (128, _src("Gemma3_27B", "head_dim=128")),
        "L": (62, _gemma3_layers("Gemma3_27B", "_NUM_LAYERS_GEMMA3_27B", 62)),
        "transpose_gating": (True, _src("Gemma3_27B", "transpose_gating_einsum=True")),
        "qk_norm": (True, _src("Gemma3_27B", "use_qk_norm=True")),
        "post_norms": (True, _src("Gemma3_27B", _POST_NORMS)),
    },
}

# The official class each preset is read from by --verify-official.
OFFICIAL_CLASS = {
    "gemma2-2b": "Gemma2_2B",
    "gemma2-9b": "Gemma2_9B",
    "gemma2-27b": "Gemma2_27B",
    "gemma3-270m": "Gemma3_270M",
    "gemma3-1b": "Gemma3_1B",
    "gemma3-4b": "Gemma3_4B",
    "gemma3-12b": "Gemma3_12B",
    "gemma3-27b": "Gemma3_27B",
}

# --------------------------------------------------------------------------------------------
# The rules: how the official modules turn those numbers into parameters (files under
# gemma/gm/nn/). Every Einsum stores its weight as `w` (_layers.py Einsum: weight_name='w'),
# every RMSNorm a `scale` over the input's last dimension (_layers.py RMSNorm: shape
# (x.shape[-1])). Module names: _transformer.py Transformer.setup (embedder, blocks named
# layer_{i}, final_norm); the released checkpoints put every module path under 'transformer/'
# (gm/ckpts/_checkpoint.py _nested_to_flat), the feed-forward weights included ('.../mlp/linear'
# -> {'w'}; gm/ckpts/_compat.py flatten_and_remap_params).


def dims(preset: str) -> dict[str, int | bool]:
    """The numbers of one preset, without their sources."""
    return {key: value for key, (value, _) in DIMS[preset].items()}


def flat_shapes(preset: str) -> dict[str, dict[str, list[int]]]:
    """{flat module path: {leaf: shape}} of one preset, in the order the modules are built."""
    d = dims(preset)
    V, D, F, N, K, H, L = (d[k] for k in "VDFNKHL")
    # _modules.py Embedder.setup: param 'input_embedding' (vocab_size, embed_dim). The mm_*
    # projection exists only with a vision encoder and is left out (text weights only).
    out: dict[str, dict[str, list[int]]] = {"transformer/embedder": {"input_embedding": [V, D]}}
    for i in range(L):
        layer = f"transformer/layer_{i}"
        # _modules.py Block.setup: pre_attention_norm, attn, post_attention_norm (when
        # use_post_attn_norm), pre_ffw_norm, mlp, post_ffw_norm (when use_post_ffw_norm).
        out[f"{layer}/pre_attention_norm"] = {"scale": [D]}
        # _modules.py Attention.setup: use_qkv_einsum is num_kv_heads == num_heads; then one
        # qkv_einsum (3, num_heads, features, head_dim), else q_einsum (num_heads, features,
        # head_dim) and kv_einsum (2, num_kv_heads, features, head_dim).
        if N == K:
            out[f"{layer}/attn/qkv_einsum"] = {"w": [3, N, D, H]}
        else:
            out[f"{layer}/attn/q_einsum"] = {"w": [N, D, H]}
            out[f"{layer}/attn/kv_einsum"] = {"w": [2, K, D, H]}
        # _modules.py Attention.setup: attn_vec_einsum (num_heads, head_dim, features).
        out[f"{layer}/attn/attn_vec_einsum"] = {"w": [N, H, D]}
        # _modules.py Attention.setup: _query_norm / _key_norm when use_qk_norm, applied to
        # [..., head_dim] projections, so their scale is (head_dim,).
        if d["qk_norm"]:
            out[f"{layer}/attn/_query_norm"] = {"scale": [H]}
            out[f"{layer}/attn/_key_norm"] = {"scale": [H]}
        if d["post_norms"]:
            out[f"{layer}/post_attention_norm"] = {"scale": [D]}
        out[f"{layer}/pre_ffw_norm"] = {"scale": [D]}
        # _modules.py FeedForward: gating_einsum (2, hidden_dim, features) when
        # transpose_gating_einsum, else (2, features, hidden_dim); linear (hidden_dim, features).
        out[f"{layer}/mlp/gating_einsum"] = {"w": [2, F, D] if d["transpose_gating"] else [2, D, F]}
        out[f"{layer}/mlp/linear"] = {"w": [F, D]}
        if d["post_norms"]:
            out[f"{layer}/post_ffw_norm"] = {"scale": [D]}
    # _transformer.py Transformer.setup: final_norm, an RMSNorm over embed_dim.
    out["transformer/final_norm"] = {"scale": [D]}
    return out


def golden() -> dict:
    presets = {}
    for name in DIMS:
        shapes = flat_shapes(name)
        d = dims(name)
        presets[name] = {
            "dims": d,
            # The output projection is tied to input_embedding, so it is counted once.
            "param_count": sum(math.prod(s) for leaves in shapes.values() for s in leaves.values()),
            "embedding_param_count": d["V"] * d["D"],
            "params": shapes,
        }
    return {
        "about": "Official text-weight shapes of every gemma_kit preset, flat (released "
        "checkpoint) names. Generated by scripts/write_preset_golden.py; do not edit.",
        "source": f"{OFFICIAL_REPO}@{OFFICIAL_COMMIT}",
        "presets": presets,
    }


def render(tree: dict | None = None) -> str:
    """The golden JSON, one module per line so that a diff shows which parameter changed."""
    tree = golden() if tree is None else tree

    def dump(value, indent: int) -> str:
        # A dict of leaves ({"w": [..]}) or a list goes on one line; dicts of dicts are opened.
        if not isinstance(value, dict) or not any(isinstance(v, dict) for v in value.values()):
            return json.dumps(value)
        pad = " " * (indent + 2)
        items = [f"{pad}{json.dumps(k)}: {dump(v, indent + 2)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"

    return dump(tree, 0) + "\n"


# --------------------------------------------------------------------------------------------
# Verification against the official source


def _read_official(repo: pathlib.Path, relpath: str) -> str:
    """A file of the official repository: a checkout, or the HEAD of a (bare) git repository."""
    if (repo / relpath).is_file():
        return (repo / relpath).read_text()
    return subprocess.run(
        ["git", "-C", str(repo), "show", f"HEAD:{relpath}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


class _Evaluator:
    """Evaluates the small expressions of _gemma.py's configs (arithmetic, tuples, names).

    Attribute chains (`_modules.AttentionType.GLOBAL`) evaluate to their dotted text;
    `make_attention_layers_types` is re-implemented as in gemma/gm/nn/_config.py.
    """

    def __init__(self, constants: dict[str, object]):
        self.constants = constants

    def __call__(self, node: ast.AST):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return self.constants[node.id]
        if isinstance(node, ast.Attribute):
            return ast.unparse(node)
        if isinstance(node, ast.Tuple):
            return tuple(self(e) for e in node.elts)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -self(node.operand)
        if isinstance(node, ast.BinOp):
            a, b = self(node.left), self(node.right)
            ops = {
                ast.Add: lambda: a + b,
                ast.Sub: lambda: a - b,
                ast.Mult: lambda: a * b,
                ast.Div: lambda: a / b,
                ast.FloorDiv: lambda: a // b,
            }
            return ops[type(node.op)]()
        if isinstance(node, ast.Call):
            fn = ast.unparse(node.func)
            if fn == "int":
                return int(self(node.args[0]))
            if fn.endswith("make_attention_layers_types"):
                pattern = self(node.args[0])
                n = self(next(k.value for k in node.keywords if k.arg == "num_layers"))
                return pattern * (n // len(pattern)) + pattern[: n % len(pattern)]
            return fn  # e.g. gemma_vision.SigLiPFromPatches(): only its presence matters
        raise ValueError(f"cannot evaluate {ast.unparse(node)!r}")


def _official_configs(repo: pathlib.Path) -> tuple[dict[str, dict], dict[str, object]]:
    """({class name: TransformerConfig kwargs}, TransformerConfig defaults) from the source."""
    module = ast.parse(_read_official(repo, GEMMA_PY))
    constants: dict[str, object] = {}
    evaluate = _Evaluator(constants)
    configs = {}
    for node in module.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            try:
                constants[node.targets[0].id] = evaluate(node.value)
            except (ValueError, KeyError):
                pass
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(stmt.target, ast.Name)
                    and stmt.target.id == "config"
                    and isinstance(stmt.value, ast.Call)
                ):
                    configs[node.name] = {k.arg: evaluate(k.value) for k in stmt.value.keywords}
    defaults = {}
    for tree_node in ast.walk(ast.parse(_read_official(repo, CONFIG_PY))):
        if isinstance(tree_node, ast.ClassDef) and tree_node.name == "TransformerConfig":
            for stmt in tree_node.body:
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(stmt.target, ast.Name)
                    and stmt.value is not None
                ):
                    try:
                        defaults[stmt.target.id] = _Evaluator({})(stmt.value)
                    except (ValueError, KeyError):
                        pass
    return configs, defaults


def verify_official(repo: pathlib.Path) -> list[str]:
    """Differences between DIMS and the official source (empty when every number agrees)."""
    configs, defaults = _official_configs(repo)
    problems = []
    for preset, cls in OFFICIAL_CLASS.items():
        if cls not in configs:
            problems.append(f"{preset}: class {cls} not found in {GEMMA_PY}")
            continue
        kw = configs[cls]

        def get(field, kw=kw):
            return kw[field] if field in kw else defaults[field]

        official = {
            "V": get("num_embed"),
            "D": get("embed_dim"),
            "F": get("hidden_dim"),
            "N": get("num_heads"),
            "K": get("num_kv_heads"),
            "H": get("head_dim"),
            "L": len(get("attention_types")),
            "transpose_gating": get("transpose_gating_einsum"),
            "qk_norm": get("use_qk_norm"),
            "post_norms": get("use_post_attn_norm") and get("use_post_ffw_norm"),
        }
        # Both post norms must agree: the table has one flag for the pair.
        if get("use_post_attn_norm") != get("use_post_ffw_norm"):
            problems.append(f"{preset}: use_post_attn_norm != use_post_ffw_norm in {cls}")
        for key, value in dims(preset).items():
            if official[key] != value:
                problems.append(f"{preset}: {key} = {value} here, {official[key]} in {cls}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the golden file is stale")
    parser.add_argument(
        "--verify-official",
        type=pathlib.Path,
        metavar="REPO",
        help="compare DIMS with a google-deepmind/gemma checkout or git repo",
    )
    args = parser.parse_args(argv)
    if args.verify_official:
        problems = verify_official(args.verify_official)
        for line in problems:
            print("MISMATCH", line)
        if problems:
            return 1
        n = sum(len(v) for v in DIMS.values())
        print(f"all {n} numbers of {len(DIMS)} presets agree with {args.verify_official}")
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
    print(f"wrote {GOLDEN} ({len(DIMS)} presets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
