"""The training loop: end to end on a synthetic build, resume, signals, non-finite losses,
device counts and processes. Tiny ResNet, 32x32 images, a few steps.

Runs that need a fresh JAX (another device count, kill -9, SIGTERM, several processes) go
through tests/train_worker.py in a subprocess.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "train_worker.py")
sys.path.insert(0, os.path.join(ROOT, "tests"))

from train_worker import tiny_config  # noqa: E402

# Float tolerance between runs whose reductions (BatchNorm statistics, gradients) are summed
# in another order: Adam divides by sqrt(v), so a parameter whose gradient is near zero can
# move by a visibly different fraction of a step. One step moves a parameter by about the
# learning rate (3e-3 here); 1e-4 is 3% of one step (seen: 3.7e-5 after 6 steps, 8 vs 1).
ADAM_ATOL = 1e-4


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A synthetic SIPaKMeD (30 cells per class) built through the real TFDS builder, in a
    subprocess (TensorFlow stays out of the test process). Returns the TFDS data_dir."""
    root = tmp_path_factory.mktemp("sipak_tiny_data")
    code = (
        "import sys; sys.path.insert(0, {!r})\n"
        "from tfds_sipakmed import synthetic\n"
        "import tfds_sipakmed\n"
        "synthetic.write_synthetic({!r}, cells_per_class=30, seed=0)\n"
        "tfds_sipakmed.build({!r}, {!r}, 'grouped')\n"
    ).format(ROOT, str(root / "raw"), str(root / "raw"), str(root / "tfds"))
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=600)
    return str(root / "tfds")


def _env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _worker_cmd(workdir, data_dir, out, overrides=None, extra=()):
    return [
        sys.executable,
        WORKER,
        f"--workdir={workdir}",
        f"--data_dir={data_dir}",
        f"--out={out}",
        f"--overrides={json.dumps(overrides or {})}",
        *extra,
    ]


def run_worker(workdir, data_dir, out, *, devices=1, overrides=None, extra=(), timeout=600):
    proc = subprocess.run(
        _worker_cmd(workdir, data_dir, out, overrides, extra),
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return dict(np.load(out))


def _committed_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _wait_for_checkpoint(proc, workdir, min_step=1, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps = [s for s in _committed_steps(workdir) if s >= min_step]
        if steps:
            return steps[-1]
        if proc.poll() is not None:
            raise AssertionError(f"worker ended before a checkpoint: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def _assert_trees_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# End to end, in this process.


def test_train_and_evaluate_writes_every_output(tiny_data, tmp_path):
    from sipak_jax import model_io, train

    workdir = str(tmp_path / "run")
    config = tiny_config(tiny_data, shortcuts=True)
    result = train.train_and_evaluate(config, workdir)

    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    assert saved["fold"] == 0
    test = saved["test"]
    assert test["num_examples"] == len(saved["predictions"]) > 0
    assert np.asarray(test["confusion_matrix"]).sum() == test["num_examples"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_macro", "per_class"):
        assert key in test
    assert test["abnormal_vs_nilm"]["sensitivity"] is not None
    assert saved["calibration"]["temperature"] > 0
    assert "controls" in saved["shortcuts"]
    row = saved["predictions"][0]
    assert row["file_name"].startswith("im_") and len(row["probabilities"]) == 5
    assert result["test"]["accuracy"] == test["accuracy"]

    # Per-epoch validation scalars and the confusion-matrix image, in the JSON-lines log.
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    val_steps = [x["step"] for x in lines if "val/macro_f1" in x]
    assert len(val_steps) == config.num_epochs
    images = {x["name"] for x in lines if x["kind"] == "images"}
    assert {"val/confusion_matrix", "val_overlays/gradcam", "test/confusion_matrix"} <= images
    assert os.path.isfile(os.path.join(workdir, "reliability.png"))

    # The workdir is a model DIR: model_io loads its best checkpoint, which reproduces the
    # test logits written to results.json.
    model, meta = model_io.load_model_dir(workdir)
    assert meta["kind"] == "training" and meta["step"] == saved["best_step"]
    assert meta["temperature"] == pytest.approx(saved["calibration"]["temperature"])
    from sipak_jax import input_pipeline, preprocessing

    test_cache = input_pipeline.load_folds(
        tiny_data,
        "grouped",
        0,
        config.image_size,
        config.resize,
        validation_fraction=0.2,
        log=lambda _: None,
    )["test"]
    x = preprocessing.normalize(test_cache.image[:8], meta["preprocessing"])
    logits = np.asarray(model(x))
    want = np.asarray([p["logits"] for p in saved["predictions"][:8]])
    np.testing.assert_allclose(logits, want, atol=1e-4)


def _tiny_step_setup(inject=(), head_only=False, **overrides):
    """The pieces train_one_fold builds, for a unit test of the update step."""
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from sipak_jax import preprocessing, train

    config = tiny_config("", inject_nonfinite_steps=tuple(inject), **overrides)
    mesh = train.make_mesh()
    rep = NamedSharding(mesh, P())
    model = train.create_model(config, 5, seed=0)
    graphdef, params, stats, *rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    tx, _ = train.make_optimizer(config, steps_per_epoch=10)
    state = train.TrainState(
        step=jnp.int32(0),
        params=params,
        batch_stats=stats,
        opt_state=tx.init(params),
        nonfinite_streak=jnp.int32(0),
        max_streak=jnp.int32(0),
    )
    spec = preprocessing.spec_for("scratch", config.image_size)
    fn = train.make_train_step(config, graphdef, rest, tx, spec, head_only=head_only, num_classes=5)
    step = jax.jit(fn, out_shardings=(rep, rep))
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)),
        "label": jnp.asarray(rng.integers(0, 5, 8, dtype=np.int32)),
    }
    return train, state, step, batch


def test_nonfinite_loss_skips_the_update_and_keeps_batchnorm_statistics():
    train, state, step, batch = _tiny_step_setup(inject=(0,))
    before = jax.device_get(state)
    state, m = step(state, train.TrainMetrics.empty(), batch)
    after = jax.device_get(state)
    assert int(after.step) == 1 and int(after.nonfinite_streak) == 1
    for name in ("params", "batch_stats", "opt_state"):
        for a, b in zip(
            jax.tree.leaves(getattr(before, name)),
            jax.tree.leaves(getattr(after, name)),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert float(m.compute()["skipped"]) == 1.0
    # The next (finite) step updates everything, BatchNorm statistics included.
    state, m = step(state, m, batch)
    after2 = jax.device_get(state)
    assert int(after2.nonfinite_streak) == 0 and int(after2.max_streak) == 1
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(after.batch_stats), jax.tree.leaves(after2.batch_stats), strict=True
        )
    ]
    assert all(changed)
    assert float(m.compute()["skipped"]) == 0.5
    assert np.isfinite(float(m.compute()["loss"]))


