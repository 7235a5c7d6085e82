"""Training set-up: everything one fold's loop and finalize step need, as one `Run`.

`setup(config, workdir, fold, data_plan, init_path) -> Run` builds, in order: the mesh
(`distributed.make_mesh`, every device of every process), the data (`train_data`), the model
(random, or `config.init_from` loaded through `sipak_jax.pretrained`), its metadata
(`model_io.ModelMetadata`, written to `workdir/metadata.json` so the workdir is a model DIR from
the start), the optimizer, the replicated `TrainState`, the jitted steps and the checkpointer,
and restores the latest checkpoint when there is one (an exact resume).

`locate_weights(config)` checks `config.init_from` before anything is created: a model DIR, a
weights file, or an official file name found in the weights cache; anything else is a
`console.UserError` naming the command that makes it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sipak_jax import checkpointing, distributed, model_io, preprocessing, train_data
from sipak_jax.console import UserError
from sipak_jax.train_step import (
    TrainMetrics,
    TrainState,
    create_model,
    init_state,
    jit_steps,
    make_optimizer,
    model_dict,
    replicate,
    with_model_dict,
)
from tfds_sipakmed import taxonomy as taxonomies


@dataclasses.dataclass
class Run:
    """One fold's training: configuration, data, model pieces, jitted steps, checkpoints."""

    config: Any
    workdir: str
    fold: int
    mesh: jax.sharding.Mesh
    data: train_data.Data
    data_plan: train_data.DataPlan
    taxonomy: taxonomies.Taxonomy
    metadata: model_io.ModelMetadata
    graphdef: Any
    rest: tuple
    schedules: dict
    state: TrainState
    full_step: Callable
    head_step: Callable | None
    eval_step: Callable
    empty_metrics: Callable[[], TrainMetrics]
    ckpt: checkpointing.Checkpointer
    start_step: int = 0

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    @property
    def spec(self) -> dict:
        return self.metadata.preprocessing

    @property
    def steps_per_epoch(self) -> int:
        return self.data.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return int(self.config.num_epochs) * self.steps_per_epoch

    @property
    def head_steps(self) -> int:
        return int(self.config.head_epochs) * self.steps_per_epoch

    def model(self, state: TrainState | None = None) -> nnx.Module:
        """The model with `state`'s (default: the current) weights on the host, eval mode."""
        state = self.state if state is None else state
        params, stats = jax.device_get((state.params, state.batch_stats))
        model = nnx.merge(self.graphdef, params, stats, *self.rest)
        model.eval()
        return model


# ---- Weights ---------------------------------------------------------------------------------


def locate_weights(config) -> str:
    """The file or model DIR `config.init_from` names ('' for from scratch); reads only."""
    if not config.init_from:
        return ""
    path = os.path.abspath(os.path.expanduser(config.init_from))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, model_io.METADATA_FILE)):
            raise UserError(
                f"config.init_from={config.init_from} is a directory without "
                f"{model_io.METADATA_FILE}: not a model DIR. Make one with python -m "
                "sipak_jax.convert --source=torchvision --input=FILE.pth --output=DIR"
            )
        return path
    if os.path.isfile(path):
        return path
    from sipak_jax import convert  # TF-free; reads no weights here

    try:
        return convert.resolve_input(config.init_from)
    except FileNotFoundError:
        name = os.path.basename(config.init_from)
        if config.model.get("name") == "vit":
            raise UserError(
                f"config.init_from={config.init_from}: no such file or model DIR. Convert ViT "
                "weights once: python -m sipak_jax.convert --source=timm "
                "--arch=vit_base_patch16_224 --input=model.safetensors "
                f"--output={config.init_from} (or --source=torchvision --arch=vit_b_16 "
                "--input=vit_b_16-c867db91.pth); or pass --config.init_from='' to train from "
                "scratch"
            ) from None
        source = "keras" if name.endswith(".h5") else "torchvision"
        arch = convert.official_arch(name)  # e.g. convnext_tiny; None for a ResNet
        source_flags = f"{source} --arch={arch}" if arch else source
        out = f"weights/{arch}" if arch else f"weights/{source}_r50"
        raise UserError(
            f"config.init_from={config.init_from}: no such file or model DIR, and no cached "
            f"copy in {convert.default_cache_dir()}. Fetch and convert the weights: python -m "
            f"sipak_jax.convert --source={source_flags} --download --input={name} "
            f"--output={out} ; then pass --config.init_from={out} "
            "(or --config.init_from='' to train from scratch)"
        ) from None


def _init_weights(config, model, init_path: str) -> tuple[dict, dict | None]:
    """Loads `init_path` (all but the head) into `model`; returns (preprocessing spec, source
    info). From scratch: the 'scratch' normalisation."""
    if not init_path:
        return preprocessing.spec_for("scratch", config.image_size, config.resize), None
    from sipak_jax import pretrained

    summary = pretrained.init_from(model, init_path)
    meta = summary["metadata"]
    spec = dict(meta.preprocessing)  # the weights' own normalisation
    spec.update(image_size=int(config.image_size), resize=config.resize)
    logging.info(
        "init_from %s: %d tensors loaded, kept %s", init_path, summary["loaded"], summary["kept"]
    )
    return spec, {"init_from": init_path, "source": meta.source, "loaded": summary["loaded"]}


