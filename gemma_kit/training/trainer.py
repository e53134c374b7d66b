"""The state of a run on its devices: trained and fixed variables, optimizer state, the compiled
step of the objective's loss, placement of batches and frozen pytrees, Orbax checkpoints.

    trainer = Trainer(config, model, steps, CrossEntropy(config.loss_chunk), mesh)
    metrics = trainer.step(trainer.place(host_batch, batch_axis=1), frozen)   # floats
    loss_sum, normaliser, metrics = trainer.loss_sums(trainer.place(rows, batch_axis=0))

On a (data, fsdp) mesh, batches are split over both axes by rows, weights are placed by the
name rules of gemma_kit.sharding (fsdp splits the embedding dimension; LoRA factors stay whole),
the optimizer state follows the trained variables, and frozen pytrees are placed like weights
(dicts and States by their names, anything else replicated). Every process holds the whole
(cheap) host batch and hands JAX only the slices its own devices hold, so the same code runs on
one host or many (jax.distributed).
"""

from __future__ import annotations

import collections.abc
from typing import Any

import jax
import numpy as np
from flax import nnx

from gemma_kit.errors import TrainingError
from gemma_kit.training.config import TrainConfig
from gemma_kit.training.model import trainable_filter
from gemma_kit.training.optimizer import optimizer_key
from gemma_kit.training.step import LossFn, cached_optimizer, compiled_step


