"""The training loop: end to end on a synthetic build, resume, signals, non-finite losses,
device counts and processes, workdir decisions, the data location. Tiny ResNet, 32x32 images,
a few steps.

Runs that need a fresh JAX (another device count, kill -9, SIGTERM, several processes) go
through tests/train_worker.py in a subprocess. Runs are compared through what they leave on
disk (the final checkpoint) or return, never through hooks in the trainer; faults are injected
through public seams (a diverging learning rate, a non-finite parameter in the step's input).
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
    """Trains in a fresh process; returns the final weights it left on disk."""
    proc = subprocess.run(
        _worker_cmd(workdir, data_dir, out, overrides, extra),
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return final_weights(workdir)


def _committed_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def final_weights(workdir) -> dict:
    """{'path': array} of the latest checkpoint's model item (parameters and BatchNorm
    statistics), plus 'step': what a run leaves behind, read in this process."""
    from sipak_jax import checkpointing, model_io

    step = _committed_steps(workdir)[-1]
    path = os.path.join(workdir, "checkpoints", str(step), checkpointing.MODEL_ITEM)
    flat = {k: np.asarray(v) for k, v in model_io.flatten(model_io.restore_arrays(path)).items()}
    flat["step"] = np.asarray(step)
    return flat


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


def test_train_and_evaluate_writes_every_output(tiny_data, tmp_path, capsys):
    from sipak_jax import model_io, train

    workdir = str(tmp_path / "run")
    config = tiny_config(
        tiny_data, evaluators=("calibration", "test", "shortcuts", "artifacts", "report")
    )
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
    # The test figures are those of the stored (temperature-scaled) probabilities: what
    # predict's users get, grouped calls (abnormal vs NILM) included.
    from sipak_jax import metrics
    from tfds_sipakmed.taxonomy import SIPAKMED

    assert test["temperature"] == saved["calibration"]["temperature"]
    stored = np.asarray([p["probabilities"] for p in saved["predictions"]])
    again = metrics.classification_metrics(
        [p["label"] for p in saved["predictions"]], stored, SIPAKMED
    )
    for view in ("abnormal_vs_nilm", "view_2class"):
        for key, value in again[view].items():
            if isinstance(value, float):
                assert test[view][key] == pytest.approx(value, abs=1e-4), (view, key)
    assert "controls" in saved["shortcuts"]
    assert saved["timing"]["steps"] == sum(e["steps"] for e in saved["timing"]["epochs"]) > 0
    row = saved["predictions"][0]
    assert row["file_name"].startswith("im_") and len(row["probabilities"]) == 5
    assert result["test"]["accuracy"] == test["accuracy"]

    # The console: one line per epoch, then where the results are.
    out = capsys.readouterr().out
    epoch_lines = [x for x in out.splitlines() if x.startswith("epoch ")]
    assert [x.split()[1] for x in epoch_lines] == ["1/2", "2/2"]
    assert "train loss" in epoch_lines[0] and "val macro-F1" in epoch_lines[0]
    assert " img/s  ETA " in epoch_lines[0]
    assert f"results:     {workdir}/results.json" in out
    assert f"report:      {workdir}/report.html" in out

    # Per-epoch validation scalars and the confusion-matrix image, in the JSON-lines log.
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    val_steps = [x["step"] for x in lines if "val/macro_f1" in x]
    assert len(val_steps) == config.num_epochs
    images = {x["name"] for x in lines if x["kind"] == "images"}
    assert {"val/confusion_matrix", "val_overlays/gradcam", "test/confusion_matrix"} <= images
    assert os.path.isfile(os.path.join(workdir, "reliability.png"))
    with open(os.path.join(workdir, "artifacts", "index.json")) as f:
        assert json.load(f)["images"], "finalize wrote no overlays for the report"

    # The workdir is a model DIR: model_io loads its best checkpoint, which reproduces the
    # test logits written to results.json.
    model, meta = model_io.load_model_dir(workdir)
    assert meta.kind == "training" and meta.step == saved["best_step"]
    assert meta.temperature == pytest.approx(saved["calibration"]["temperature"])
    from sipak_jax import input_pipeline, preprocessing

    test_cache = input_pipeline.load_folds(
        tiny_data,
        "grouped",
        0,
        config.image_size,
        config.resize,
        validation_fraction=config.val_fraction,
        log=lambda _: None,
    )["test"]
    x = preprocessing.normalize(test_cache.image[:8], meta.preprocessing)
    logits = np.asarray(model(x))
    want = np.asarray([p["logits"] for p in saved["predictions"][:8]])
    np.testing.assert_allclose(logits, want, atol=1e-4)


def _tiny_step_setup(head_only=False, **overrides):
    """The pieces set-up builds, for a unit test of the update step."""
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from sipak_jax import distributed, preprocessing, train_step

    config = tiny_config("", **overrides)
    mesh = distributed.make_mesh()
    rep = NamedSharding(mesh, P())
    model = train_step.create_model(config, 5, seed=0)
    graphdef, params, stats, *rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    tx, _ = train_step.make_optimizer(config, steps_per_epoch=10)
    state = train_step.init_state(nnx.to_pure_dict(params), nnx.to_pure_dict(stats), tx, mesh)
    spec = preprocessing.spec_for("scratch", config.image_size)
    fn = train_step.make_train_step(
        config, graphdef, rest, tx, spec, head_only=head_only, num_classes=5
    )
    step = jax.jit(fn, out_shardings=(rep, rep))
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)),
        "label": jnp.asarray(rng.integers(0, 5, 8, dtype=np.int32)),
    }
    return train_step, state, step, batch


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_nonfinite_loss_skips_the_update_and_keeps_batchnorm_statistics():
    train_step, state, step, batch = _tiny_step_setup()
    good_bias = state.params["fc"]["bias"]
    # A diverged model: an infinite head bias makes the loss non-finite.
    state = state.replace(
        params={**state.params, "fc": {**state.params["fc"], "bias": good_bias + jnp.inf}}
    )
    before = jax.device_get(state)
    state, m = step(state, train_step.TrainMetrics.empty(), batch)
    after = jax.device_get(state)
    assert int(after.step) == 1 and int(after.nonfinite_streak) == 1
    for name in ("params", "batch_stats", "opt_state"):
        for a, b in zip(_leaves(getattr(before, name)), _leaves(getattr(after, name)), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert float(m.compute()["skipped"]) == 1.0
    # With the head finite again, the next step updates everything, BatchNorm statistics too.
    state = state.replace(params={**state.params, "fc": {**state.params["fc"], "bias": good_bias}})
    state, m = step(state, m, batch)
    after2 = jax.device_get(state)
    assert int(after2.nonfinite_streak) == 0 and int(after2.max_streak) == 1
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(_leaves(after.batch_stats), _leaves(after2.batch_stats), strict=True)
    ]
    assert all(changed)
    assert float(m.compute()["skipped"]) == 0.5
    assert np.isfinite(float(m.compute()["loss"]))


def test_head_only_phase_trains_only_the_head_in_bfloat16():
    train_step, state, step, batch = _tiny_step_setup(
        head_only=True, head_epochs=1, num_epochs=3, compute_dtype="bfloat16"
    )
    before = jax.device_get(state)
    state, _ = step(state, train_step.TrainMetrics.empty(), batch)
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
    for a, b in zip(_leaves(before.batch_stats), _leaves(after.batch_stats), strict=True):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(a, b)


def test_a_diverging_run_stops_after_k_nonfinite_losses_without_a_checkpoint(tiny_data, tmp_path):
    from sipak_jax import console, train

    workdir = str(tmp_path / "nan")
    # A learning rate of 1e30: after the first real update the activations overflow.
    config = tiny_config(tiny_data, learning_rate=1e30, max_nonfinite_steps=3, log_every_steps=1)
    with pytest.raises(train.NonFiniteLossError, match=r"NaN or Inf for 3 steps in a row"):
        train.train_and_evaluate(config, workdir)
    assert issubclass(train.NonFiniteLossError, console.UserError)  # one line from main.py
    assert _committed_steps(workdir) == []


def test_checkpoint_with_nan_is_never_written(tmp_path):
    from sipak_jax import checkpointing

    ckpt = checkpointing.Checkpointer(str(tmp_path))
    model = {"w": jnp.array([1.0, jnp.nan])}
    with pytest.raises(checkpointing.NonFiniteCheckpointError, match="NaN or Inf"):
        ckpt.save(1, model, {"m": jnp.zeros(2)}, {"step": 1}, force=True)
    ckpt.close()
    assert _committed_steps(str(tmp_path)) == []


def test_config_errors_are_clear_and_create_nothing(tmp_path):
    from sipak_jax import train
    from sipak_jax.console import UserError

    workdir = tmp_path / "w"
    cases = {
        "config.fold must be 0..4 or 'all'": {"fold": "7"},
        "Unknown augmentation op 'spin'": {"augment": ("spin",)},
        "config.evaluators: unknown \\['tset'\\]": {"evaluators": ("tset",)},
        "report need 'test'": {"evaluators": ("report",)},
    }
    for message, overrides in cases.items():
        with pytest.raises(UserError, match=message):
            train.train_and_evaluate(tiny_config("", **overrides), str(workdir))
    assert not workdir.exists()


@pytest.mark.slow
def test_fold_all_trains_five_folds_and_summarizes(tiny_data, tmp_path):
    from sipak_jax import train

    workdir = tmp_path / "cv"
    config = tiny_config(tiny_data, num_epochs=1, num_overlay_cells=0, evaluators=("test",))
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
    # Started again: every fold is finished, nothing is read or written again.
    before = (workdir / "cv_results.json").read_bytes()
    assert train.train_and_evaluate(config, str(workdir)) == saved
    assert (workdir / "cv_results.json").read_bytes() == before


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
# Where the data is, and what a workdir allows (no training).


def test_default_data_dir_is_tfds_data_dir(tiny_data, tmp_path, monkeypatch):
    from sipak_jax import train_data
    from sipak_jax.console import UserError

    config = tiny_config("")  # data_dir='': TFDS's default location
    monkeypatch.setenv("TFDS_DATA_DIR", tiny_data)
    plan = train_data.plan_dataset(config, str(tmp_path / "w"))
    assert (plan.kind, plan.reads()) == ("tfds", (tiny_data, ""))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no built sipakmed/grouped dataset in .*empty.*"):
        train_data.plan_dataset(config, str(tmp_path / "w"))
    monkeypatch.delenv("TFDS_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert train_data.default_data_dir() == str(tmp_path / "home" / "tensorflow_datasets")
    with pytest.raises(UserError, match="python -m tfds_sipakmed.build --manual_dir="):
        train_data.plan_dataset(config, str(tmp_path / "w"))
    # A raw tree read directly (no TFDS): the manual dir is checked, not read.
    raw = os.path.join(os.path.dirname(tiny_data), "raw")
    config = tiny_config("", use_tfds=False, manual_dir=raw)
    assert train_data.plan_dataset(config, str(tmp_path / "w")).reads() == ("", raw)
    with pytest.raises(UserError, match="config.manual_dir: The manual dir .* does not exist"):
        train_data.plan_dataset(tiny_config("", manual_dir=str(tmp_path / "nope")), "w")
    assert not (tmp_path / "w").exists()


def _started_workdir(tmp_path, finished=False, **overrides):
    from sipak_jax import workdir

    config = tiny_config("", **overrides)
    d = tmp_path / "w"
    workdir.record(workdir.Plan("start", str(d)), config)
    if finished:
        (d / "results.json").write_text('{"test": {"accuracy": 0.5}}\n')
    return str(d)


def test_workdir_same_config_resumes_and_a_changed_one_is_refused(tmp_path):
    from sipak_jax import workdir
    from sipak_jax.console import UserError

    d = _started_workdir(tmp_path)
    assert workdir.decide(d, tiny_config("")).action == "resume"
    with pytest.raises(UserError) as e:
        workdir.decide(d, tiny_config("", **{"model.width": 8, "num_epochs": 3}))
    message = str(e.value)
    assert "model.width: 4 -> 8" in message and "num_epochs: 2 -> 3" in message
    assert "--workdir" in message and "allow_more_epochs" in message
    # Safe fields change; more epochs only when asked; fewer never.
    plan = workdir.decide(d, tiny_config("", log_every_steps=1, prefetch=2))
    assert plan.action == "resume" and [c.field for c in plan.changes] == [
        "log_every_steps",
        "prefetch",
    ]
    plan = workdir.decide(d, tiny_config("", num_epochs=3, allow_more_epochs=True))
    assert plan.action == "resume" and str(plan.changes[0]) == "num_epochs: 2 -> 3"
    with pytest.raises(UserError, match="num_epochs: 2 -> 1"):
        workdir.decide(d, tiny_config("", num_epochs=1, allow_more_epochs=True))
    workdir.record(plan, tiny_config("", num_epochs=3, allow_more_epochs=True))
    assert workdir.decide(d, tiny_config("", num_epochs=3)).action == "resume"
    with open(os.path.join(d, "config_changes.jsonl")) as f:
        assert json.loads(f.readline())["changes"] == ["num_epochs: 2 -> 3"]


def test_workdir_finished_run_is_not_evaluated_again_unless_asked(tmp_path):
    from sipak_jax import workdir
    from sipak_jax.console import UserError

    d = _started_workdir(tmp_path, finished=True)
    plan = workdir.decide(d, tiny_config(""))
    assert plan.action == "finished" and plan.results_path == os.path.join(d, "results.json")
    plan = workdir.decide(d, tiny_config("", reevaluate=True))
    assert plan.action == "reevaluate"
    assert plan.results_path == os.path.join(d, "results.reeval1.json")
    with pytest.raises(UserError, match="the run has finished"):
        workdir.decide(d, tiny_config("", num_epochs=3, allow_more_epochs=True))
    # Checkpoints without config.json: not ours to resume.
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="no config.json"):
        workdir.decide(str(other), tiny_config(""))
    assert workdir.decide(str(tmp_path / "new"), tiny_config("")).action == "start"


def test_finished_run_started_again_reads_nothing_and_reevaluation_writes_beside(
    tiny_data, tmp_path, capsys
):
    from sipak_jax import train

    workdir = tmp_path / "run"
    config = tiny_config(tiny_data, num_epochs=1, num_overlay_cells=0)
    first = train.train_and_evaluate(config, str(workdir))
    results = (workdir / "results.json").read_bytes()
    metadata = (workdir / "metadata.json").read_bytes()
    capsys.readouterr()
    again = train.train_and_evaluate(config, str(workdir))
    out = capsys.readouterr().out
    assert "is finished" in out and "not read again" in out and "epoch 1/1" not in out
    assert again["timing"] == first["timing"]
    assert (workdir / "results.json").read_bytes() == results
    config = tiny_config(tiny_data, num_epochs=1, num_overlay_cells=0, reevaluate=True)
    reeval = train.train_and_evaluate(config, str(workdir))
    assert (workdir / "results.json").read_bytes() == results
    assert (workdir / "metadata.json").read_bytes() == metadata
    with open(workdir / "results.reeval1.json") as f:
        saved = json.load(f)
    assert saved["test"]["accuracy"] == reeval["test"]["accuracy"] == first["test"]["accuracy"]
    assert saved["predictions"] == first["predictions"]


def test_sharding_batch_over_all_devices_state_replicated(tiny_data, tmp_path):
    """On 4 devices: every batch is split over all of them and the state is replicated,
    before and after a jitted step."""
    code = f"""
