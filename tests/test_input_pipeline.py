"""The input pipeline on a tiny synthetic SIPaKMeD built through the real TFDS builder."""

import os
import subprocess
import sys
import textwrap

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sipak_jax import input_pipeline as ip
from sipak_jax import preprocessing as pp
from sipak_jax.distributed import make_mesh
from tfds_sipakmed.taxonomy import SIPAKMED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32


def _run(code: str, env=None, timeout=300):
    full_env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(manual_dir, data_dir): 12 synthetic cells per class, built with the real builder (in a
    subprocess, so that TensorFlow never enters this test process)."""
    root = tmp_path_factory.mktemp("sipakmed")
    manual, data = str(root / "manual"), str(root / "data")
    _run(
        f"""
        from tfds_sipakmed.synthetic import write_synthetic
        write_synthetic({manual!r}, 12, seed=3)
        import tfds_sipakmed
        tfds_sipakmed.build({manual!r}, {data!r}, 'grouped')
        """
    )
    return manual, data


@pytest.fixture(scope="module")
def train_cache(dataset):
    return ip.load_splits(dataset[1], "grouped", ("fold1", "fold2", "fold3"), SIZE, "pad")


def _crop_files(manual, file_name):
    return os.path.join(manual, file_name), os.path.join(manual, file_name[: -len(".bmp")])


def test_cache_shapes_dtypes_and_values_against_the_files(dataset, train_cache):
    manual, _ = dataset
    c = train_cache
    n = len(c)
    assert n == c.num_examples > 10
    assert c.image.shape == (n, SIZE, SIZE, 3) and c.image.dtype == np.uint8
    for f in ("label", "index"):
        assert getattr(c, f).dtype == np.int32 and getattr(c, f).shape == (n,)
    np.testing.assert_array_equal(c.index, np.arange(n))
    assert c.taxonomy == SIPAKMED  # from the build's metadata.json
    assert c.grouping["rule"] == "cluster image" and c.grouping["leak_free"]
    assert set(c.split) == {"fold1", "fold2", "fold3"}
    for split in ("fold1", "fold2", "fold3"):  # (split, file_name) order
        names = list(c.file_name[c.split == split])
        assert names == sorted(names)
    for i in (0, n // 2, n - 1):
        bmp, stem = _crop_files(manual, c.file_name[i])
        crop = cv2.imread(bmp, cv2.IMREAD_COLOR)[..., ::-1]
        np.testing.assert_array_equal(c.crop_shape[i], crop.shape[:2])
        np.testing.assert_allclose(c.mean_colour[i], crop.reshape(-1, 3).mean(0), rtol=1e-5)
        np.testing.assert_array_equal(c.image[i], pp.resize_crop(crop, SIZE, "pad"))
        for part, got in (("nuc", c.nucleus_contour[i]), ("cyt", c.cytoplasm_contour[i])):
            want = np.loadtxt(f"{stem}_{part}.dat", delimiter=",", ndmin=2, dtype=np.float32)
            np.testing.assert_array_equal(got, want.reshape(-1, 2))
        assert c.group_id[i] == f"{c.file_name[i].split('/')[0][3:]}/{c.file_name[i][-10:-7]}"
        frame = c.contour_in_frame(i, "cytoplasm")
        assert frame.min() >= -1 and frame.max() <= SIZE


def test_manual_dir_path_gives_identical_arrays(dataset, train_cache):
    manual, _ = dataset
    m = ip.load_splits(
        None, "grouped", ("fold1", "fold2", "fold3"), SIZE, "pad", manual_dir=manual, log=print
    )
    for f in (
        "image",
        "label",
        "group_id",
        "file_name",
        "split",
        "annotation_valid",
        "crop_shape",
        "mean_colour",
        "border_colour",
        "index",
    ):
        np.testing.assert_array_equal(getattr(m, f), getattr(train_cache, f), err_msg=f)
    for a, b in zip(m.nucleus_contour, train_cache.nucleus_contour, strict=True):
        np.testing.assert_array_equal(a, b)


def test_stretch_policy_and_thread_counts_give_the_same_cache(dataset):
    manual, data = dataset
    c = ip.load_splits(data, "grouped", "fold0", SIZE, "stretch", num_threads=1)
    assert (c.image_size, c.resize, c.num_examples) == (SIZE, "stretch", len(c))
    for i in (0, len(c) - 1):
        crop = cv2.imread(_crop_files(manual, c.file_name[i])[0], cv2.IMREAD_COLOR)[..., ::-1]
        np.testing.assert_array_equal(c.image[i], pp.resize_crop(crop, SIZE, "stretch"))
    # Worker threads fill the rows in any order; each row still lands in its own place.
    threaded = ip.load_splits(data, "grouped", "fold0", SIZE, "stretch", num_threads=4)
    np.testing.assert_array_equal(threaded.image, c.image)
    np.testing.assert_array_equal(threaded.file_name, c.file_name)
    for x, y in zip(threaded.cytoplasm_contour, c.cytoplasm_contour, strict=True):
        np.testing.assert_array_equal(x, y)


def test_both_sources_have_the_same_interface_and_examples(dataset):
    """The TFDS data source and the raw tree: the same records, and the same example at
    every index (grain's RandomAccessDataSource: `len` and `[i]`)."""
    manual, data = dataset
    splits = ("fold2", "fold4")
    tfds_src = ip.TfdsSource(data, "grouped", splits)
    raw_src = ip.RawTreeSource(manual, "grouped", splits, log=lambda s: None)
    assert len(tfds_src) == len(raw_src) == len(tfds_src.records) > 0
    assert tfds_src.records == raw_src.records
    assert [r.split for r in tfds_src.records] == sorted(r.split for r in tfds_src.records)
    for i in (0, len(raw_src) - 1):
        a, b = tfds_src[i], raw_src[i]
        assert a["file_name"] == b["file_name"] == tfds_src.records[i].file_name
        assert sorted(a) == sorted(b)  # the same keys: the common schema + SIPaKMeD's own
        for k in ("image", "label", "group_id", "cell_index", "nucleus_contour", "label_2class"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert tfds_src.taxonomy == raw_src.taxonomy == SIPAKMED


def test_raw_tree_gives_the_same_folds_as_the_tfds_build(dataset):
    manual, data = dataset
    kw = {"image_size": 8, "validation_fraction": 0.25, "validation_seed": 3}
    built = ip.load_folds(data, "grouped", 1, **kw)
    raw = ip.load_folds(None, "grouped", 1, manual_dir=manual, log=lambda s: None, **kw)
    for name in ("train", "validation", "test"):
        assert len(built[name]) > 0
        np.testing.assert_array_equal(raw[name].file_name, built[name].file_name)
        np.testing.assert_array_equal(raw[name].image, built[name].image)


def test_normalised_batches_for_both_weight_sources(train_cache):
    """A device batch normalised in jit equals Keras' and torchvision's own preprocessing."""
    torch = pytest.importorskip("torch")
    import torchvision.transforms.functional as TF
    from torchvision.models import ResNet50_Weights

    mesh = make_mesh()
    with ip.train_batches(train_cache, 8, mesh, seed=0, num_steps=1) as it:
        batch = next(it)
    images = np.asarray(batch["image"])
    assert images.dtype == np.uint8 and images.shape == (8, SIZE, SIZE, 3)
    assert batch["label"].dtype == jnp.int32 and batch["mask"].dtype == jnp.bool_
    np.testing.assert_array_equal(images, train_cache.image[np.asarray(batch["index"])])

    tv = pp.spec_for("torchvision", SIZE)
    got = np.asarray(jax.jit(lambda x: pp.normalize(x, tv))(batch["image"]))
    weights = ResNet50_Weights.IMAGENET1K_V1.transforms()
    t = torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float() / 255
    want = TF.normalize(t, weights.mean, weights.std).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)

    keras_resnet50 = pytest.importorskip("keras.applications.resnet50")
    ks = pp.spec_for("keras", SIZE)
    got = np.asarray(jax.jit(lambda x: pp.normalize(x, ks))(batch["image"]))
    want = keras_resnet50.preprocess_input(images.astype(np.float32))
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-4)