def micro_batches(batch: dict[str, np.ndarray], grad_accum: int) -> dict[str, np.ndarray]:
    """Host arrays [A * b, ...] -> [A, b, ...]: the shape Trainer.step takes (A = grad_accum)."""
    return {
        k: v.reshape(grad_accum, v.shape[0] // grad_accum, *v.shape[1:]) for k, v in batch.items()
    }


class Trainer:
    """Holds the split model, the optimizer and the compiled step; knows how to save/restore."""

    def __init__(
        self,
        config: TrainConfig,
        model,
        steps: int,
        loss: LossFn,
        mesh=None,
        *,
        keep_model: bool = True,
        trainable=None,
    ):
        """loss: the objective's loss function (gemma_kit.training.losses); it keys the compiled
        step, so it must be hashable and equal for equal settings (a frozen dataclass).

        keep_model: copy the trainable arrays first. The step donates its inputs' buffers,
        so without a copy the trainable arrays `model` holds are consumed by the first step
        (what a run does with a model it loaded itself: no second copy of the weights).

        trainable: the nnx filter of the variables the step trains (Objective.trainable);
        default gemma_kit.training.model.trainable_filter(config)."""
        self.config = config
        self.mesh = mesh
        self.loss = loss
        self.kind = trainable_filter(config) if trainable is None else trainable
        self.graphdef: nnx.GraphDef
        # One State per filter: mypy cannot unpack nnx.split's variadic return type.
        self.graphdef, trainable, fixed = nnx.split(model, self.kind, ...)  # type: ignore[misc]
        if not jax.tree.leaves(trainable):
            raise TrainingError(f"the model has no variables to train for method {config.method!r}")
        if keep_model:
            trainable = jax.tree.map(lambda x: jax.device_put(x, may_alias=False), trainable)
        if mesh is not None:
            from gemma_kit.sharding import shard_params

            trainable = shard_params(trainable, mesh)
            fixed = shard_params(fixed, mesh)
        else:
            # Committed to one device, as the step's outputs are: jit compiles separately for
            # uncommitted and committed inputs, which would cost a second compile at step 2.
            device = jax.local_devices()[0]
            trainable, fixed = jax.device_put((trainable, fixed), device)
        self.trainable, self.fixed = trainable, fixed
        settings = optimizer_key(config)
        self.optimizer, self.schedule = cached_optimizer(settings, steps)
        # Eagerly: zeros_like keeps each parameter's sharding for its moments; the step counter
        # is then placed like the rest (committed), as the step's outputs will be.
        self.opt_state = self._commit(self.optimizer.init(trainable))
        placement = None
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            leaves, treedef = jax.tree.flatten(
                (
                    jax.tree.map(lambda x: x.sharding, self.trainable),
                    jax.tree.map(lambda x: x.sharding, self.opt_state),
                    NamedSharding(mesh, PartitionSpec()),
                )
            )
            placement = (treedef, tuple(leaves))
        self.compiled = compiled_step(self.graphdef, loss, settings, steps, placement)

    def _replicated(self) -> jax.sharding.Sharding:
        """Device 0, or every device of the mesh holding the whole array."""
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        from jax.sharding import NamedSharding, PartitionSpec

        return NamedSharding(self.mesh, PartitionSpec())

    def _commit(self, tree):
        """Places uncommitted arrays of `tree` (replicated over the mesh, or on device 0)."""
        from gemma_kit.sharding import put

        target = self._replicated()
        return jax.tree.map(lambda x: x if getattr(x, "committed", False) else put(x, target), tree)

    @property
    def trainable_count(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.trainable)))

    def model(self):
        """The model with the current trained variables (sharing their arrays)."""
        return nnx.merge(self.graphdef, self.trainable, self.fixed)

    # -- arrays on devices ----------------------------------------------------------------
    def place(self, batch: dict[str, np.ndarray], batch_axis: int) -> dict[str, jax.Array]:
        """Host arrays -> device arrays, rows (axis batch_axis) split over the data and fsdp
        axes of the mesh."""
        if self.mesh is None:
            return jax.device_put(batch, jax.local_devices()[0])
        from jax.sharding import NamedSharding, PartitionSpec

        spec = [None] * batch_axis + [("data", "fsdp")]
        sharding = NamedSharding(self.mesh, PartitionSpec(*spec))
        return {
            k: jax.make_array_from_callback(v.shape, sharding, v.__getitem__)
            for k, v in batch.items()
        }

    def place_frozen(self, tree: Any) -> Any:
        """A frozen pytree placed as the compiled step expects it: on device 0, or on the mesh
        (a dict or nnx.State of model variables by the sharding rules of their names, any other
        pytree replicated). Arrays already placed so are not copied."""
        if tree is None:
            return None
        if self.mesh is None:
            return jax.device_put(tree, jax.local_devices()[0])
        from gemma_kit.sharding import put, shard_params

        if isinstance(tree, (nnx.State, collections.abc.Mapping)):
            return shard_params(tree, self.mesh)
        return jax.tree.map(lambda x: put(x, self._replicated()), tree)

    # -- compiled work --------------------------------------------------------------------
    def step(self, batch: dict[str, jax.Array], frozen: Any = None) -> dict[str, float]:
        """One optimizer step on placed batch [grad_accum, micro_batch, ...]; its metrics."""
        c = self.config
        for name, x in batch.items():
            if tuple(x.shape[:2]) != (c.grad_accum, c.micro_batch):
                raise TrainingError(
                    f"batch array {name!r} has shape {tuple(x.shape)}; a step takes "
                    f"[grad_accum, micro_batch, ...] = [{c.grad_accum}, {c.micro_batch}, ...] "
                    "(gemma_kit.training.trainer.micro_batches makes it)"
                )
        self.trainable, self.opt_state, metrics = self.compiled.step(
            self.trainable, self.opt_state, self.fixed, self.place_frozen(frozen), batch
        )
        return {k: float(v) for k, v in metrics.items()}

    def loss_sums(
        self, batch: dict[str, jax.Array], frozen: Any = None
    ) -> tuple[float, float, dict[str, float]]:
        """(loss_sum, normaliser, metrics) of the loss on placed batch [b, ...], no update."""
        loss, normaliser, metrics = self.compiled.loss(
            self.trainable, self.fixed, self.place_frozen(frozen), batch
        )
        return float(loss), float(normaliser), {k: float(v) for k, v in metrics.items()}

    # -- checkpoints ----------------------------------------------------------------------
    def manager(self, directory):
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.config.keep_checkpoints,
            create=True,
            # Synchronous: on CPU a jax array and the host copy orbax writes from can be the same
            # memory, which the next step (donating its inputs) would overwrite mid-write.
            enable_async_checkpointing=False,
        )
        return ocp.CheckpointManager(directory, options=options)

    def save(self, manager, step: int, progress: dict, extra: Any = None) -> None:
        """Saves the trained variables, the optimizer state, `progress` (JSON) and the
        objective's arrays `extra` (a pytree of arrays, or None) as checkpoint `step`."""
        import orbax.checkpoint as ocp

        items = dict(
            trainable=ocp.args.StandardSave(nnx.to_pure_dict(self.trainable)),
            opt_state=ocp.args.StandardSave({"leaves": jax.tree.leaves(self.opt_state)}),
            progress=ocp.args.JsonSave(progress),
        )
        if extra is not None:
            items["objective"] = ocp.args.StandardSave(extra)
        manager.save(step, args=ocp.args.Composite(**items), force=True)
        manager.wait_until_finished()

    def restore(self, manager, step: int, extra: Any = None) -> tuple[dict, Any]:
        """(progress, objective arrays) of checkpoint `step`; the trained variables and the
        optimizer state are restored in place. `extra`: the objective's arrays as they are now
        (the template: shapes, dtypes and placement; host arrays come back replicated)."""
        import orbax.checkpoint as ocp

        def abstract(tree):
            def one(x):
                if isinstance(x, jax.Array):
                    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                x = np.asarray(x)
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._replicated())

            return jax.tree.map(one, tree)

        pure = nnx.to_pure_dict(self.trainable)
        leaves, treedef = jax.tree.flatten(self.opt_state)
        items = dict(
            trainable=ocp.args.StandardRestore(abstract(pure)),
            opt_state=ocp.args.StandardRestore(abstract({"leaves": leaves})),
            progress=ocp.args.JsonRestore(),
        )
        if extra is not None:
            items["objective"] = ocp.args.StandardRestore(abstract(extra))
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:  # orbax raises many types; the user needs one clear message
            raise TrainingError(
                f"cannot restore checkpoint step {step} from {manager.directory} "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); it does not fit "
                "this run's model, method and objective, or it is damaged"
            ) from err
        nnx.replace_by_pure_dict(self.trainable, restored["trainable"])
        self.opt_state = jax.tree.unflatten(treedef, restored["opt_state"]["leaves"])
        arrays = restored["objective"] if extra is not None else None
        return dict(restored["progress"]), arrays
