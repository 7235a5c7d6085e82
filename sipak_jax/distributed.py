"""Multi-host start-up: detect a cluster from the environment and call `jax.distributed.initialize`.

A single machine needs nothing: JAX sees every local device and `train` builds one mesh over
them. Several machines (or several processes on one machine) need JAX's distributed runtime
started before anything touches a device. `initialize()` does that when, and only when, the
environment describes a multi-process job:

- explicit: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (main.py flags),
  or the same in `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`;
- SLURM: `srun` with more than one task (`SLURM_NTASKS` > 1); JAX reads the rest itself;
- Cloud TPU pods: more than one host in `TPU_WORKER_HOSTNAMES`, or a Megascale coordinator;
  JAX asks the TPU metadata for the rest.

On CPU, cross-process collectives need an implementation: gloo is selected before start-up
(used by the two-process test over 127.0.0.1).

`make_mesh()` is the one mesh of the project: 1-D, axis `data`, over every device of every
process. Training, the input pipeline and the model loaders all use it.
"""

from __future__ import annotations

import os

from absl import logging


def cluster_kind(env=None) -> str | None:
    """Names the kind of multi-process job the environment describes, or None for one process."""
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "explicit"
    try:
        slurm_tasks = int(env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or 1)
    except ValueError:
        slurm_tasks = 1
    if env.get("SLURM_JOB_ID") and slurm_tasks > 1 and env.get("SLURM_STEP_NODELIST"):
        return "slurm"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu_pod"
    return None


def make_mesh(devices=None):
    """A 1-D `jax.sharding.Mesh` with the axis `data` over every device of every process (or
    over `devices`), Auto axis type (gathers allowed): batches are sharded `P('data')`,
    parameters replicated `P()`."""
    import jax

    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    env=None,
) -> bool:
    """Starts `jax.distributed` when the flags or the environment describe a multi-process job.

    Must run before the first use of a JAX device. Returns True when it started the runtime.
    Raises ValueError when an explicit coordinator is given without the process count and id.
    """
    import jax

    env = os.environ if env is None else env
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if coordinator_address:
        if num_processes is None and env.get("JAX_NUM_PROCESSES"):
            num_processes = int(env["JAX_NUM_PROCESSES"])
        if process_id is None and env.get("JAX_PROCESS_ID"):
            process_id = int(env["JAX_PROCESS_ID"])
        if num_processes is None or process_id is None:
            raise ValueError(
                f"coordinator address {coordinator_address!r} given without the number of "
                "processes and this process's id: pass --num_processes and --process_id (or set "
                "JAX_NUM_PROCESSES and JAX_PROCESS_ID)."
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} is not in 0..{num_processes - 1}")
        _use_gloo_on_cpu(jax)
        logging.info(
            "jax.distributed: explicit coordinator %s, process %d of %d",
            coordinator_address,
            process_id,
            num_processes,
        )
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
        return True
    kind = cluster_kind(env)
    if kind is None:
        return False
    _use_gloo_on_cpu(jax)
    logging.info("jax.distributed: %s cluster detected; JAX reads the rest", kind)
    jax.distributed.initialize()
    return True


def _use_gloo_on_cpu(jax) -> None:
    """Selects gloo for CPU collectives across processes (harmless on GPU and TPU)."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError) as e:  # pragma: no cover - older/newer jax
        logging.warning("could not select gloo CPU collectives: %s", e)
