"""The WARP-lite worked example: two RLOO runs of the embedded Gemma 3 270M (LoRA) against VADER
sentiment, merged by SLERP and by LERP, LITI towards the base over eta in {0, .25, .5, .75, 1}.

    python posttrain/warp_example.py [--resume]        (~15 min on 2 cores)

Runs posttrain/configs/warp_lite.toml (gemma_kit.posttrain.warp.run_warp; its folder is
runs/warp_lite) and writes posttrain/results/warp_lite.json: every point of the front (held-out
reward and exact KL to the base), and the comparison WARP's paper makes, SLERP's front against
LERP's at matched KL: for each LERP point, SLERP's reward at the same KL, interpolated linearly
along SLERP's front (points outside SLERP's KL range are not compared). Also
docs/images/warp_front.png.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from rl_example import machine  # noqa: E402  (this folder's helper)


def matched(slerp: list[dict], lerp: list[dict]) -> list[dict]:
    """For each LERP point inside SLERP's KL range: SLERP's reward at its KL (linear
    interpolation between SLERP's neighbouring points) minus LERP's."""
    line = sorted(slerp, key=lambda p: p["kl"])
    out = []
    for p in sorted(lerp, key=lambda p: p["kl"]):
        for a, b in zip(line, line[1:]):
            if a["kl"] <= p["kl"] <= b["kl"] and b["kl"] > a["kl"]:
                t = (p["kl"] - a["kl"]) / (b["kl"] - a["kl"])
                at = a["reward"] + t * (b["reward"] - a["reward"])
                out.append(
                    dict(
                        eta=p["eta"],
                        kl=p["kl"],
                        lerp_reward=p["reward"],
                        slerp_reward_at_kl=at,
                        slerp_minus_lerp=at - p["reward"],
                    )
                )
                break
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--resume",
        action="store_true",
        help="load the runs that finished and resume an interrupted one",
    )
    args = parser.parse_args(argv)
    from gemma_kit.posttrain.warp import WARPConfig, run_warp

    config = WARPConfig.from_file(HERE / "configs" / "warp_lite.toml")
    start = time.time()
    result = run_warp(config, resume=args.resume)
    seconds = time.time() - start
    points = result.fronts[0]
    slerp = [p for p in points if p["merge"] == "slerp"]
    lerp = [p for p in points if p["merge"] == "lerp"]
    runs = [p for p in points if p["merge"].startswith("run")]
    comparison = matched(slerp, lerp)
    report = dict(
        config="posttrain/configs/warp_lite.toml",
        machine=machine(),
        seconds=round(seconds, 1),
        runs=runs,
        slerp=slerp,
        lerp=lerp,
        slerp_vs_lerp_at_matched_kl=comparison,
        chosen=result.chosen[0],
    )
    (HERE / "results" / "warp_lite.json").write_text(json.dumps(report, indent=2) + "\n")
    images = ROOT / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.out_dir / "front.png", images / "warp_front.png")
    print(f"WARP-lite on {report['machine']}: {report['seconds']} s")
    print(f"{'point':>8} {'eta':>5}  {'reward':>7}  {'KL (nats)':>9}")
    for p in runs + slerp + lerp:
        eta = "-" if p["eta"] is None else f"{p['eta']:g}"
        print(f"{p['merge']:>8} {eta:>5}  {p['reward']:>7.4f}  {p['kl']:>9.4f}")
    for c in comparison:
        print(
            f"at KL {c['kl']:.4f} (LERP eta {c['eta']:g}): SLERP {c['slerp_reward_at_kl']:.4f}"
            f" vs LERP {c['lerp_reward']:.4f} ({c['slerp_minus_lerp']:+.4f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