def _indices(it):
    return [np.asarray(b["index"]).tolist() for b in it]


def test_train_order_is_reproducible_and_resumable(train_cache):
    mesh = make_mesh()
    n, bs = len(train_cache), 4
    spe = ip.steps_per_epoch(train_cache, bs)
    assert spe == n // bs
    total = 3 * spe + 1
    first = _indices(ip.train_batches(train_cache, bs, mesh, seed=7, num_steps=total))
    assert len(first) == total and all(len(b) == bs for b in first)
    assert first == _indices(ip.train_batches(train_cache, bs, mesh, seed=7, num_steps=total))
    # Resuming at any step k gives exactly the batches of the uninterrupted run.
    for k in (1, spe - 1, spe, 2 * spe + 1):
        resumed = ip.train_batches(train_cache, bs, mesh, seed=7, start_step=k, num_steps=total - k)
        assert _indices(resumed) == first[k:]
    # An epoch visits spe * bs distinct examples (the remainder dropped); epochs differ.
    epochs = [sum(first[e * spe : (e + 1) * spe], []) for e in range(3)]
    for e in epochs:
        assert len(set(e)) == len(e) == spe * bs and set(e) <= set(range(n))
    assert epochs[0] != epochs[1]
    other = _indices(ip.train_batches(train_cache, bs, mesh, seed=8, num_steps=spe))
    assert other != first[:spe]
    assert other != first[spe : 2 * spe]  # seed 8 is not seed 7 shifted by an epoch
    # The batch of a step is the rows `train_rows` names (index == row in one process).
    assert first[spe + 2] == ip.train_rows(train_cache, bs, seed=7, step=spe + 2).tolist()


