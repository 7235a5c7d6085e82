"""A training run in its own process, for the tests that need fresh JAX processes.

    python tests/train_worker.py --workdir=W --data_dir=D --out=result.json
        [--overrides='{"num_epochs": 2}'] [--coordinator_address=127.0.0.1:P
        --num_processes=2 --process_id=I] [--emulate_processes=2]

Trains the tiny test config (`tiny_config`) with `train.train_one_fold` and writes the returned
results (without the per-example predictions) to `--out` as JSON. The tests compare runs through
what the run leaves on disk (the final checkpoint, `tests/test_train.py::final_weights`), never
through hooks in the trainer. The device count comes from XLA_FLAGS
(`--xla_force_host_platform_device_count=N`), set by the caller.

`--emulate_processes=P` (one process only) makes the training batches exactly those a run over
P processes with the same global batch would see (each process's rows, permutation and
position in the global batch): the single-process reference of the multi-process test.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(data_dir: str, **overrides):
    """A small ResNet on 32x32 synthetic cells: a few seconds a step on 2 CPU cores.
    Evaluates the test fold with calibration (`evaluators`); overrides may add more."""
    from configs import demo

    config = demo.get_config()
    config.data_dir = data_dir
    config.synthetic.cells_per_class = 0
    config.image_size = 32
    config.model.width = 4
    config.batch_size = 16
    config.eval_batch_size = 64
    config.num_epochs = 2
    config.log_every_steps = 5
    config.num_overlay_cells = 2
    config.writer = "jsonl"
    config.evaluators = ("calibration", "test")
    config.prefetch = 1
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = tuple(value) if isinstance(value, list) else value
    return config


def _emulate_processes(n: int):
    """Replaces input_pipeline.train_batches by one that concatenates the host batches of
    `n` emulated processes, in process order (what the global batch of an n-process run
    holds)."""
    import numpy as np

    from sipak_jax import input_pipeline as ip

    original_load = ip.load_folds
    emulated = {}

    def load_folds(*args, **kwargs):
        out = original_load(*args, **kwargs)
        emulated["train"] = [
            original_load(*args, **{**kwargs, "process_index": p, "process_count": n})["train"]
            for p in range(n)
        ]
        return out

    def train_batches(cache, global_batch_size, mesh, seed, start_step=0, **kwargs):
        import grain

        parts = [ip.train_dataset(c, global_batch_size, seed) for c in emulated["train"]]
        joined = grain.experimental.ZipMapDataset(parents=parts).map(
            lambda batches: {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
        )
        return ip.device_batches(joined, mesh, start=start_step, prefetch=kwargs.get("prefetch", 2))

    def steps_per_epoch(cache, global_batch_size):
        return ip_steps(emulated["train"][0], global_batch_size)

    ip_steps = ip.steps_per_epoch
    ip.load_folds = load_folds
    ip.train_batches = train_batches
    ip.steps_per_epoch = steps_per_epoch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--overrides", default="{}")
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    parser.add_argument("--emulate_processes", type=int, default=0)
    args = parser.parse_args()

    from absl import logging

    logging.set_verbosity(logging.INFO)
    from sipak_jax import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    import jax

    from sipak_jax import train

    if args.emulate_processes > 1:
        _emulate_processes(args.emulate_processes)
    config = tiny_config(args.data_dir, **json.loads(args.overrides))
    result = train.train_one_fold(config, args.workdir, int(config.fold))
    with open(args.out, "w") as f:
        json.dump(
            {k: v for k, v in result.items() if k != "predictions"},
            f,
            default=str,
        )
    print("WORKER DONE", jax.process_index(), jax.device_count(), flush=True)


if __name__ == "__main__":
    main()
