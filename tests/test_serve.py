"""The screening service through an HTTP client: every endpoint, limit and bad-input kind, the
rows against `python -m sipak_jax.predict`, the token, the headers, and a load test on a real
uvicorn server."""

import asyncio
import csv
import io
import json
import re
import zipfile

import cv2
import numpy as np
import pytest

from sipak_jax import imageheader, predict
from sipak_jax.serve import app as app_module
from sipak_jax.serve import engine as engine_module
from sipak_jax.serve.__main__ import main as serve_main
from sipak_jax.serve.__main__ import model_info
from sipak_jax.serve.uploads import MB, Limits
from tests import serve_fixtures as fx
from tfds_sipakmed.taxonomy import SIPAKMED

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return fx.make_model_dir(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def engine(model_dir):
    predictor = engine_module.load(model_dir, (1, 8, 32))
    eng = engine_module.Engine(predictor, (1, 8, 32), max_wait_s=0.01).start()
    yield eng
    eng.close()


def _client(engine, model_dir, limits=None, token=None):
    from fastapi.testclient import TestClient

    service = app_module.Service(
        engine, model_info(engine.predictor, model_dir), limits or Limits(), token, 2
    )
    return TestClient(app_module.create_app(service))


@pytest.fixture(scope="module")
def client(engine, model_dir):
    return _client(engine, model_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three good cells on disk (PNG, JPEG, BMP) and their bytes."""
    d = tmp_path_factory.mktemp("cells")
    out = {}
    for k, ext in enumerate([".png", ".jpg", ".bmp"]):
        data = fx.encode(fx.cell(k, 40 + 10 * k, 50), ext)
        (d / f"cell{k}{ext}").write_bytes(data)
        out[f"cell{k}{ext}"] = data
    return d, out


@pytest.fixture(scope="module")
def cli_rows(model_dir, images, tmp_path_factory):
    """`python -m sipak_jax.predict` on the same files: jsonl and csv rows by file name."""
    d, _ = images
    out = tmp_path_factory.mktemp("pred")
    assert predict.main([f"--checkpoint={model_dir}", f"--output={out / 'p.jsonl'}", str(d)]) == 0
    assert predict.main([f"--checkpoint={model_dir}", f"--output={out / 'p.csv'}", str(d)]) == 0
    with open(out / "p.jsonl") as f:
        rows = [json.loads(line) for line in f]
    with open(out / "p.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    return rows, csv_rows


def _files(named: dict):
    return [("files", (name, data, "application/octet-stream")) for name, data in named.items()]


def _same_row(served: dict, cli: dict):
    assert set(served) == set(cli)
    for key in served:
        if key == "path":
            continue
        if key == "probabilities":
            np.testing.assert_allclose(served[key], cli[key], rtol=1e-5, atol=1e-7)
        elif key == "p_abnormal":
            assert served[key] == pytest.approx(cli[key], rel=1e-5, abs=1e-7)
        else:
            assert served[key] == cli[key], key


# ---- the endpoints ----------------------------------------------------------------------


def test_health_model_and_openapi(client, model_dir):
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/api/v1/model").json()
    assert info["taxonomy"] == SIPAKMED.to_dict()
    assert info["preprocessing"]["image_size"] == fx.SIZE
    assert info["temperature"] == pytest.approx(fx.TEMPERATURE)
    assert info["members"][0]["path"] == model_dir and info["members"][0]["kind"] == "converted"
    assert info["batch_sizes"] == [1, 8, 32]
    assert info["limits"]["max_files"] == Limits().max_files
    doc = client.get("/api/v1/openapi.json").json()
    for path in ("/api/v1/predict", "/api/v1/explain", "/api/v1/model", "/api/v1/export"):
        assert path in doc["paths"], path
    body = doc["paths"]["/api/v1/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body


def test_predict_rows_are_predicts_rows(client, images, cli_rows):
    _, data = images
    names = sorted(data)
    response = client.post("/api/v1/predict", files=_files({n: data[n] for n in names}))
    assert response.status_code == 200
    rows = response.json()["rows"]
    assert [r["path"] for r in rows] == names  # the order sent, the names uploaded
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in cli_rows[0]}
    for row in rows:
        _same_row(row, by_name[row["path"]])


def test_every_bad_file_gets_its_own_row_and_the_rest_is_answered(client, images):
    _, data = images
    good = data["cell0.png"]
    sent = {
        "good.png": good,
        "empty.png": b"",
        "truncated.png": good[: len(good) // 2],
        "text.png": b"not an image at all\n",
        "bomb.png": fx.png_bomb(),
        "good2.png": good,
    }
    assert len(sent["bomb.png"]) < 200_000
    rows = client.post("/api/v1/predict", files=_files(sent)).json()["rows"]
    assert [r["path"] for r in rows] == list(sent)
    by = {r["path"]: r for r in rows}
    assert by["good.png"]["error"] is None and by["good2.png"]["error"] is None
    assert by["good.png"]["probabilities"] == by["good2.png"]["probabilities"]
    for name in ("empty.png", "truncated.png", "text.png"):
        # exactly predict's message for an undecodable file
        assert by[name] == {
            "path": name,
            "error": f"Cannot decode {name} as an image (empty, truncated or not an image "
            "format OpenCV reads); check the file or convert it to PNG.",
        }
    assert set(by["bomb.png"]) == {"path", "error"}
    assert "30000x30000" in by["bomb.png"]["error"] and "limit" in by["bomb.png"]["error"]


def test_image_headers_match_opencv():
    """Dimensions read from the header equal what OpenCV decodes, for every format."""
    rgb = fx.cell(3, 37, 53)
    for ext in (".png", ".jpg", ".bmp", ".tif"):
        data = fx.encode(rgb, ext)
        fmt, w, h = imageheader.dimensions(data)
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert (h, w) == decoded.shape[:2], ext
        assert fmt == {".jpg": "jpeg", ".tif": "tiff"}.get(ext, ext[1:])
    assert imageheader.dimensions(fx.png_bomb())[1:] == (30_000, 30_000)
    assert imageheader.dimensions(b"GIF89a....") is None
    assert imageheader.dimensions(b"\x89PNG\r\n\x1a\n") is None  # cut short


def _zip(entries: dict, compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_zip_upload_with_traversal_entries(client, images):
    _, data = images
    archive = _zip(
        {
            "cells/a.png": data["cell0.png"],
            "../../etc/evil.png": data["cell1.jpg"],
            "/abs.png": data["cell1.jpg"],
            "cells/notes.txt": b"hello",
            "__MACOSX/cells/._a.png": b"junk",
            "cells/b.bmp": data["cell2.bmp"],
        }
    )
    body = client.post("/api/v1/predict", files=_files({"batch.zip": archive})).json()
    by = {r["path"]: r for r in body["rows"]}
    assert list(by) == [
        "batch.zip/cells/a.png",
        "batch.zip/../../etc/evil.png",
        "batch.zip//abs.png",
        "batch.zip/cells/b.bmp",
    ]
    assert by["batch.zip/cells/a.png"]["error"] is None
    assert by["batch.zip/cells/b.bmp"]["error"] is None
    assert "unsafe path" in by["batch.zip/../../etc/evil.png"]["error"]
    assert "unsafe path" in by["batch.zip//abs.png"]["error"]
    assert sorted(body["skipped"]) == [
        "batch.zip/__MACOSX/cells/._a.png",
        "batch.zip/cells/notes.txt",
    ]


def test_zip_bomb_entry_count_and_broken_zip(engine, model_dir, images):
    _, data = images
    limits = Limits(max_zip_bytes=8 * MB, max_zip_entries=20)
    client = _client(engine, model_dir, limits)
    bomb = _zip({"zeros.png": b"\x00" * (64 * MB)})
    assert len(bomb) < 200_000
    many = _zip({f"c{i}.png": data["cell0.png"] for i in range(21)})
    sent = {
        "bomb.zip": bomb,
        "many.zip": many,
        "broken.zip": b"PK\x03\x04garbage",
        "ok.png": data["cell0.png"],
    }
    rows = client.post("/api/v1/predict", files=_files(sent)).json()["rows"]
    assert [r["path"] for r in rows] == list(sent)
    assert "zip bomb" in rows[0]["error"] and f"{64 * MB:,}" in rows[0]["error"]
    assert "21 entries" in rows[1]["error"]
    assert "not a readable zip" in rows[2]["error"]
    assert rows[3]["error"] is None


def test_request_limits(engine, model_dir, images):
    _, data = images
    client = _client(engine, model_dir, Limits(max_request_bytes=64 * 1024))
    big = {"big.png": b"\x00" * (100 * 1024)}
    response = client.post("/api/v1/predict", files=_files(big))
    assert response.status_code == 413
    assert response.json()["detail"] == "the request is larger than 65,536 bytes; split it"
    client = _client(engine, model_dir, Limits(max_files=10, max_file_bytes=1000))
    response = client.post("/api/v1/predict", files=_files({"a.png": b"\x00" * 2000}))
    assert response.status_code == 413 and "1,000 bytes" in response.json()["detail"]
    thousand = {f"c{i}.png": data["cell0.png"][:10] for i in range(1000)}
    response = client.post("/api/v1/predict", files=_files(thousand))
    assert response.status_code == 413 and "more than 10 files" in response.json()["detail"]
    ok = client.post("/api/v1/predict", files=_files({"a.png": data["cell0.png"][:900]}))
    assert ok.status_code == 200 and ok.json()["rows"][0]["error"].startswith("Cannot decode")


def test_a_thousand_files_under_the_default_limits(client, images):
    _, data = images
    thousand = {f"c{i}.png": data["cell0.png"] for i in range(1000)}
    response = client.post("/api/v1/predict", files=_files(thousand))
    assert response.status_code == 413
    assert f"more than {Limits().max_files} files" in response.json()["detail"]
    assert client.get("/healthz").status_code == 200


def test_malformed_requests(client):
    assert client.post("/api/v1/predict", content=b"x").status_code == 415
    r = client.post(
        "/api/v1/predict",
        content=b'--b\r\nContent-Disposition: form-data; name="files"\r\n\r\nabc',
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert r.status_code == 400 and "cut short" in r.json()["detail"]
    r = client.post("/api/v1/predict", files=[("other", ("a.png", b"x", "image/png"))])
    assert r.status_code == 400 and "no files" in r.json()["detail"]
    assert client.get("/healthz").status_code == 200


# ---- explanations -------------------------------------------------------------------------


def _png(b64: str) -> np.ndarray:
    import base64

    return cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("method,name", [("gradcam", "gradcam"), ("integrated_gradients", "ig")])
def test_explain(client, engine, images, method, name):
    from sipak_jax import preprocessing, saliency

    _, data = images
    raw = data["cell1.jpg"]
    r = client.post(
        "/api/v1/explain", files=[("file", ("c.jpg", raw, "image/jpeg"))], data={"method": method}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    predictor = engine.predictor
    rgb = preprocessing.decode_image(raw, "c.jpg")
    x = preprocessing.preprocess_image(rgb, predictor.spec)
    target = body["row"]["label_index"]
    expected = predictor.explain(x[None], name, np.asarray([target]))[0]
    got = _png(body["map_png"])
    assert got.shape == (fx.SIZE, fx.SIZE)
    np.testing.assert_allclose(got, np.rint(np.clip(expected, 0, 1) * 255), atol=1)
    assert _png(body["overlay_png"]).shape[:2] == rgb.shape[:2]
    assert _png(body["image_png"]).shape[:2] == rgb.shape[:2]
    where = body["where"][0]
    if method == "gradcam":
        stage = saliency.overlay_stage(predictor.model, fx.SIZE)
        assert where["layer"] == saliency.layer_name(stage)
        assert where["map_size"] == list(saliency.stage_map_sizes(predictor.model, fx.SIZE)[stage])
        assert re.search(r"Grad-CAM at layer\d, \d+x\d+ map on a 32 px input", body["description"])
    else:
        assert where["layer"] is None and where["map_size"] == [fx.SIZE, fx.SIZE]


def test_explain_bad_input(client, images):
    _, data = images
    r = client.post(
        "/api/v1/explain",
        files=[("file", ("c.png", data["cell0.png"], "image/png"))],
        data={"method": "eval"},
    )
    assert r.status_code == 400
    r = client.post(
        "/api/v1/explain",
        files=[("file", ("t.png", b"text", "image/png"))],
        data={"method": "gradcam"},
    )
    assert r.status_code == 422 and r.json()["row"]["error"].startswith("Cannot decode t.png")


# ---- exports ------------------------------------------------------------------------------


def test_export_csv_jsonl_equal_predicts_files(client, images, cli_rows):
    _, data = images
    names = sorted(data)
    rows = client.post("/api/v1/predict", files=_files({n: data[n] for n in names})).json()["rows"]
    csv_text = client.post("/api/v1/export?format=csv", json={"rows": rows}).text
    served = list(csv.DictReader(io.StringIO(csv_text)))
    cli = {r["path"].rsplit("/", 1)[-1]: r for r in cli_rows[1]}
    assert list(served[0]) == list(next(iter(cli.values())))  # the same columns, in order
    for row in served:
        ref = cli[row["path"]]
        for key, value in row.items():
            if key.startswith("p_") and value:
                assert float(value) == pytest.approx(float(ref[key]), rel=1e-5, abs=1e-7)
            elif key != "path":
                assert value == ref[key], key
    lines = client.post("/api/v1/export?format=jsonl", json={"rows": rows}).text.splitlines()
    assert [json.loads(line) for line in lines] == rows


def test_export_html_escapes_file_names(client, images):
    _, data = images
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>.png'
    rows = client.post(
        "/api/v1/predict", files=_files({evil: data["cell0.png"], "bad<b>.png": b""})
    ).json()["rows"]
    r = client.post("/api/v1/export?format=html", json={"rows": rows})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "attachment" in r.headers["content-disposition"]
    assert "<script" not in r.text and "<img" not in r.text and "<b>" not in r.text
    assert "&lt;script&gt;" in r.text and "1 files failed" in r.text
    bad = client.post("/api/v1/export?format=csv", json={"rows": "nope"})
    assert bad.status_code == 400
    assert client.post("/api/v1/export?format=exe", json={"rows": rows}).status_code == 400


# ---- safety: token, headers, the page -----------------------------------------------------


def test_token_is_checked_on_every_api_call(engine, model_dir, images):
    _, data = images
    client = _client(engine, model_dir, token=TOKEN)
    good = {"Authorization": f"Bearer {TOKEN}"}
    for method, path, kwargs in [
        ("get", "/api/v1/model", {}),
        ("post", "/api/v1/predict", {"files": _files({"a.png": data["cell0.png"]})}),
        (
            "post",
            "/api/v1/explain",
            {
                "files": [("file", ("a.png", data["cell0.png"], "image/png"))],
                "data": {"method": "gradcam"},
            },
        ),
        ("post", "/api/v1/export?format=csv", {"json": {"rows": []}}),
    ]:
        call = getattr(client, method)
        assert call(path, **kwargs).status_code == 401, path
        assert call(path, headers={"Authorization": "Bearer wrong"}, **kwargs).status_code == 401
        assert call(path, headers=good, **kwargs).status_code == 200, path
    assert client.get("/healthz").status_code == 200
    assert client.get("/").status_code == 200


def test_security_headers_and_a_page_without_inline_script(client):
    page = client.get("/")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["x-frame-options"] == "DENY"
    html = page.text
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all('src="/' in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # no external asset
    for asset in ("/app.js", "/style.css"):
        r = client.get(asset)
        assert r.status_code == 200 and "http://" not in r.text and "https://" not in r.text
    assert client.get("/api/v1/model").headers["cache-control"] == "no-store"
    assert client.get("/../../etc/passwd").status_code == 404


def test_cli_refuses_an_open_bind_without_a_token(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        serve_main([f"--checkpoint={model_dir}", "--host=0.0.0.0"])
    assert e.value.code == 2 and "--token_file" in capsys.readouterr().err
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(SystemExit) as e:
        serve_main([f"--checkpoint={model_dir}", f"--token_file={empty}"])
    assert e.value.code == 2 and "at least 8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        serve_main([f"--checkpoint={tmp_path / 'missing'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "missing" in err and "Traceback" not in err


# ---- the worker and the load test ---------------------------------------------------------


class _Flaky:
    """A predictor whose first call fails (the worker must carry on)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.image_size, self.class_names = inner.image_size, inner.class_names
        self.batch_size = inner.batch_size

    def predict_with_uncertainty(self, images):
        self.calls += 1
        if self.calls == 1 + 3:  # after the three warm-up batches
            raise RuntimeError("boom")
        return self.inner.predict_with_uncertainty(images)


def test_a_failing_batch_fails_only_its_requests(engine):
    flaky = engine_module.Engine(_Flaky(engine.predictor), (1, 8, 32)).start()
    try:
        x = np.zeros((2, fx.SIZE, fx.SIZE, 3), np.uint8)
        with pytest.raises(RuntimeError, match="boom"):
            flaky.predict(x).result(timeout=60)
        probs, unc = flaky.predict(x).result(timeout=60)
        assert probs.shape == (2, 5) and unc is None
    finally:
        flaky.close()


def test_load_64_concurrent_requests(engine, model_dir, images):
    """64 requests at once on a real server: every image exactly one row, the same
    probabilities as alone, batched together, and the server answers afterwards."""
    import httpx

    _, data = images
    client = _client(engine, model_dir)
    alone = client.post("/api/v1/predict", files=_files({"x.png": data["cell0.png"]})).json()
    reference = alone["rows"][0]["probabilities"]
    before = engine.batches_run

    async def one(http, k):
        n = 1 + k % 3
        files = [("files", (f"r{k}_{i}.png", data["cell0.png"], "image/png")) for i in range(n)]
        r = await http.post("/api/v1/predict", files=files)
        return k, n, r

    async def run(url):
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            return await asyncio.gather(*(one(http, k) for k in range(64)))

    with fx.live_server(client.app) as url:
        results = asyncio.run(run(url))
        assert httpx.get(url + "/healthz").json() == {"status": "ok"}
    total = 0
    for k, n, r in results:
        assert r.status_code == 200
        rows = r.json()["rows"]
        assert [row["path"] for row in rows] == [f"r{k}_{i}.png" for i in range(n)]
        for row in rows:
            np.testing.assert_allclose(row["probabilities"], reference, rtol=1e-5, atol=1e-7)
        total += n
    assert total == sum(1 + k % 3 for k in range(64))
    assert engine.batches_run - before < 64  # requests were gathered into shared batches


@pytest.mark.slow  # a second model and an ensemble compile: ~20 s on a loaded CPU
def test_an_ensemble_gives_uncertainty_and_members(model_dir, images, tmp_path):
    """A,B: the ensemble's probabilities (the members' mean) and its mutual information."""
    from fastapi.testclient import TestClient

    from sipak_jax import ensemble, imageio
    from sipak_jax.serve.__main__ import _parser, build

    other = fx.make_model_dir(tmp_path / "other", seed=1)
    spec = f"{model_dir},{other}"
    app, eng = build(_parser().parse_args([f"--checkpoint={spec}", "--batch_sizes=1,4"]))
    try:
        client = TestClient(app)
        info = client.get("/api/v1/model").json()
        assert info["ensemble"] and [m["path"] for m in info["members"]] == [model_dir, str(other)]
        _, data = images
        rows = client.post("/api/v1/predict", files=_files(data)).json()["rows"]
    finally:
        eng.close()
    reference = ensemble.load_predictor(spec)
    for row in rows:
        x, _, err = imageio.decode_for_model(data[row["path"]], reference.spec, row["path"])
        assert err is None
        probs, unc = reference.predict_with_uncertainty(x[None])
        np.testing.assert_allclose(row["probabilities"], probs[0], rtol=1e-5, atol=1e-7)
        assert row["uncertainty"] == pytest.approx(float(unc[0]), rel=1e-4, abs=1e-9)
        assert row["uncertainty"] > 0 and row["members"] == [model_dir, str(other)]
