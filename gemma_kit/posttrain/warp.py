"""WARP (2406.16768): M RL runs from one initialisation with EMA anchors, SLERP of their task
vectors, LITI towards the initialisation over a sweep of eta as a reward-KL front, iterated.

    from gemma_kit.posttrain.warp import WARPConfig, run_warp
    result = run_warp(WARPConfig.from_file("posttrain/configs/warp_lite.toml"))

A WARPConfig is an RLConfig (the settings of each RL run: prompts, reward, RLOO / REINFORCE, the
KL coefficient, anchor = "ema" by default) plus the WARP fields. Each iteration i = 1..I:
  1. M RL runs (gemma_kit.posttrain.rl) from the current initialisation, with seeds seed + 100 i
     + m (different LoRA initialisations and rollouts), in OUT/iter_i/run_m, on all of
     prompts_file (WARP evaluates the runs itself, step 3);
  2. their merge: SLERP of the task vectors per tensor (merging.slerp; LoRA runs exactly, on
     their factors, merging.lora_slerp: a LoRA of rank M r with the same scaling), lambda =
     slerp_lambda for two runs; for M > 2 runs the merge is taken pairwise, run j entering with
     weight 1 / j (equal weights in the end). With compare_lerp, LERP (the plain average) too;
  3. LITI towards the initialisation, theta_eta = (1 - eta) theta_init + eta theta_merge, for
     every eta of eval_etas (and liti_eta): each point is evaluated on the held-out prompts
     (eval_samples rollouts per prompt, the same key for every point) for its reward and its
     EXACT KL to the ORIGINAL initialisation (per-token over the vocabulary at the visited
     states, summed over each completion: nats per sequence), as are the M runs themselves;
  4. the point at liti_eta becomes the next initialisation. With LoRA the rank would grow by M
     per iteration, so the chosen point is merged into the base weights (held in float32 from
     then on: a bfloat16 base would round small deltas away) and the next runs train a fresh
     LoRA on it.

OUT receives iter_i/ (the runs' folders), front.json (every point of every iteration),
front.png (reward against KL), summary.json, and the result: adapter/ (LoRA, one iteration: the
chosen point as an adapter of rank M r on the original base) or model/ (full fine-tuning, or
LoRA after several iterations: a model folder). Runs already finished in OUT are loaded, not
trained again, and an interrupted run is resumed (resume=True).

The paper's own values for beta, mu, M, lambda, eta and I could not be read from its text here;
the defaults (M = 2, lambda = 0.5, eta = 0.5, I = 1) are neutral choices, not the paper's.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_kit.errors import ConfigError
from gemma_kit.lora import LoRAParam, apply_lora, lora_state, merge
from gemma_kit.posttrain import merging
from gemma_kit.posttrain.prompts import read_prompts
from gemma_kit.posttrain.rewards import as_reward, call_reward, load_reward
from gemma_kit.posttrain.rl import (
    EVAL_STREAM,
    RolloutScorer,
    rollout_metrics,
    stream_seed,
    train_rl,
)
from gemma_kit.posttrain.rl_config import RLConfig
from gemma_kit.training.loop import write_json
from gemma_kit.training.model import build_model, trainable_filter

__all__ = ["WARPConfig", "WARPResult", "run_warp"]

WARP_FIELDS = ("num_runs", "slerp_lambda", "liti_eta", "eval_etas", "iterations", "compare_lerp")


@dataclasses.dataclass(frozen=True)
class WARPConfig(RLConfig):
    """RLConfig (each run's settings) plus the WARP fields; anchor defaults to "ema"."""

    anchor: str = "ema"
    num_runs: int = 2  # M
    slerp_lambda: float = 0.5  # lambda of SLERP for two runs
    liti_eta: float = 0.5  # the LITI point that initialises the next iteration
    eval_etas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    iterations: int = 1  # I
    compare_lerp: bool = True  # also evaluate LERP of the runs (WARP's SLERP-vs-LERP claim)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "eval_etas", tuple(self.eval_etas))

    def rl_config(self, iteration: int, run: int, out: pathlib.Path) -> RLConfig:
        """The settings of run `run` of iteration `iteration` (both from 0)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(RLConfig)}
        # No held-out evaluation inside a run: WARP evaluates every run itself, with the key
        # and the reference of the merges, so that all points of a front compare.
        values.update(
            seed=self.seed + 100 * iteration + run,
            out_dir=str(out),
            eval_prompts_file=None,
            eval_fraction=0.0,
        )
        return RLConfig(**values)

    def validate(self) -> WARPConfig:
        super().validate()

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        def fraction(value) -> bool:
            return (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and 0.0 <= value <= 1.0
            )

        need(
            isinstance(self.num_runs, int) and self.num_runs >= 2,
            f"num_runs (M) must be an integer >= 2, got {self.num_runs!r}",
        )
        need(
            isinstance(self.iterations, int) and self.iterations >= 1,
            f"iterations must be an integer >= 1, got {self.iterations!r}",
        )
        need(
            fraction(self.slerp_lambda),
            f"slerp_lambda must lie in [0, 1], got {self.slerp_lambda!r}",
        )
        need(
            self.num_runs == 2 or self.slerp_lambda == 0.5,
            "slerp_lambda weighs two runs; more runs merge with equal weights (leave it 0.5)",
        )
        need(fraction(self.liti_eta), f"liti_eta (eta) must lie in [0, 1], got {self.liti_eta!r}")
        need(
            len(self.eval_etas) > 0 and all(fraction(e) for e in self.eval_etas),
            f"every eta of eval_etas must lie in [0, 1], got {list(self.eval_etas)!r}",
        )
        need(
            self.method != "qlora",
            "WARP merges runs into the base weights, which QLoRA holds as int8: use method = "
            '"lora" or "full"',
        )
        need(not self.is_bond, "WARP's runs are policy-gradient runs: algo rloo or reinforce")
        need(
            self.eval_prompts_file is not None,
            "WARP evaluates every merge on held-out prompts: give eval_prompts_file (its runs "
            "have different seeds, so a split of prompts_file would differ between them)",
        )
        return self


@dataclasses.dataclass
class WARPResult:
    out_dir: pathlib.Path
    fronts: list[list[dict]]  # per iteration, every evaluated point
    chosen: list[dict]  # per iteration, the point that initialised the next one
    adapter: pathlib.Path | None
    model_dir: pathlib.Path | None
    model: Any = dataclasses.field(default=None, repr=False)


# ------------------------------------------------------------------------------------------
# Merging one iteration's runs


def pad_rank(tree, rank: int):
    """LoRA factors padded with zeros to rank `rank` (A [..., r] -> [..., rank], B [r, ...] ->
    [rank, ...]): the same delta, a shape other merges can meet."""

    def pair(p):
        r = p["a"].shape[-1]
        a = jnp.concatenate(
            [p["a"], jnp.zeros((*p["a"].shape[:-1], rank - r), p["a"].dtype)], axis=-1
        )
        b = jnp.concatenate([p["b"], jnp.zeros((rank - r, *p["b"].shape[1:]), p["b"].dtype)])
        return {"a": a, "b": b}

    return jax.tree.map(pair, tree, is_leaf=merging.is_lora_pair)


def lora_rank(tree) -> int:
    return next(iter(jax.tree.leaves(tree, is_leaf=merging.is_lora_pair)))["a"].shape[-1]


def merge_runs(runs: list, kind: str, *, lora: bool, lam: float = 0.5, init=None):
    """SLERP ("slerp") or LERP ("lerp") of M runs' values. LoRA (factor trees from the base):
    exact, a LoRA of rank M r; dense: per tensor, task vectors from `init`. Two runs: weight
    lam on the second; more: pairwise, run j entering with weight 1 / j."""
    merged = runs[0]
    for j, run in enumerate(runs[1:], start=2):
        weight = lam if len(runs) == 2 else 1.0 / j
        if lora:
            rank = max(lora_rank(merged), lora_rank(run))
            a, b = pad_rank(merged, rank), pad_rank(run, rank)
            merged = (merging.lora_slerp if kind == "slerp" else merging.lora_lerp)(a, b, weight)
        else:
            merged = (merging.slerp if kind == "slerp" else merging.lerp)(init, merged, run, weight)
    return merged


def liti_point(merged, eta: float, *, lora: bool, init=None):
    """(1 - eta) init + eta merged: B scaled by eta for a LoRA merge (init = the base)."""
    return merging.lora_liti(merged, eta) if lora else merging.liti(init, merged, eta)


# ------------------------------------------------------------------------------------------
# Evaluating points


class FrontEvaluator:
    """Reward and exact KL to a fixed reference network, of several values of one network's
    trained variables, on held-out prompts with the same rollout key for each.

    model: the network the points are values of (LoRA of the merged rank on the current base,
    or the full model). reference: (kind, values) making the same network the original
    initialisation (gemma_kit.posttrain.policy.with_trained).
    """

    def __init__(
        self,
        model,
        tokenizer,
        config: RLConfig,
        prompts,
        reward,
        *,
        kind,
        reference: tuple,
        full: bool,
    ):
        longest = prompts.longest
        length = -(-(longest + config.max_new_tokens - 1) // 8) * 8
        self.graphdef: nnx.GraphDef
        self.fixed: nnx.State
        # One State per filter: mypy cannot unpack nnx.split's variadic return type.
        self.graphdef, _, self.fixed = nnx.split(model, kind, ...)  # type: ignore[misc]
        self.scorer = RolloutScorer(
            model,
            tokenizer,
            kind=kind,
            length=length,
            chunk=config.loss_chunk,
            max_new_tokens=config.max_new_tokens,
            stop_token_ids=config.stop_token_ids,
            full=full,
        )
        self.config, self.prompts, self.reward = config, prompts, reward
        self.reference = reference

    def __call__(self, values) -> tuple[dict[str, float], list[dict]]:
        c = self.config
        roll = self.scorer.draw(
            values, self.prompts, c.eval_samples, seed=stream_seed(c.seed, EVAL_STREAM), step=0
        )
        texts = [self.prompts.texts[i] for i in roll.prompt_index]
        rewards = call_reward(self.reward, texts, roll.texts)
        rows = self.scorer.rows(roll)
        ref_kind, ref_values = self.reference
        scores = self.scorer.score(
            self.graphdef, values, self.fixed, ref_values, None, rows, kinds=(ref_kind, None)
        )
        metrics = rollout_metrics(roll, rewards, scores, rows["weights"])
        samples = [
            dict(prompt=texts[i], completion=roll.texts[i], reward=float(rewards[i]))
            for i in range(0, len(texts), c.eval_samples)
        ]
        return metrics, samples


# ------------------------------------------------------------------------------------------
# The driver


def _load_base(config: WARPConfig, model, tokenizer):
    """(base model without LoRA, tokenizer, description) in the runs' parameter dtype."""
    if model is not None:
        model = nnx.merge(*nnx.split(model))  # a shallow copy: the caller's stays untouched
    plain = config.replace(method="full", param_dtype=config.resolved_param_dtype())
    return build_model(plain, model, tokenizer)


def _trained_values(model, lora: bool, kind) -> dict:
    return merging.check_same_structure([nnx.state(model, LoRAParam if lora else kind)])[0]


def _finished(out: pathlib.Path) -> bool:
    return (out / "summary.json").is_file() and (
        (out / "adapter").is_dir() or (out / "model").is_dir()
    )


def _train_or_load(
    run_config: RLConfig, init_model, tokenizer, reward, lora: bool, kind, resume: bool, say
) -> dict:
    """The trained values of one run: loaded if it finished before, else trained (resumed
    when it has checkpoints)."""
    out = pathlib.Path(run_config.out_dir)
    if resume and _finished(out):
        say(f"{out}: finished before, loading it")
        if lora:
            from gemma_kit.lora import load_adapter

            model = nnx.merge(*nnx.split(init_model))
            load_adapter(model, out / "adapter")
        else:
            from gemma_kit.loading import load_model

            model = load_model(
                out / "model", init_model.config, jnp.dtype(run_config.resolved_param_dtype())
            )
        return _trained_values(model, lora, kind)
    again = resume and (out / "checkpoints").is_dir()
    result = train_rl(
        run_config, reward=reward, model=init_model, tokenizer=tokenizer, resume=again
    )
    return _trained_values(result.model, lora, kind)


def _eval_model(init_model, config: WARPConfig, rank: int):
    """The current initialisation with LoRA of the merged rank (alpha scaled with it, so the
    scaling alpha / rank of the runs is kept)."""
    model = nnx.merge(*nnx.split(init_model))
    apply_lora(
        model,
        rank,
        config.lora_alpha * rank / config.lora_rank,
        config.lora_targets,
        seed=config.seed,
    )
    return model


def plot_front(fronts: list[list[dict]], path: pathlib.Path) -> pathlib.Path | None:
    """Reward against KL of every evaluated point (lines for the LITI sweeps), as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for i, points in enumerate(fronts, start=1):
        for kind in ("slerp", "lerp"):
            line = sorted((p for p in points if p["merge"] == kind), key=lambda p: p["eta"])
            if line:
                ax.plot(
                    [p["kl"] for p in line],
                    [p["reward"] for p in line],
                    "o-",
                    label=f"iteration {i}: LITI of {kind.upper()}",
                )
        runs = [p for p in points if p["merge"].startswith("run")]
        ax.plot(
            [p["kl"] for p in runs],
            [p["reward"] for p in runs],
            "k^",
            label=f"iteration {i}: the RL runs" if i == 1 else None,
        )
    ax.set_xlabel("KL to the initialisation (nats per completion)")
    ax.set_ylabel("held-out reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def run_warp(
    config: WARPConfig, *, reward=None, model=None, tokenizer=None, resume: bool = False
) -> WARPResult:
    """Runs WARP as `config` describes (see the module docstring).

    reward: a callable, spec or reward model instead of config.reward. model / tokenizer: the
    initialisation instead of config.base. resume: load the runs that finished in out_dir and
    resume an interrupted one.
    """
    config = config.validate()
    out = pathlib.Path(config.out_dir).expanduser().absolute()
    if not resume and out.is_dir() and any(out.iterdir()):
        raise ConfigError(
            f"{out} is not empty: choose another out_dir, or pass --resume to "
            "continue the WARP run in it"
        )

    def say(message: str) -> None:
        if config.progress:
            print(message, file=sys.stderr)

    owns = False
    if reward is not None:
        reward_fn = as_reward(reward)
        owns = isinstance(reward, str)
    elif config.reward:
        reward_fn, owns = load_reward(config.reward, timeout=config.reward_timeout), True
    else:
        raise ConfigError("reward is required: a 'pkg.module:function' spec or 'rm:DIR'")
    try:
        return _run(config, out, reward_fn, model, tokenizer, resume, say)
    finally:
        if owns and hasattr(reward_fn, "close"):
            reward_fn.close()


def _run(config: WARPConfig, out, reward_fn, model, tokenizer, resume, say) -> WARPResult:
    lora = config.trains_lora
    kind = trainable_filter(config)
    init_model, tokenizer, base = _load_base(config, model, tokenizer)
    read_prompts(config.prompts_file, tokenizer, skip_bad_rows=config.skip_bad_rows)  # early
    assert config.eval_prompts_file is not None  # WARPConfig.validate requires it
    held = read_prompts(config.eval_prompts_file, tokenizer, skip_bad_rows=config.skip_bad_rows)
    if config.eval_max_rows is not None:
        held = held.subset(range(min(len(held), config.eval_max_rows)))
    original = init_model
    M = config.num_runs
    rank = M * config.lora_rank
    etas = sorted(set(config.eval_etas) | {config.liti_eta})
    fronts: list[list[dict]] = []
    chosen: list[dict] = []
    samples: list[dict] = []
    out.mkdir(parents=True, exist_ok=True)
    chosen_values = None
    for i in range(config.iterations):
        say(f"WARP iteration {i + 1} of {config.iterations}: {M} RL runs")
        runs = [
            _train_or_load(
                config.rl_config(i, m, out / f"iter_{i + 1}" / f"run_{m}"),
                init_model,
                tokenizer,
                reward_fn,
                lora,
                kind,
                resume,
                say,
            )
            for m in range(M)
        ]
        init_values = None if lora else _trained_values(init_model, False, kind)
        # The network every point is a value of, and the original initialisation as a value
        # of it: the original base weights with zero LoRA factors.
        if lora:
            eval_model = _eval_model(init_model, config, rank)
            reference_model = _eval_model(original, config, rank)
            ref_kind = nnx.Any(nnx.Param, LoRAParam)
            ref_values = merging.check_same_structure([nnx.state(reference_model, ref_kind)])[0]
            ref_values = jax.tree_util.tree_map_with_path(
                lambda p, x: jnp.zeros_like(x) if getattr(p[-1], "key", None) == "b" else x,
                ref_values,
            )
        else:
            eval_model, ref_kind = init_model, kind
            ref_values = _trained_values(original, False, kind)
        evaluate = FrontEvaluator(
            eval_model,
            tokenizer,
            config,
            held,
            reward_fn,
            kind=(LoRAParam if lora else kind),
            reference=(ref_kind, ref_values),
            full=not lora,
        )
        points: list[dict] = []

        def measure(
            name: str, eta, values, evaluate=evaluate, points=points, iteration=i + 1
        ) -> dict:
            metrics, shown = evaluate(values)
            point = dict(iteration=iteration, merge=name, eta=eta, **metrics)
            say(
                f"  {name}{'' if eta is None else f' eta {eta:g}'}: reward "
                f"{metrics['reward']:.4f}, KL {metrics['kl']:.4f}"
            )
            samples.extend(dict(point=f"{name} eta {eta}", **s) for s in shown)
            points.append(point)
            return point

        for m, values in enumerate(runs):
            measure(f"run_{m}", None, pad_rank(values, rank) if lora else values)
        kinds = ("slerp", "lerp") if config.compare_lerp else ("slerp",)
        best = None
        start = None  # eta = 0 is the initialisation itself, whatever the merge
        for merge_kind in kinds:
            merged = merge_runs(
                runs, merge_kind, lora=lora, lam=config.slerp_lambda, init=init_values
            )
            for eta in etas:
                values = liti_point(merged, eta, lora=lora, init=init_values)
                if eta == 0 and start is not None:
                    point = dict(start, merge=merge_kind)
                    points.append(point)
                else:
                    point = measure(merge_kind, eta, values)
                start = point if eta == 0 else start
                if merge_kind == "slerp" and eta == config.liti_eta:
                    best, chosen_values = point, values
        # liti_eta is one of etas, and the slerp merge always runs.
        assert best is not None and chosen_values is not None
        fronts.append(points)
        chosen.append(best)
        write_json(out / "front.json", dict(fronts=fronts, chosen=chosen))
        with (out / "samples.jsonl").open("w") as f:
            f.writelines(json.dumps(s) + "\n" for s in samples)
        if i + 1 < config.iterations:  # the chosen point initialises the next iteration
            if lora:
                nnx.replace_by_pure_dict(state := lora_state(eval_model), chosen_values)
                nnx.update(eval_model, state)
                merged_model = merge(eval_model)
                f32 = jax.tree.map(
                    lambda x: x.astype(jnp.float32), nnx.state(merged_model, nnx.Param)
                )
                nnx.update(merged_model, f32)
                init_model = merged_model
            else:
                init_model = nnx.merge(*nnx.split(init_model))
                nnx.update(init_model, nnx.State(chosen_values))
    return _finish(
        config,
        out,
        base,
        init_model,
        eval_model if lora else None,
        chosen_values,
        tokenizer,
        fronts,
        chosen,
        lora,
    )


def _finish(
    config, out, base, init_model, eval_model, values, tokenizer, fronts, chosen, lora
) -> WARPResult:
    from gemma_kit.lora import save_adapter
    from gemma_kit.training.model import save_full

    adapter = model_dir = None
    if lora:
        state = lora_state(eval_model)
        nnx.replace_by_pure_dict(state, values)
        nnx.update(eval_model, state)
        final = eval_model
        if config.iterations == 1:
            adapter = save_adapter(
                final,
                out / "adapter",
                overwrite=True,
                extra=dict(base=base, method="lora", warp=chosen[-1]),
            )
        else:
            final = merge(eval_model)
            model_dir = save_full(final, tokenizer, out / "model")
    else:
        final = nnx.merge(*nnx.split(init_model))
        nnx.update(final, nnx.State(values))
        model_dir = save_full(final, tokenizer, out / "model")
    png = plot_front(fronts, out / "front.png")
    write_json(
        out / "summary.json",
        dict(
            base=base,
            method=config.method,
            iterations=config.iterations,
            runs=config.num_runs,
            chosen=chosen,
            adapter=adapter,
            model=model_dir,
            front_png=png,
        ),
    )
    return WARPResult(out, fronts, chosen, adapter, model_dir, final)
