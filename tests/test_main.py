"""main.py and the configs: locked configs fail loudly on typos; config arguments parse;
cluster detection for jax.distributed."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _main(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "main.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_config_typo_fails_before_anything_runs(tmp_path):
    workdir = tmp_path / "w"
    proc = _main("--config=configs/demo.py", "--config.num_epochss=3", f"--workdir={workdir}")
    assert proc.returncode != 0
    assert "num_epochss" in proc.stderr
    assert not workdir.exists()


def test_wrong_type_and_bad_fold_fail_clearly(tmp_path):
    proc = _main("--config=configs/demo.py", "--config.num_epochs=many", f"--workdir={tmp_path}")
    assert proc.returncode != 0 and "num_epochs" in proc.stderr
    proc = _main("--config=configs/resnet50.py:fold=7", f"--workdir={tmp_path / 'w'}")
    assert proc.returncode != 0
    assert "config.fold must be 0..4 or 'all'" in proc.stderr


def test_workdir_is_required():
    proc = _main("--config=configs/demo.py")
    assert proc.returncode != 0 and "workdir" in proc.stderr


def test_config_arguments():
    from configs import demo, resnet50

    assert resnet50.get_config().fold == "0"
    assert resnet50.get_config("fold=all").fold == "all"
    assert resnet50.get_config("fold=3").fold == "3"
    c = resnet50.get_config("demo,fold=2")
    assert c.fold == "2" and c.synthetic.cells_per_class > 0 and not c.init_from
    assert demo.get_config("fold=4").fold == "4"
    with pytest.raises(ValueError, match="unknown config argument 'folds'"):
        resnet50.get_config("folds=2")
    full = resnet50.get_config()
    assert full.head_epochs > 0 and full.label_smoothing > 0 and full.grad_clip_norm > 0
    assert full.image_size == 224 and full.compute_dtype == "bfloat16"
    for op in ("rot90", "flip", "rotate(180)"):
        assert op in full.augment


def test_cluster_detection():
    from sipak_jax import distributed

    assert distributed.cluster_kind({}) is None
    assert distributed.cluster_kind({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None
    slurm = {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "n[1-2]"}
    assert distributed.cluster_kind(slurm) == "slurm"
    assert distributed.cluster_kind({"TPU_WORKER_HOSTNAMES": "a"}) is None
    assert distributed.cluster_kind({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu_pod"
    assert distributed.cluster_kind({"JAX_COORDINATOR_ADDRESS": "h:1"}) == "explicit"
    assert distributed.initialize(env={}) is False
    with pytest.raises(ValueError, match="without the number of processes"):
        distributed.initialize("127.0.0.1:1234", env={})
    with pytest.raises(ValueError, match="process_id 3 is not in 0..1"):
        distributed.initialize("127.0.0.1:1234", 2, 3, env={})