import sys; sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
from train_worker import tiny_config
from sipak_jax import train_data, train_setup
config = tiny_config({tiny_data!r})
plan = train_data.plan_dataset(config, {str(tmp_path)!r})
run = train_setup.setup(config, {str(tmp_path / "w")!r}, 0, plan, "")
assert run.mesh.devices.size == 4 == jax.device_count()
batch = next(iter(run.data.train_batches(0)))
for v in batch.values():
    assert v.sharding.is_equivalent_to(NamedSharding(run.mesh, P("data")), v.ndim), v.sharding
    shards = v.addressable_shards
    assert len({{s.device for s in shards}}) == 4
    assert all(s.data.shape[0] == config.batch_size // 4 for s in shards)
def replicated(state):
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4, leaf
replicated(run.state)
state, _ = run.full_step(run.state, run.empty_metrics(), batch)
replicated(state)
run.ckpt.close()
print("SHARDING OK")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(4), capture_output=True, text=True, timeout=600
    )
    assert "SHARDING OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def _main(workdir, *flags, data_dir):
    """`python main.py` on the demo config made tiny, reading the dataset from TFDS's default
    location ($TFDS_DATA_DIR; config.data_dir stays '')."""
    tiny = (
        "--config.synthetic.cells_per_class=0",
        "--config.image_size=32",
        "--config.model.width=4",
        "--config.batch_size=16",
        "--config.num_epochs=1",
        "--config.num_overlay_cells=0",
        "--config.writer=jsonl",
        "--config.evaluators=('test',)",
    )
    return subprocess.run(
        [
            sys.executable,
            "main.py",
            "--config=configs/demo.py",
            *tiny,
            *flags,
            f"--workdir={workdir}",
        ],
        cwd=ROOT,
        env={**_env(), "TFDS_DATA_DIR": data_dir},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _tree(d) -> dict:
    return {
        os.path.relpath(os.path.join(root, f), d): os.path.getmtime(os.path.join(root, f))
        for root, _, files in os.walk(d)
        for f in files
    }


def test_main_command_on_the_default_data_dir(tiny_data, tmp_path):
    workdir = tmp_path / "run"
    proc = _main(workdir, data_dir=tiny_data)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert out[0].startswith("config: ") and sum(x.startswith("config: ") for x in out) == 1
    assert any(x.startswith("epoch 1/1  train loss ") and " ETA 00:00" in x for x in out), out
    assert out[-2:] == [
        f"results:     {workdir}/results.json",
        f"metrics:     {workdir}/metrics.jsonl",
    ]
    assert "Traceback" not in proc.stderr and "orbax" not in proc.stdout + proc.stderr
    results = (workdir / "results.json").read_bytes()

    # Started again: finished, the test fold is not read, nothing changes.
    before = _tree(workdir)
    proc = _main(workdir, data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is finished" in proc.stdout and "--config.reevaluate=True" in proc.stdout
    assert not any(x.startswith("epoch ") for x in proc.stdout.splitlines())
    assert (workdir / "results.json").read_bytes() == results
    assert _tree(workdir) == before

    # A changed config is refused before anything is touched, naming the fields.
    proc = _main(workdir, "--config.model.width=8", "--config.seed=1", data_dir=tiny_data)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "model.width: 4 -> 8" in lines[0] and "seed: 0 -> 1" in lines[0]
    assert "--workdir" in lines[0]
    assert _tree(workdir) == before


# ---------------------------------------------------------------------------------------------
# Fresh processes: resume, signals, device counts.


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("uninterrupted")
    return run_worker(
        str(d / "w"), tiny_data, str(d / "r.json"), overrides={"checkpoint_every_steps": 2}
    )


@pytest.mark.slow
def test_resume_after_kill_9_is_bitwise_equal(tiny_data, tmp_path, uninterrupted):
    workdir = str(tmp_path / "w")
    out = str(tmp_path / "r.json")
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
    assert step < int(uninterrupted["step"])
    resumed = run_worker(workdir, tiny_data, out, overrides=overrides)
    _assert_trees_equal(resumed, uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(tiny_data, tmp_path, uninterrupted):
    workdir = str(tmp_path / "w")
    out = str(tmp_path / "r.json")
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
    with open(out) as f:
        stopped = json.load(f)
    assert stopped["stopped_early"] and stopped["signal"] == "SIGTERM"
    assert _committed_steps(workdir)[-1] == stopped["step"]
    resumed = run_worker(workdir, tiny_data, out, overrides=overrides)
    _assert_trees_equal(resumed, uninterrupted)


@pytest.mark.slow
def test_eight_devices_match_one_and_restore_on_one(tiny_data, tmp_path):
    overrides = {"num_epochs": 1}
    one = run_worker(
        str(tmp_path / "w1"), tiny_data, str(tmp_path / "r1.json"), overrides=overrides
    )
    eight_dir = str(tmp_path / "w8")
    eight = run_worker(
        eight_dir, tiny_data, str(tmp_path / "r8.json"), devices=8, overrides=overrides
    )
    assert sorted(one) == sorted(eight)
    for k in one:
        np.testing.assert_allclose(eight[k], one[k], rtol=1e-3, atol=ADAM_ATOL, err_msg=k)

    # The 8-device workdir loads as a model on this process's single device.
    from sipak_jax import model_io

    model, meta = model_io.load_model_dir(eight_dir, step=int(eight["step"]))
    assert meta.step == int(eight["step"])
    for key, value in model_io.flatten(model_io.weights_state(model)).items():
        np.testing.assert_array_equal(np.asarray(value), eight[key], err_msg=key)


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
                _worker_cmd(workdir, tiny_data, str(tmp_path / f"r{pid}.json"), overrides, extra),
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
    results = []
    for pid in range(2):
        with open(tmp_path / f"r{pid}.json") as f:
            results.append(json.load(f))
    assert results[0]["test"] == results[1]["test"]  # both processes evaluated the same model
    multi = final_weights(workdir)

    ref = run_worker(
        str(tmp_path / "ref"),
        tiny_data,
        str(tmp_path / "ref.json"),
        devices=4,
        overrides=overrides,
        extra=("--emulate_processes=2",),
    )
    for k in ref:
        np.testing.assert_allclose(multi[k], ref[k], rtol=1e-3, atol=ADAM_ATOL, err_msg=k)
