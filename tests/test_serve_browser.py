"""The screening page in a real Chromium driven by Playwright: upload three images of which one
is broken, see two rows and one error, open the overlays by keyboard, filter, and export the
CSV, compared with `python -m sipak_jax.predict`'s CSV for the same files.

Chromium is Debian's (`apt-get install chromium`), found like every browser test
(`tests/browser.py`: $CHROMIUM or a chromium on PATH) and launched through Playwright's
`executable_path` (`playwright install` cannot download a browser on our machines). Without
one the test is skipped with how to get one; under SIPAK_REQUIRE_BROWSER=1 (CI) it fails.
"""

import csv
import io
import zipfile

import pytest

from sipak_jax import predict
from tests import serve_fixtures as fx


@pytest.fixture(scope="module")
def served(chromium, tmp_path_factory):
    """(base URL, image dir, model DIR) of a live server over a tiny model."""
    from sipak_jax.serve import app as app_module
    from sipak_jax.serve import engine as engine_module
    from sipak_jax.serve.__main__ import model_info

    root = tmp_path_factory.mktemp("browser")
    model_dir = fx.make_model_dir(root / "tiny")
    d = root / "cells"
    d.mkdir()
    (d / "alpha.png").write_bytes(fx.encode(fx.cell(1), ".png"))
    (d / "beta.bmp").write_bytes(fx.encode(fx.cell(2, 60, 44), ".bmp"))
    (d / "broken.png").write_bytes(b"this is text, not a PNG\n")
    predictor = engine_module.load(model_dir)
    engine = engine_module.Engine(predictor).start()
    service = app_module.Service(engine, model_info(predictor, model_dir))
    with fx.live_server(app_module.create_app(service)) as url:
        yield url, d, model_dir
    engine.close()


@pytest.mark.slow  # a model, a live server, Chromium and two explanations: ~1 min loaded
def test_upload_overlay_filter_and_export(served, chromium, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, d, model_dir = served
    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        page = browser.new_page(accept_downloads=True)
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(url)
        expect(page.locator("#model-line")).to_contain_text("classes: Dyskeratotic")
        page.set_input_files(
            "#files", [str(d / n) for n in ("alpha.png", "beta.bmp", "broken.png")]
        )
        expect(page.locator("#progress-text")).to_have_text("Done: 3 files.", timeout=120_000)
        expect(page.locator("#summary")).to_contain_text("2 classified")
        expect(page.locator("#summary")).to_contain_text("1 failed")
        expect(page.locator("#rows tr")).to_have_count(3)
        expect(page.locator("#rows tr.failed")).to_have_count(1)
        failures = page.locator("#failure-list li")
        expect(failures).to_have_count(1)
        expect(failures).to_have_text(
            "broken.png: Cannot decode broken.png as an image (empty, truncated or not an image "
            "format OpenCV reads); check the file or convert it to PNG."
        )

        # Open a cell by keyboard: the crop beside its Grad-CAM and IG overlays.
        button = page.get_by_role("button", name="Explain alpha.png")
        button.focus()
        page.keyboard.press("Enter")
        expect(page.locator("#detail-h")).to_have_text("alpha.png")
        expect(page.locator("#detail-gradcam-cap")).to_contain_text(
            "Grad-CAM at layer", timeout=180_000
        )
        expect(page.locator("#detail-gradcam-cap")).to_contain_text("map on a 32 px input")
        expect(page.locator("#detail-ig-cap")).to_contain_text(
            "Integrated Gradients, 32x32 map on a 32 px input", timeout=180_000
        )
        for img in ("#detail-crop", "#detail-gradcam", "#detail-ig"):
            assert page.eval_on_selector(img, "e => e.complete && e.naturalWidth > 0"), img
        page.keyboard.press("Escape")
        expect(page.locator("#detail")).to_be_hidden()

        page.select_option("#show", "failed")
        expect(page.locator("#rows tr")).to_have_count(1)
        page.select_option("#show", "all")
        page.fill("#filter", "beta")
        expect(page.locator("#rows tr")).to_have_count(1)
        page.fill("#filter", "")

        with page.expect_download() as download:
            page.click("#export-csv")
        exported = download.value.path().read_text(encoding="utf-8")

        # A zip is opened in the browser: each cell keeps its own image (and overlays).
        archive = tmp_path / "more.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
            z.write(d / "alpha.png", "inner/a.png")
            z.write(d / "beta.bmp", "inner/b.bmp")
            z.writestr("inner/notes.txt", "not a cell")
        page.set_input_files("#files", str(archive))
        expect(page.locator("#progress-text")).to_have_text("Done: 2 files.", timeout=120_000)
        expect(page.locator("#rows tr")).to_have_count(5)
        expect(page.get_by_role("button", name="Explain more.zip/inner/b.bmp")).to_be_visible()
        browser.close()
    assert not problems, problems  # CSP violations and script errors land here

    out = tmp_path / "cli.csv"
    predict.main([f"--checkpoint={model_dir}", f"--output={out}", str(d)])
    cli = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(out.open(newline=""))}
    rows = list(csv.DictReader(io.StringIO(exported)))
    assert sorted(r["path"] for r in rows) == sorted(cli)
    for row in rows:
        ref = cli[row["path"]]
        assert list(row) == list(ref)
        for key, value in row.items():
            if key.startswith("p_") and value:
                assert float(value) == pytest.approx(float(ref[key]), rel=1e-5, abs=1e-7)
            elif key == "error" and value:
                assert value == ref[key].replace(str(d / "broken.png"), "broken.png")
            elif key != "path":
                assert value == ref[key], key