def test_head_only_phase_trains_only_the_head_in_bfloat16():
    train, state, step, batch = _tiny_step_setup(
        head_only=True, head_epochs=1, num_epochs=3, compute_dtype="bfloat16"
    )
    before = jax.device_get(state)
    state, _ = step(state, train.TrainMetrics.empty(), batch)
    after = jax.device_get(state)
    for path, a in jax.tree_util.tree_flatten_with_path(before.params)[0]:
        b = after.params
        for k in path:
            b = b[k.key]
        assert b.dtype == np.float32
        if jax.tree_util.keystr(path).startswith("['fc']"):
            assert not np.array_equal(a, b), path
        else:
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    for a, b in zip(
        jax.tree.leaves(before.batch_stats), jax.tree.leaves(after.batch_stats), strict=True
    ):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(a, b)


def test_k_nonfinite_losses_in_a_row_stop_without_a_checkpoint(tiny_data, tmp_path):
    from sipak_jax import train

    workdir = str(tmp_path / "nan")
    config = tiny_config(
        tiny_data, inject_nonfinite_steps=(0, 1, 2, 3), max_nonfinite_steps=3, log_every_steps=2
    )
    with pytest.raises(train.NonFiniteLossError, match="NaN or Inf for 4 steps in a row"):
        train.train_and_evaluate(config, workdir)
    assert _committed_steps(workdir) == []


def test_checkpoint_with_nan_is_never_written(tmp_path):
    from sipak_jax import checkpointing

    ckpt = checkpointing.Checkpointer(str(tmp_path))
    model = {"w": jnp.array([1.0, jnp.nan])}
    with pytest.raises(checkpointing.NonFiniteCheckpointError, match="NaN or Inf"):
        ckpt.save(1, model, {"m": jnp.zeros(2)}, {"step": 1}, force=True)
    ckpt.close()
    assert _committed_steps(str(tmp_path)) == []


def test_config_errors_are_clear(tiny_data, tmp_path):
    from sipak_jax import train

    with pytest.raises(ValueError, match="config.fold must be 0..4 or 'all'"):
        train.train_and_evaluate(tiny_config(tiny_data, fold="7"), str(tmp_path))
    with pytest.raises(ValueError, match="Unknown augmentation op 'spin'"):
        train.train_and_evaluate(tiny_config(tiny_data, augment=("spin",)), str(tmp_path))


@pytest.mark.slow
def test_fold_all_trains_five_folds_and_summarizes(tiny_data, tmp_path):
    from sipak_jax import train

    workdir = tmp_path / "cv"
    config = tiny_config(tiny_data, num_epochs=1, num_overlay_cells=0, calibrate=False)
    with config.unlocked():
        config.fold = "all"
    summary = train.train_and_evaluate(config, str(workdir))
    assert summary["folds"] == [0, 1, 2, 3, 4]
    for fold in range(5):
        with open(workdir / f"fold{fold}" / "results.json") as f:
            assert json.load(f)["fold"] == fold
    with open(workdir / "cv_results.json") as f:
        saved = json.load(f)
    acc = saved["metrics"]["accuracy"]
    assert len(acc["per_fold"]) == 5
    assert acc["mean"] == pytest.approx(np.mean(acc["per_fold"]))
    assert (workdir / "cv_results.md").read_text().startswith("| metric (test folds) | mean |")