def test_eval_batches_cover_every_example_once(train_cache):
    mesh = make_mesh()
    batches = list(ip.eval_batches(train_cache, 8, mesh))
    n = len(train_cache)
    assert len(batches) == -(-n // 8) == ip.num_eval_steps(train_cache, 8)
    index = np.concatenate([np.asarray(b["index"]) for b in batches])
    mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
    np.testing.assert_array_equal(index[mask], np.arange(n))
    assert np.all(index[~mask] == -1) and mask.sum() == n
    last = batches[-1]
    assert np.all(np.asarray(last["image"])[~np.asarray(last["mask"])] == 0)


def test_process_shares_are_disjoint_and_complete(dataset):
    _, data = dataset
    shares = [
        ip.load_splits(data, "grouped", "fold0", SIZE, process_index=p, process_count=2)
        for p in range(2)
    ]
    n = shares[0].num_examples
    assert shares[1].num_examples == n and len(shares[0]) + len(shares[1]) == n
    np.testing.assert_array_equal(np.sort(np.concatenate([s.index for s in shares])), range(n))
    assert ip.steps_per_epoch(shares[0], 4) == (n // 2) // 2
    rows = ip.train_rows(shares[1], 4, seed=0, step=0)
    assert len(rows) == 2 and len(set(rows)) == 2


def test_carve_validation_is_grouped_stratified_and_deterministic():
    rng = np.random.default_rng(0)
    cluster_id, label = [], []  # SIPaKMeD's groups: cluster images
    for c in range(5):
        for k in range(40):
            size = int(rng.integers(1, 8))
            cluster_id += [f"C{c}/{k:03d}"] * size
            label += [c] * size
    cluster_id, label = np.asarray(cluster_id), np.asarray(label)
    val = ip.carve_validation(cluster_id, label, 0.15, seed=0)
    for cid in np.unique(cluster_id):  # no cluster on both sides
        assert len(set(val[cluster_id == cid])) == 1
    for c in range(5):
        frac = val[label == c].mean()
        assert abs(frac - 0.15) < 0.03, (c, frac)
    perm = rng.permutation(len(label))
    np.testing.assert_array_equal(
        ip.carve_validation(cluster_id[perm], label[perm], 0.15), val[perm]
    )
    assert not np.array_equal(ip.carve_validation(cluster_id, label, 0.15, seed=1), val)
    assert not ip.carve_validation(cluster_id, label, 0.0).any()


def test_load_folds_keeps_the_test_fold_apart(dataset):
    _, data = dataset
    folds = ip.load_folds(data, "grouped", test_fold=2, image_size=16, validation_fraction=0.2)
    assert set(folds["test"].split) == {"fold2"}
    train, val = folds["train"], folds["validation"]
    assert "fold2" not in set(train.split) | set(val.split)
    assert not set(train.group_id) & set(val.group_id)
    assert not set(train.file_name) & set(val.file_name)
    everything = ip.load_splits(data, "grouped", ("fold0", "fold1", "fold3", "fold4"), 16)
    assert sorted(train.file_name.tolist() + val.file_name.tolist()) == sorted(
        everything.file_name.tolist()
    )
    assert len(val) > 0


def test_reuse_decoded_prepares_each_cell_once_for_all_folds(dataset, monkeypatch):
    from sipak_jax.input_pipeline import cache as cache_lib

    _, data = dataset
    plain = [
        ip.load_folds(data, "grouped", test_fold=f, image_size=16, validation_fraction=0.2)
        for f in (0, 1)
    ]
    calls = []
    original = cache_lib._prepare
    monkeypatch.setattr(
        cache_lib, "_prepare", lambda *a, **k: calls.append(a[1]) or original(*a, **k)
    )
    with ip.reuse_decoded():
        reused = [
            ip.load_folds(data, "grouped", test_fold=f, image_size=16, validation_fraction=0.2)
            for f in (0, 1)
        ]
        once = len(calls)
        ip.load_folds(data, "grouped", test_fold=2, image_size=24, validation_fraction=0.2)
    assert once == len(set(calls[:once])) == sum(len(c) for c in plain[0].values())
    assert len(calls) == 2 * once  # another image size: decoded again
    for a, b in zip(plain, reused, strict=True):
        for name in ("train", "validation", "test"):
            np.testing.assert_array_equal(a[name].image, b[name].image)
            assert a[name].file_name.tolist() == b[name].file_name.tolist()
    ip.load_folds(data, "grouped", test_fold=3, image_size=16, validation_fraction=0.2)
    assert len(calls) == 3 * once  # outside the block: nothing kept


def test_clear_errors(dataset, tmp_path, train_cache):
    _, data = dataset
    with pytest.raises(FileNotFoundError, match="tfds_sipakmed.build"):
        ip.load_splits(str(tmp_path), "grouped", "fold0", SIZE)
    with pytest.raises(ValueError, match="Unknown split"):
        ip.load_splits(data, "grouped", "train", SIZE)
    with pytest.raises(ValueError, match="exactly one"):
        ip.load_splits(None, "grouped", "fold0", SIZE)
    mesh = make_mesh()
    with pytest.raises(ValueError, match="smaller batch"):
        ip.train_batches(train_cache, 4096, mesh, seed=0)
    with pytest.raises(ValueError, match="test_fold"):
        ip.load_folds(data, test_fold=5, validation_fraction=0.2)


def test_sharded_over_four_cpu_devices(dataset):
    """Batches are global arrays split row-wise over a 4-device `data` mesh, same content."""
    _, data = dataset
    out = _run(
        f"""
        import jax, numpy as np
        from sipak_jax import input_pipeline as ip
        from sipak_jax.distributed import make_mesh
        assert jax.device_count() == 4, jax.devices()
        c = ip.load_splits({data!r}, 'grouped', ('fold0', 'fold1'), 16)
        mesh = make_mesh()
        b = next(iter(ip.train_batches(c, 8, mesh, seed=1, num_steps=1)))
        rows = ip.train_rows(c, 8, seed=1, step=0)
        for k, v in b.items():
            assert v.shape[0] == 8 and len(v.addressable_shards) == 4, k
            for s in v.addressable_shards:
                assert s.data.shape[0] == 2
                i = s.index[0].start
                want = {{'image': c.image, 'label': c.label, 'index': c.index}}.get(k)
                if want is not None:
                    np.testing.assert_array_equal(np.asarray(s.data), want[rows[i:i + 2]])
        assert {{d.id for d in b['image'].sharding.device_set}} == {{0, 1, 2, 3}}
        e = list(ip.eval_batches(c, 8, mesh))
        assert sum(int(np.asarray(x['mask']).sum()) for x in e) == len(c)
        print('OK')
        """,
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )
    assert "OK" in out


def test_training_imports_never_load_tensorflow(dataset):
    """Loading data, making batches and augmenting in a fresh process imports no TensorFlow,
    and the manual-dir path works with TFDS itself made unimportable."""
    manual, data = dataset
    out = _run(
        f"""
        import sys, jax
        import tfds_sipakmed
        from sipak_jax import augment, input_pipeline as ip, preprocessing as pp
        from sipak_jax.distributed import make_mesh
        c = ip.load_splits({data!r}, 'grouped', 'fold0', 16)
        mesh = make_mesh()
        b = next(iter(ip.train_batches(c, 4, mesh, seed=0, num_steps=1)))
        x = jax.jit(lambda r, im: pp.normalize(augment.augment(r, im, ('rot90', 'flip')),
                                               pp.spec_for('keras')))(jax.random.key(0), b['image'])
        list(ip.eval_batches(c, 4, mesh))
        assert 'tensorflow_datasets' in sys.modules
        bad = sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.'))
        assert not bad, bad
        print('OK TFDS')
        """
    )
    assert "OK TFDS" in out
    # The GPU benchmark machine: no TensorFlow, no TFDS at all.
    out = _run(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        import tfds_sipakmed
        from sipak_jax import input_pipeline as ip
        from sipak_jax.distributed import make_mesh
        c = ip.load_splits(None, 'grouped', 'fold0', 16, manual_dir={manual!r}, log=lambda s: 0)
        assert len(c) > 0
        next(iter(ip.train_batches(c, 4, make_mesh(), seed=0, num_steps=1)))
        assert not [m for m in sys.modules if m.startswith('tensorflow')]
        print('OK manual')
        """
    )
    assert "OK manual" in out


def test_closed_or_abandoned_iterators_stop_their_threads(train_cache):
    import gc
    import threading
    import time

    def settles_to(count):
        deadline = time.time() + 10
        while threading.active_count() > count and time.time() < deadline:
            time.sleep(0.05)
        return threading.active_count() == count

    before = threading.active_count()
    it = ip.train_batches(train_cache, 4, make_mesh(), seed=0)  # endless
    next(it)
    assert threading.active_count() > before  # grain's reader and prefetch threads
    del it
    gc.collect()
    assert settles_to(before)
    with ip.eval_batches(train_cache, 4, make_mesh()) as it:
        next(it)
    assert settles_to(before)
    with pytest.raises(StopIteration):
        next(it)  # closed


def test_two_jax_processes_each_read_their_share(dataset, tmp_path):
    """A real multi-process run (JAX distributed runtime, 2 processes x 2 CPU devices): each
    process decodes only its share; together the global batches hold what one process sees."""
    _, data = dataset
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = textwrap.dedent(
        f"""
        import sys, json, jax, numpy as np
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        pid = int(sys.argv[1])
        jax.distributed.initialize(coordinator_address='127.0.0.1:{port}', num_processes=2,
                                   process_id=pid)
        from sipak_jax import input_pipeline as ip
        from sipak_jax.distributed import make_mesh
        c = ip.load_splits({data!r}, 'grouped', ('fold0', 'fold1'), 16)
        assert c.process_count == 2 and c.process_index == pid
        mesh = make_mesh()
        out = {{'n': len(c), 'total': c.num_examples, 'train': [], 'eval': []}}
        with ip.train_batches(c, 8, mesh, seed=5, num_steps=3) as it:
            for b in it:
                assert b['image'].shape == (8, 16, 16, 3)
                out['train'].append(np.asarray(b['index'].addressable_data(0)).tolist()
                                    + np.asarray(b['index'].addressable_data(1)).tolist())
        for b in ip.eval_batches(c, 8, mesh):
            m = np.concatenate([np.asarray(s.data) for s in b['mask'].addressable_shards])
            i = np.concatenate([np.asarray(s.data) for s in b['index'].addressable_shards])
            out['eval'] += i[m].tolist()
        json.dump(out, open({str(tmp_path)!r} + f'/p{{pid}}.json', 'w'))
        """
    )
    env = dict(
        os.environ,
        PYTHONPATH=REPO,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(p)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for p in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    import json

    res = [json.load(open(tmp_path / f"p{p}.json")) for p in range(2)]
    total = res[0]["total"]
    assert res[0]["n"] + res[1]["n"] == total
    # Each process's training rows are 4 distinct examples of its own share.
    shares = [set(range(p, total, 2)) for p in range(2)]
    for p in range(2):
        for rows in res[p]["train"]:
            assert len(rows) == 4 and set(rows) <= shares[p]
    assert sorted(res[0]["eval"] + res[1]["eval"]) == list(range(total))
