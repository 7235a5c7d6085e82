"""A training run in its own process, for the tests that need fresh JAX processes.

    python tests/train_worker.py --workdir=W --data_dir=D --out=params.npz
        [--overrides='{"num_epochs": 2}'] [--coordinator_address=127.0.0.1:P
        --num_processes=2 --process_id=I] [--emulate_processes=2]

Trains the tiny test config (`tiny_config`) with `train.train_one_fold` and writes the final
training state (parameters, BatchNorm statistics, step) of this process to `--out` as .npz,
plus `--out`.json with the returned results. The device count comes from XLA_FLAGS
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
    """A small ResNet on 32x32 synthetic cells: a few seconds a step on 2 CPU cores."""
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
    config.report = False
    config.shortcuts = False
    config.calibrate = True
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
        caches = emulated["train"]
        local = global_batch_size // n

        def produce():
            step = int(start_step)
            while True:
                parts = []
                for c in caches:
                    rows = ip.train_rows(c, global_batch_size, seed, step)
                    parts.append(ip._host_batch(c, rows, local))
                yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                step += 1

        return ip.BatchIterator(produce(), mesh, kwargs.get("prefetch", 2))

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
    import numpy as np

    from sipak_jax import train

    if args.emulate_processes > 1:
        _emulate_processes(args.emulate_processes)
    config = tiny_config(args.data_dir, **json.loads(args.overrides))
    final = {}

    def keep(state):
        host = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state)
        final["params"] = host.params
        final["batch_stats"] = host.batch_stats
        final["step"] = int(host.step)

    result = train.train_one_fold(config, args.workdir, int(config.fold), final_state_callback=keep)
    if final:
        flat = {}
        for name in ("params", "batch_stats"):
            leaves = jax.tree_util.tree_flatten_with_path(final[name])[0]
            for path, leaf in leaves:
                flat[f"{name}{jax.tree_util.keystr(path)}"] = leaf
        flat["step"] = np.asarray(final["step"])
        np.savez(args.out, **flat)
    with open(args.out + ".json", "w") as f:
        json.dump(
            {k: v for k, v in result.items() if k != "predictions"},
            f,
            default=str,
        )
    print("WORKER DONE", jax.process_index(), jax.device_count(), flush=True)


if __name__ == "__main__":
    main()
