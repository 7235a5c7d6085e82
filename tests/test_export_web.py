"""The exported ONNX model in a browser: ONNX Runtime Web (WebAssembly) in a real Chromium
gives `predict.Predictor.probabilities` within 1e-4 on synthetic crops.

Needs Chromium (the `chromium` fixture: skipped with how to get one, a failure under
SIPAK_REQUIRE_BROWSER=1), Playwright, and onnxruntime-web's `dist/` folder, named by
$ORT_WEB_DIST (PyPI has no onnxruntime-web; without it the test is skipped with the command
that fetches it, a failure under SIPAK_REQUIRE_ORT_WEB=1).
"""

import functools
import http.server
import os
import threading

import export_fixtures as fx
import numpy as np
import pytest

from sipak_jax import export

ORT_WEB_VERSION = "1.30.0"
HOW_TO_GET_IT = (
    f"ONNX Runtime Web not found: `npm pack onnxruntime-web@{ORT_WEB_VERSION} && tar xzf "
    f"onnxruntime-web-{ORT_WEB_VERSION}.tgz` then ORT_WEB_DIST=$PWD/package/dist"
)

PAGE = """<!doctype html><html><body><script src="dist/ort.min.js"></script>
<script src="run.js"></script></body></html>"""

SCRIPT = """(async () => {
  try {
    ort.env.wasm.numThreads = 1;  // threads need a cross-origin isolated page
    ort.env.wasm.wasmPaths = new URL("dist/", location.href).href;
    const session = await ort.InferenceSession.create("cells.onnx", {executionProviders: ["wasm"]});
    const meta = await (await fetch("cells.onnx.json")).json();
    const pixels = new Uint8Array(await (await fetch("images.bin")).arrayBuffer());
    const [, s] = meta.input.shape;
    const images = new ort.Tensor("uint8", pixels, [pixels.length / (s * s * 3), s, s, 3]);
    const out = await session.run({images});
    window.result = {dims: out.probabilities.dims, data: Array.from(out.probabilities.data)};
  } catch (e) { window.result = {error: String(e)}; }
})();"""


def _ort_web_dist() -> str:
    dist = os.environ.get("ORT_WEB_DIST", "")
    if dist and not os.path.isfile(os.path.join(dist, "ort.min.js")):
        pytest.fail(f"ORT_WEB_DIST={dist} holds no ort.min.js", pytrace=False)
    if dist:
        return dist
    if os.environ.get("SIPAK_REQUIRE_ORT_WEB", "") not in ("", "0"):
        pytest.fail(f"{HOW_TO_GET_IT} (SIPAK_REQUIRE_ORT_WEB makes this a failure)", pytrace=False)
    pytest.skip(HOW_TO_GET_IT)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _run_in_chromium(chromium, site) -> dict:
    from playwright.sync_api import sync_playwright

    handler = functools.partial(_Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.server_port}/index.html")
            page.wait_for_function("window.result !== undefined", timeout=120_000)
            result = page.evaluate("window.result")
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    return result


def test_onnx_runtime_web_in_chromium_equals_the_jax_model(chromium, tmp_path):
    dist = _ort_web_dist()
    from sipak_jax import model_io, predict

    files = fx.synthetic_crops(tmp_path / "synthetic")
    checkpoint = fx.model_dir(tmp_path / "model", "resnet_v1.5", files)
    site = tmp_path / "site"
    export.export(checkpoint, str(site / "cells.onnx"))
    os.symlink(os.path.abspath(dist), site / "dist")  # served through the link
    (site / "index.html").write_text(PAGE)
    (site / "run.js").write_text(SCRIPT)
    model, meta = model_io.load_model_dir(checkpoint)
    images = fx.images(files, meta.preprocessing)
    images.tofile(site / "images.bin")

    result = _run_in_chromium(chromium, site)
    assert "error" not in result, result.get("error")
    got = np.asarray(result["data"], np.float32).reshape(result["dims"])
    want = predict.Predictor(model, meta, batch_size=4).probabilities(images)
    assert got.shape == want.shape == (len(files), 5)
    np.testing.assert_allclose(got, want, rtol=0, atol=fx.TOLERANCE)
    assert len(set(want.argmax(1))) >= 2  # the cells get different calls
