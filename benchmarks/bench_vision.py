#!/usr/bin/env python
"""CPU time to read and encode one image for Gemma 3 (SigLIP So400m/14 at 896x896).

    python benchmarks/bench_vision.py              # full run (~5 min on 2 busy cores)
    python benchmarks/bench_vision.py --markdown   # the table as markdown
    python benchmarks/bench_vision.py --no-hf      # without the transformers baseline
    python benchmarks/bench_vision.py --smoke      # a tiny encoder: checks the script in seconds

What one image costs before the text model sees it, in three parts, each the best of --rounds
rounds after a warm-up call (compilation is reported apart):

- preprocess: gemma_kit.vision.preprocess_image on a 1600x1200 RGB photo-sized image drawn with
  Pillow (RGB conversion, bilinear antialiased resize to 896x896, normalisation), on the host;
- encode: the compiled Transformer.encode_images path (patch embedding, 27 encoder blocks over
  4096 patches, 4x4 average pooling, mm_soft_embedding_norm, mm_input_projection to the 4B's
  embed dim 2560), float32 as the released checkpoints store the encoder, random weights of the
  official shapes (the cost does not depend on their values);
- transformers: the same computation in the same run with transformers' SiglipVisionModel and
  the Gemma 3 projector (Gemma3ForConditionalGeneration.get_image_features), float32, torch
  threads = cores: the baseline to quote the encode time against.

The model FLOPs of one encode (2 per multiply-add; the attention's two products included) are
printed with the achieved GFLOP/s. Speeds on shared machines move from minute to minute: quote
the ratio to transformers, measured under the same conditions.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from _log import log  # noqa: E402  (benchmarks/ is on sys.path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (best is kept)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument(
        "--smoke", action="store_true", help="tiny encoder, one round: checks the script"
    )
    return p.parse_args(argv)


def encoder_flops(v, embed_dim: int) -> float:
    """Model FLOPs of encoding one image (multiply-adds x 2)."""
    P, W, F, p = v.num_patches, v.width, v.mlp_dim, v.patch_size
    patch = P * (p * p * 3) * W
    block = 4 * P * W * W + 2 * P * P * W + 2 * P * W * F  # q, k, v, out; QK^T and AV; MLP
    return 2.0 * (patch + v.depth * block + v.num_soft_tokens * W * embed_dim)


def best_of(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from PIL import Image, ImageDraw

    from gemma_kit.config import VisionConfig, get_preset
    from gemma_kit.transformer import Transformer
    from gemma_kit.vision.preprocess import preprocess_image

    config = get_preset("gemma3-4b")
    if args.smoke:
        config = config.replace(
            vocab_size=256,
            embed_dim=32,
            hidden_dim=48,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            layers=config.layers[:1],
            query_pre_attn_scalar=16,
            vision_config=VisionConfig(
                width=16,
                depth=2,
                mlp_dim=24,
                num_heads=2,
                patch_size=14,
                image_size=56,
                num_soft_tokens=4,
            ),
        )
        args.rounds = 1
    vision = config.vision
    assert vision is not None  # the preset has an image encoder
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1  # os.cpu_count() may not know
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    # A photo-sized picture with structure at every scale.
    rng = np.random.default_rng(0)
    photo = Image.new("RGB", (1600, 1200), (90, 140, 200))
    draw = ImageDraw.Draw(photo)
    for _ in range(40):
        x0, x1 = sorted(rng.integers(0, 1600, 2))
        y0, y1 = sorted(rng.integers(0, 1200, 2))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))

    log(
        "building the encoder with random weights of the official shapes (text layers "
        "are not built: only the image path is timed)"
    )
    # Only the image path: a one-layer, 256-token text model around the full encoder and the
    # projection to the real embed dim.
    small_text = config.replace(layers=config.layers[:1], vocab_size=256)
    abstract = nnx.eval_shape(lambda: Transformer(small_text, with_vision=True))
    graphdef, state = nnx.split(abstract)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.02, s.shape).astype(s.dtype)),
        nnx.to_pure_dict(state),
    )
    nnx.replace_by_pure_dict(state, params)
    n_params = sum(x.size for x in jax.tree.leaves(params["vision_encoder"]))
    n_params += sum(
        x.size
        for k, leaves in params["embedder"].items()
        if k.startswith("mm_")
        for x in jax.tree.leaves(leaves)
    )

    @jax.jit
    def encode(state, pixels):
        return nnx.merge(graphdef, state).encode_images(pixels)

    rows = []
    log("preprocess: warm-up")
    pixels = preprocess_image(photo, vision.image_size)
    t_pre = best_of(lambda: preprocess_image(photo, vision.image_size), args.rounds)
    size = vision.image_size
    rows.append((f"preprocess (Pillow, 1600x1200 -> {size}x{size})", t_pre, None))
    log(f"preprocess: {t_pre * 1e3:.1f} ms")

    batch = jnp.asarray(pixels[None])
    start = time.perf_counter()
    encode(state, batch).block_until_ready()
    compile_s = time.perf_counter() - start
    log(f"encode: compiled and ran once in {compile_s:.1f} s")
    t_enc = best_of(lambda: encode(state, batch).block_until_ready(), args.rounds)
    flops = encoder_flops(vision, config.embed_dim)
    rows.append(("encode (gemma_kit, jit, f32)", t_enc, None))
    log(f"encode: {t_enc:.2f} s ({flops / t_enc / 1e9:.0f} GFLOP/s)")

    t_hf = None
    if not args.no_hf:
        import torch
        import transformers

        torch.set_num_threads(cores)
        log("transformers: building Gemma3ForConditionalGeneration's image path")
        hf_config = transformers.Gemma3Config(
            text_config=transformers.Gemma3TextConfig(
                vocab_size=256,
                hidden_size=config.embed_dim,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=32,
            ),
            vision_config=transformers.SiglipVisionConfig(
                hidden_size=vision.width,
                intermediate_size=vision.mlp_dim,
                num_hidden_layers=vision.depth,
                num_attention_heads=vision.num_heads,
                image_size=vision.image_size,
                patch_size=vision.patch_size,
                vision_use_head=False,
            ),
            mm_tokens_per_image=vision.num_soft_tokens,
        )
        hf_config._attn_implementation = "eager"
        hf_model = transformers.Gemma3ForConditionalGeneration(hf_config).eval()
        tensor = torch.tensor(pixels.transpose(2, 0, 1)[None])

        def run_hf():
            with torch.no_grad():
                hf_model.model.get_image_features(tensor)

        log("transformers: warm-up")
        run_hf()
        t_hf = best_of(run_hf, args.rounds)
        rows.append(("encode (transformers, eager, f32)", t_hf, None))
        log(f"transformers: {t_hf:.2f} s")

    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {platform.processor() or platform.machine()}, {cores} cores, load "
        f"{load_start:.1f} -> {load_end:.1f}; jax {jax.__version__}; encoder "
        f"{n_params / 1e6:.0f}M parameters ({'smoke' if args.smoke else 'So400m/14'}), "
        f"{vision.image_size}x{vision.image_size}, {flops / 1e12:.2f} TFLOP per image; "
        f"best of {args.rounds}; compile {compile_s:.1f} s"
    )
    header = ("what", "seconds per image", "GFLOP/s", "vs transformers")
    table = []
    for name, t, _ in rows:
        gflops = f"{flops / t / 1e9:.0f}" if name.startswith("encode") else ""
        ratio = f"{t_hf / t:.2f}x" if t_hf and name.startswith("encode (gemma") else ""
        table.append((name, f"{t:.3f}", gflops, ratio))
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in table:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
        for row in [header, *table]:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
