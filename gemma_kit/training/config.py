"""The settings of a training run: one frozen dataclass, read from TOML or JSON or built in code.

    config = TrainConfig.from_file("finetune/configs/lora_270m.toml")
    config = config.replace(steps=50, out_dir="runs/try")        # overrides (CLI flags)

Relative paths in a config file are taken relative to that file's folder, so a config and its
data can travel together; paths given in code or as flags are relative to the working directory.

Every objective's settings are this class or a subclass of it (dataclass inheritance), so that
reading files, `--set key=value`, to_dict and the resume checks work the same for all of them:

    @dataclasses.dataclass(frozen=True)
    class DistillConfig(TrainConfig):
        teacher: str = ""
        beta: float = 0.5
        PATH_FIELDS: ClassVar[tuple[str, ...]] = TrainConfig.PATH_FIELDS + ("teacher",)
        RESUME_FIELDS: ClassVar[tuple[str, ...]] = TrainConfig.RESUME_FIELDS + ("teacher",)

        def validate(self):
            super().validate()     # the shared checks (and validate_data)
            ...                    # then the new fields'; return self

A subclass whose data is not `train_file` overrides `validate_data`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import pathlib
import tomllib
from typing import Any, ClassVar, Self

from gemma_kit.config import Config
from gemma_kit.errors import ConfigError

METHODS = ("lora", "qlora", "full")
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "f32": "float32"}
PATH_FIELDS = ("train_file", "eval_file", "out_dir", "base", "tokenizer")
# Settings that fix which rows a step sees; a resumed run must keep them.
DATA_ORDER_FIELDS = (
    "train_file",
    "eval_file",
    "eval_fraction",
    "max_length",
    "packing",
    "skip_bad_rows",
    "batch_size",
    "grad_accum",
    "seed",
)
# Settings that fix the shape of the trained variables.
MODEL_FIELDS = ("method", "quant", "lora_rank", "lora_alpha", "lora_targets")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs. See finetune/README.md for a walk through the fields."""

    # Fields that hold paths (relative ones in a config file are taken from the file's folder).
    PATH_FIELDS: ClassVar[tuple[str, ...]] = PATH_FIELDS
    # Fields a resumed run must keep (the data order and the trained variables' shapes).
    RESUME_FIELDS: ClassVar[tuple[str, ...]] = DATA_ORDER_FIELDS + MODEL_FIELDS

    # Data (JSONL; see gemma_kit.finetune.data for the row shapes).
    train_file: str = ""
    eval_file: str | None = None  # default: hold out eval_fraction of train_file's rows
    eval_fraction: float = 0.05
    max_length: int = 512  # tokens per training row
    packing: bool = True  # several examples per row (attention never crosses them)
    skip_bad_rows: bool = False  # skip and count malformed rows instead of stopping

    # Model.
    base: str = "default"  # checkpoint folder, or "default" for the embedded Gemma 3 270M
    preset: str | Config | None = None  # default: inferred from the checkpoint's shapes
    tokenizer: str | None = None  # default: tokenizer.model in or beside `base`
    method: str = "lora"  # lora | qlora (quantized frozen base, see quant) | full
    quant: str = "int8"  # qlora's frozen base: int8 (per channel) | int4 (groups of 32)
    param_dtype: str | None = None  # base weights; default bfloat16 (LoRA), float32 (full)
    compute_dtype: str = "auto"  # auto: bfloat16 on accelerators, float32 on CPU
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("all",)  # all | attn | mlp | q | kv | o | gating | linear

    # Optimisation: AdamW, linear warmup then cosine decay, clipping by global norm.
    steps: int | None = None  # optimizer steps; or give epochs
    epochs: float | None = None
    batch_size: int = 8  # rows per optimizer step (= grad_accum micro-batches)
    grad_accum: int = 1
    learning_rate: float = 2e-4
    warmup_steps: int = 10
    min_lr_fraction: float = 0.1  # the cosine ends at learning_rate * this
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    seed: int = 0  # LoRA init, eval split and data order
    loss_chunk: int = 1024  # tokens per logits chunk (bounds the [tokens, V] logits memory)

    # Devices: a (data, fsdp) mesh; batches are split over both, weights over fsdp.
    mesh_data: int = 1
    mesh_fsdp: int = 1
    # Multi-host: call jax.distributed.initialize() first. On SLURM, Open MPI, Cloud TPU and
    # Kubernetes JAX finds the rest itself; elsewhere give the coordinator's host:port (or set
    # JAX_COORDINATOR_ADDRESS), the number of processes and this process's index.
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    # Output and bookkeeping.
    out_dir: str = ""
    save_every: int = 100  # checkpoint every N steps (and at the end, and on Ctrl-C)
    keep_checkpoints: int = 3
    eval_every: int = 100  # held-out loss every N steps (and before and after)
    eval_max_rows: int | None = None  # cap the held-out rows evaluated
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.lora_targets, str):
            object.__setattr__(self, "lora_targets", (self.lora_targets,))
        else:
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    # -- building -------------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls,
        values: dict[str, Any],
        *,
        base_dir: str | os.PathLike | None = None,
        source: str = "config",
    ) -> TrainConfig:
        """From a flat dict; unknown keys are an error (with the closest known name).

        Keys starting with "_" are comments (JSON has no other kind) and are ignored.
        """
        values = {k: v for k, v in values.items() if not str(k).startswith("_")}
        cls.check_names(values, source)
        if base_dir is not None:
            for key in cls.PATH_FIELDS:
                value = values.get(key)
                if isinstance(value, str) and value and value != "default":
                    p = pathlib.Path(value).expanduser()
                    values[key] = str(p if p.is_absolute() else pathlib.Path(base_dir) / p)
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        """Reads a .toml or .json file (a flat table of the fields above)."""
        path = pathlib.Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        text = path.read_text()
        try:
            if path.suffix == ".json":
                values = json.loads(text)
            elif path.suffix == ".toml":
                values = tomllib.loads(text)
            else:
                raise ConfigError(f"{path}: use a .toml or .json config file")
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"{path} is not valid {path.suffix[1:].upper()}: {err}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a table of settings at the top level")
        return cls.from_dict(values, base_dir=path.parent.absolute(), source=str(path))

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def with_overrides(self, changes: dict[str, Any], *, source: str = "--set") -> TrainConfig:
        """replace() with unknown names reported as a ConfigError (with the closest name)."""
        self.check_names(changes, source)
        return dataclasses.replace(self, **changes)

    @classmethod
    def check_names(cls, values: dict[str, Any], source: str) -> None:
        """ConfigError for the first key of `values` that is not a field of this class."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{source}: unknown setting {key!r}{hint}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (tuples as lists, a Config preset by its name): what
        OUT_DIR/config.json holds and what a resumed run is compared with."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in out.items():
            if isinstance(value, Config):
                out[key] = value.name
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                out[key] = dataclasses.asdict(value)
            elif isinstance(value, tuple):
                out[key] = list(value)
        return out

    # -- checking -------------------------------------------------------------------------
    def validate(self) -> Self:
        """Raises ConfigError naming the first bad setting; returns self."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        self.validate_data()
        need(bool(self.out_dir), "out_dir is required (the folder for checkpoints and results)")
        need(
            self.method in METHODS,
            f"method must be one of {', '.join(METHODS)}, got {self.method!r}",
        )
        need(self.quant in ("int8", "int4"), f"quant must be int8 or int4, got {self.quant!r}")
        for name in ("param_dtype",):
            value = getattr(self, name)
            need(
                value is None or value in DTYPES,
                f"{name} must be bfloat16 or float32, got {value!r}",
            )
        need(
            self.compute_dtype == "auto" or self.compute_dtype in DTYPES,
            f"compute_dtype must be auto, bfloat16 or float32, got {self.compute_dtype!r}",
        )
        need((self.steps is None) != (self.epochs is None), "give exactly one of steps and epochs")
        need(
            self.steps is None or (isinstance(self.steps, int) and self.steps >= 1),
            f"steps must be an integer >= 1, got {self.steps!r}",
        )
        need(self.epochs is None or self.epochs > 0, f"epochs must be > 0, got {self.epochs!r}")
        positive_ints = dict(
            max_length=self.max_length,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            lora_rank=self.lora_rank,
            save_every=self.save_every,
            keep_checkpoints=self.keep_checkpoints,
            eval_every=self.eval_every,
            loss_chunk=self.loss_chunk,
            mesh_data=self.mesh_data,
            mesh_fsdp=self.mesh_fsdp,
        )
        for name, value in positive_ints.items():
            need(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{name} must be an integer >= 1, got {value!r}",
            )
        need(self.max_length >= 2, f"max_length must be >= 2, got {self.max_length}")
        need(
            self.batch_size % self.grad_accum == 0,
            f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})",
        )
        devices = self.mesh_data * self.mesh_fsdp
        micro = self.batch_size // self.grad_accum
        need(
            micro % devices == 0,
            f"each micro-batch (batch_size / grad_accum = {micro} rows) must split evenly over "
            f"the mesh_data x mesh_fsdp = {devices} devices",
        )
        need(
            0 <= self.eval_fraction < 1,
            f"eval_fraction must be in [0, 1), got {self.eval_fraction}",
        )
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(
            isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
            f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}",
        )
        need(
            0 <= self.min_lr_fraction <= 1,
            f"min_lr_fraction must be in [0, 1], got {self.min_lr_fraction}",
        )
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        need(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        need(
            self.eval_max_rows is None or self.eval_max_rows >= 1,
            f"eval_max_rows must be >= 1 or unset, got {self.eval_max_rows!r}",
        )
        if self.method != "full":
            from gemma_kit.lora import resolve_targets

            resolve_targets(self.lora_targets)
        return self

    def validate_data(self) -> None:
        """The checks of the data fields (a subclass with other data overrides this)."""
        if not self.train_file:
            raise ConfigError("train_file is required (a JSONL file of examples)")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum

    @property
    def trains_lora(self) -> bool:
        return self.method in ("lora", "qlora")

    def resolved_param_dtype(self) -> str:
        if self.param_dtype is not None:
            return DTYPES[self.param_dtype]
        return "float32" if self.method == "full" else "bfloat16"

    def resolved_compute_dtype(self) -> str:
        if self.compute_dtype != "auto":
            return DTYPES[self.compute_dtype]
        import jax

        # XLA's CPU backend is slower in bf16 than in f32 (gemma_kit.layers explains);
        # accelerators are the opposite.
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """["learning_rate=1e-4", "lora_targets=['attn']", "base=ckpt/"] -> typed values.

    Each value is read as a TOML value (numbers, true/false, quoted strings, [lists]); anything
    that is not one is taken as a plain string, so paths need no quotes.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE, got {pair!r}")
        try:
            value = tomllib.loads(f"value = {text.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        out[key.strip().replace("-", "_")] = value
    return out