def test_summarize_folds_mean_and_sample_std():
    from sipak_jax import evaluation

    def result(fold, acc):
        return {"fold": fold, "test": {"accuracy": acc, "macro_f1": acc / 2}}

    summary = evaluation.summarize_folds([result(0, 0.8), result(1, 0.9), result(2, 1.0)])
    acc = summary["metrics"]["accuracy"]
    assert acc["mean"] == pytest.approx(0.9)
    assert acc["std"] == pytest.approx(np.std([0.8, 0.9, 1.0], ddof=1))
    assert "| accuracy | 0.9000 |" in summary["table"]


# ---------------------------------------------------------------------------------------------
# Fresh processes: resume, signals, device counts.


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("uninterrupted")
    params = run_worker(
        str(d / "w"), tiny_data, str(d / "p.npz"), overrides={"checkpoint_every_steps": 2}
    )
    return params


@pytest.mark.slow
def test_resume_after_kill_9_is_bitwise_equal(tiny_data, tmp_path, uninterrupted):
    workdir = str(tmp_path / "w")
    out = str(tmp_path / "p.npz")
    overrides = {"checkpoint_every_steps": 2}
    proc = subprocess.Popen(
        _worker_cmd(workdir, tiny_data, out, overrides),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    step = _wait_for_checkpoint(proc, workdir, min_step=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out)
    total = int(uninterrupted["step"])
    assert step < total
    resumed = run_worker(workdir, tiny_data, out, overrides=overrides)
    _assert_trees_equal(resumed, uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(tiny_data, tmp_path, uninterrupted):
    workdir = str(tmp_path / "w")
    out = str(tmp_path / "p.npz")
    overrides = {"checkpoint_every_steps": 2}
    proc = subprocess.Popen(
        _worker_cmd(workdir, tiny_data, out, overrides),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for_checkpoint(proc, workdir, min_step=2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "stopped by SIGTERM" in output
    with open(out + ".json") as f:
        stopped = json.load(f)
    assert stopped["stopped_early"] and stopped["signal"] == "SIGTERM"
    assert _committed_steps(workdir)[-1] == stopped["step"]
    resumed = run_worker(workdir, tiny_data, out, overrides=overrides)
    _assert_trees_equal(resumed, uninterrupted)


@pytest.mark.slow
def test_eight_devices_match_one_and_restore_on_one(tiny_data, tmp_path):
    overrides = {"num_epochs": 1}
    one = run_worker(str(tmp_path / "w1"), tiny_data, str(tmp_path / "p1.npz"), overrides=overrides)
    eight_dir = str(tmp_path / "w8")
    eight = run_worker(
        eight_dir, tiny_data, str(tmp_path / "p8.npz"), devices=8, overrides=overrides
    )
    assert sorted(one) == sorted(eight)
    for k in one:
        np.testing.assert_allclose(eight[k], one[k], rtol=1e-3, atol=ADAM_ATOL, err_msg=k)

    # The 8-device checkpoint restores onto this process's single device.
    from sipak_jax import checkpointing, model_io, train

    model, meta = model_io.load_model_dir(eight_dir, step=int(eight["step"]))
    ckpt = checkpointing.Checkpointer(eight_dir, read_only=True)
    mesh = train.make_mesh()
    target = model_io.weights_state(model)
    meta_json = ckpt.restore_meta(int(eight["step"]))
    ckpt.close()
    assert meta_json["step"] == int(eight["step"])
    flat = model_io.flatten(target)
    for key, value in flat.items():
        name = "params" if key.split("/")[-1] not in ("mean", "var") else "batch_stats"
        path = "".join(f"[{p}]" if p.isdigit() else f"['{p}']" for p in key.split("/"))
        np.testing.assert_array_equal(np.asarray(value), eight[name + path], err_msg=key)
    assert mesh.devices.size == jax.device_count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(tiny_data, tmp_path):
    overrides = {"num_epochs": 1, "checkpoint_every_steps": 0}
    workdir = str(tmp_path / "multi")
    port = _free_port()
    procs = []
    for pid in range(2):
        extra = (
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={pid}",
        )
        procs.append(
            subprocess.Popen(
                _worker_cmd(workdir, tiny_data, str(tmp_path / f"p{pid}.npz"), overrides, extra),
                env=_env(2),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, o in zip(procs, outputs, strict=True):
        assert p.returncode == 0, o[-5000:]
        assert "WORKER DONE" in o
    p0 = dict(np.load(tmp_path / "p0.npz"))
    p1 = dict(np.load(tmp_path / "p1.npz"))
    _assert_trees_equal(p0, p1)  # both processes hold the same parameters

    ref = run_worker(
        str(tmp_path / "ref"),
        tiny_data,
        str(tmp_path / "ref.npz"),
        devices=4,
        overrides=overrides,
        extra=("--emulate_processes=2",),
    )
    for k in ref:
        np.testing.assert_allclose(p0[k], ref[k], rtol=1e-3, atol=ADAM_ATOL, err_msg=k)
