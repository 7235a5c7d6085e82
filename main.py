"""Trains and evaluates a SIPaKMeD classifier: `python main.py --config=CONFIG --workdir=DIR`.

    python main.py --config=configs/demo.py --workdir=workdirs/demo
    python main.py --config=configs/resnet50.py:fold=2 --workdir=workdirs/r50_fold2
    python main.py --config=configs/resnet50.py --config.fold=all --workdir=workdirs/r50_cv

Everything happens in `sipak_jax.train.train_and_evaluate`; this file only reads flags. The
config is locked: a misspelt `--config.fieldd=...` fails before anything runs. A mistake the
user can fix (missing data or weights, a wrong path, a config that does not fit the workdir)
ends in one line `error: ...` naming the fix, exit code 2, and nothing created. Library
chatter (orbax, TensorFlow, TFDS) is hidden unless `--verbosity=1`. Several processes (SLURM,
TPU pods, or explicit `--coordinator_address/--num_processes/--process_id`) start JAX's
distributed runtime first (`sipak_jax.distributed`).
"""

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (configs/*.py[:args]).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    from sipak_jax import console

    console.quiet_libraries(FLAGS.verbosity)  # before JAX, TensorFlow or orbax start
    from sipak_jax import distributed, train

    try:
        try:
            distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        except ValueError as e:  # flags that do not describe a job
            raise console.UserError(str(e)) from None
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except console.UserError as e:
        raise console.fail(str(e)) from None


if __name__ == "__main__":
    app.run(main)