def _metadata(config, model, taxonomy, spec, source, fold, data_plan) -> model_io.ModelMetadata:
    data_dir, manual_dir = data_plan.reads()
    return model_io.ModelMetadata(
        kind="training",
        model=model.config(),
        taxonomy=taxonomy,
        preprocessing=spec,
        source=source,
        temperature=1.0,
        best_metric=checkpointing.BEST_METRIC,
        fold=fold,
        dataset={
            "name": config.dataset,
            "config": config.dataset_config,
            "data_dir": data_dir,
            "manual_dir": manual_dir,
            "options": dict(data_plan.options),
            "tfds_config": data_plan.tfds_config,
        },
    ).validate()


# ---- Set-up ----------------------------------------------------------------------------------


def _mesh(config) -> jax.sharding.Mesh:
    mesh = distributed.make_mesh()
    if config.batch_size % mesh.devices.size:
        raise UserError(
            f"config.batch_size={config.batch_size} is not divisible by the {mesh.devices.size} "
            "devices of the mesh; choose a multiple"
        )
    logging.info(
        "mesh: %d devices over %d processes (%s)",
        jax.device_count(),
        jax.process_count(),
        jax.devices()[0].platform,
    )
    return mesh


XLA_CACHE_ENV = "SIPAK_JAX_XLA_CACHE"


def compilation_cache_dir(value: str) -> str:
    """`config.compilation_cache_dir` as a path: 'auto' is `$SIPAK_JAX_XLA_CACHE` or
    `~/.cache/sipak_jax/xla`; '' is no persistent cache."""
    if value == "auto":
        value = os.environ.get(XLA_CACHE_ENV) or os.path.join("~", ".cache", "sipak_jax", "xla")
    return os.path.abspath(os.path.expanduser(value)) if value else ""


def use_compilation_cache(value: str) -> None:
    """Turns on JAX's persistent compilation cache: a fold (or a rerun) whose steps compile to
    the same programs loads them instead of compiling again (keyed by the program, the XLA
    flags and the jaxlib version)."""
    path = compilation_cache_dir(value)
    if path and jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)


def setup(
    config, workdir: str, fold: int, data_plan, init_path: str, *, write_metadata=True
) -> Run:
    """Builds one fold's `Run` and restores its latest checkpoint, if any; writes
    `workdir/metadata.json` (process 0) unless told not to (a re-evaluation keeps the file)."""
    use_compilation_cache(config.compilation_cache_dir)
    mesh = _mesh(config)
    train_data.prepare_dataset(data_plan)
    data = train_data.Data(config, data_plan, fold, mesh)
    taxonomy = data.taxonomy  # the dataset's, from its metadata or its reader
    model = create_model(config, taxonomy.num_classes, seed=int(config.seed))
    spec, source = _init_weights(config, model, init_path)
    metadata = _metadata(config, model, taxonomy, spec, source, fold, data_plan)
    graphdef, params, batch_stats, *rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    tx, schedules = make_optimizer(config, data.steps_per_epoch, model)
    state = init_state(nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats), tx, mesh)
    full, head, evaluate = jit_steps(
        config, graphdef, rest, tx, spec, mesh, data.batch_sharding,
        num_classes=taxonomy.num_classes, head=int(config.head_epochs) > 0,
    )  # fmt: skip
    ckpt = checkpointing.Checkpointer(
        workdir,
        save_interval_steps=int(config.checkpoint_every_steps),
        async_save=bool(config.async_checkpoints),
    )
    run = Run(
        config=config,
        workdir=workdir,
        fold=fold,
        mesh=mesh,
        data=data,
        data_plan=data_plan,
        taxonomy=taxonomy,
        metadata=metadata,
        graphdef=graphdef,
        rest=tuple(rest),
        schedules=schedules,
        state=state,
        full_step=full,
        head_step=head,
        eval_step=evaluate,
        empty_metrics=jax.jit(TrainMetrics.empty, out_shardings=NamedSharding(mesh, P())),
        ckpt=ckpt,
    )
    restore_latest(run)
    if run.is_main and write_metadata:
        model_io.write_metadata(workdir, metadata)
    return run


def restore_latest(run: Run) -> None:
    """Continues from the latest checkpoint (parameters, statistics, optimizer state, step)."""
    latest = run.ckpt.latest_step()
    if latest is None:
        return
    model, opt_state, meta = run.ckpt.restore(
        latest, model_dict(run.state), run.state.opt_state, run.mesh
    )
    run.state = with_model_dict(run.state, model).replace(
        step=replicate(np.int32(meta["step"]), run.mesh), opt_state=opt_state
    )
    run.start_step = int(meta["step"])
    logging.info("resumed from checkpoint %d (epoch %d)", run.start_step, meta["epoch"])


def restore_best(run: Run, state: TrainState) -> tuple[TrainState, int | None, dict]:
    """`state` with the best checkpoint's weights (validation macro-F1; ties: the earliest);
    returns (state, best step, its checkpoint meta)."""
    best = run.ckpt.best_step()
    if best is None:
        return state, None, {}
    if best != int(jax.device_get(state.step)):
        model, _, _ = run.ckpt.restore(best, model_dict(state), state.opt_state, run.mesh)
        state = with_model_dict(state, model)
    return state, best, run.ckpt.restore_meta(best)
