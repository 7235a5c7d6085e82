"""main.py and the configs: locked configs fail loudly on typos; config arguments parse; a
user's mistake (missing data, missing weights, a wrong path) is one line naming the fix, exit
code 2, and nothing created; cluster detection for jax.distributed. (main.py on a built
dataset, end to end: tests/test_train.py::test_main_command_on_the_default_data_dir.)"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _main(*args, timeout=300, **env_vars):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", **env_vars)
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


def _assert_one_line_error(proc, *fragments):
    """Exit code 2, stderr is one line `error: ...` holding `fragments`, no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_wrong_type_and_bad_fold_fail_clearly(tmp_path):
    proc = _main("--config=configs/demo.py", "--config.num_epochs=many", f"--workdir={tmp_path}")
    assert proc.returncode != 0 and "num_epochs" in proc.stderr
    proc = _main("--config=configs/resnet50.py:fold=7", f"--workdir={tmp_path / 'w'}")
    _assert_one_line_error(proc, "config.fold must be 0..4 or 'all'")
    assert not (tmp_path / "w").exists()
    proc = _main(
        "--config=configs/demo.py", "--config.learning_rate=inf", f"--workdir={tmp_path / 'w'}"
    )
    _assert_one_line_error(proc, "config.learning_rate must be a finite number, got inf")
    assert not (tmp_path / "w").exists()


def test_missing_dataset_is_one_line_with_the_build_command(tmp_path):
    workdir = tmp_path / "w"
    empty = tmp_path / "tfds"
    proc = _main("--config=configs/resnet50.py", f"--workdir={workdir}", TFDS_DATA_DIR=str(empty))
    _assert_one_line_error(
        proc,
        f"no built sipakmed/grouped dataset in {empty}",
        "$TFDS_DATA_DIR",
        "python -m tfds_sipakmed.build --manual_dir=",
        f"--data_dir={empty}",
    )
    assert not workdir.exists() and not empty.exists()
    # A wrong path given explicitly is named as such.
    proc = _main(
        "--config=configs/resnet50.py",
        f"--config.data_dir={tmp_path / 'nope'}",
        f"--workdir={workdir}",
    )
    _assert_one_line_error(proc, f"config.data_dir={tmp_path / 'nope'} does not exist")
    proc = _main(
        "--config=configs/resnet50.py",
        f"--config.manual_dir={tmp_path / 'archives'}",
        f"--workdir={workdir}",
    )
    _assert_one_line_error(proc, "config.manual_dir:", "does not exist")
    assert not workdir.exists()


def test_missing_weights_are_one_line_with_the_convert_command(tmp_path):
    workdir = tmp_path / "w"
    proc = _main(
        "--config=configs/demo.py",  # synthetic data: only the weights can be missing
        f"--config.init_from={tmp_path / 'resnet50-11ad3fa6.pth'}",
        f"--workdir={workdir}",
        SIPAK_JAX_WEIGHTS_CACHE=str(tmp_path / "cache"),
    )
    _assert_one_line_error(
        proc,
        "config.init_from=",
        "python -m sipak_jax.convert --source=torchvision --download --input=resnet50-11ad3fa6.pth",
    )
    (tmp_path / "not_a_model").mkdir()
    proc = _main(
        "--config=configs/demo.py",
        f"--config.init_from={tmp_path / 'not_a_model'}",
        f"--workdir={workdir}",
    )
    _assert_one_line_error(proc, "without metadata.json: not a model DIR")
    assert not workdir.exists()


def test_workdir_is_required():
    proc = _main("--config=configs/demo.py")
    assert proc.returncode != 0 and "workdir" in proc.stderr


def test_config_arguments():
    from configs import common, demo, resnet50

    assert resnet50.get_config().fold == "0"
    assert resnet50.get_config("fold=all").fold == "all"
    assert resnet50.get_config("fold=3").fold == "3"
    c = demo.get_config("fold=4")
    assert c.fold == "4" and c.synthetic.cells_per_class > 0 and not c.init_from
    with pytest.raises(ValueError, match="unknown config argument 'folds'"):
        resnet50.get_config("folds=2")
    with pytest.raises(ValueError, match="unknown config argument 'demo'"):
        resnet50.get_config("demo")
    assert common.parse_arg("a=3,b", a=1, b=False, c="x") == {"a": 3, "b": True, "c": "x"}
    # The configs build on each other one way: the demo on the recipe, never back.
    with open(os.path.join(ROOT, "configs", "resnet50.py")) as f:
        assert "demo" not in "".join(line for line in f if "import" in line)
    for config in (resnet50.get_config(), demo.get_config()):
        from sipak_jax import train

        train.check_config(config)  # every default evaluator, op and field is valid
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


def test_quiet_libraries_hides_library_chatter_not_ours_nor_errors():
    import logging

    from absl import logging as absl_logging

    from sipak_jax import console

    def shown(pathname, level):
        record = logging.LogRecord("absl", level, pathname, 1, "message", None, None)
        handler = absl_logging.get_absl_handler()
        return handler.filter(record) and absl_logging.get_absl_logger().filter(record)

    orbax_file = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    root_level = logging.getLogger().level
    try:
        console.quiet_libraries(0)
        assert not console.is_verbose()
        assert absl_logging.get_verbosity() == absl_logging.WARNING
        assert not shown(orbax_file, logging.WARNING)  # "Given directory is read only"
        assert not shown("/site-packages/tensorflow_datasets/core/x.py", logging.INFO)
        assert shown(orbax_file, logging.ERROR)
        assert shown("/work/main/sipak_jax/train.py", logging.WARNING)
        console.quiet_libraries(1)  # --verbosity=1: everything again
        assert console.is_verbose() and shown(orbax_file, logging.INFO)
    finally:
        console.quiet_libraries(1)
        absl_logging.set_verbosity(absl_logging.INFO)
        logging.getLogger().setLevel(root_level)


def test_fail_prints_one_line_and_exits_2(capsys):
    from sipak_jax import console

    exit_ = console.fail("no data in\n  /x; build it")
    assert isinstance(exit_, SystemExit) and exit_.code == 2
    assert capsys.readouterr().err == "error: no data in /x; build it\n"
