"""`agf-onnx web` in a real browser: Debian's headless Chromium, driven by Playwright, loads the site, explains
an image given by URL parameter, and its maps equal Python ONNX Runtime's (Pearson r ≥ 0.9999) for a chosen
class, the top class, and a class picked afterwards in the page's class picker; the overlay on the page (read
back from a screenshot) is explain's blend of that map; bad input to `agf-onnx web` is one line, exit 1."""

from __future__ import annotations

import io
import os
import pathlib
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from agf_onnx import web
from agf_onnx.cli import main as cli
from agf_onnx.runtime.explain import Explainer, blend

from . import models
from .runtime import js_install

CHROMIUM = os.environ.get("AGF_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MIN_PEARSON = 0.9999
#: README's screenshot: AGF_WRITE_DOCS=1 pytest tests/test_web_page.py rewrites it
DOCS_SCREENSHOT = pathlib.Path(__file__).resolve().parent.parent / "docs" / "web_page.png"


def pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64))[0, 1])


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A site made from an uncompiled CNN (compiled on the fly), served on 127.0.0.1, and a 32×32 photo."""
    folder = tmp_path_factory.mktemp("web")
    model = folder / "vgg.onnx"
    model.write_bytes(models.export(models.seeded(models.VGGish(), seed=3)).SerializeToString())
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    photo = (np.random.default_rng(4).random((32, 32, 3)) * 255).astype(np.uint8)
    code = cli(["web", str(model), "-o", str(folder / "site"), "--labels", str(folder / "labels.txt"),
                "--ort-web", str(js_install() / "onnxruntime-web"), "--top-k", "4"])
    assert code == 0
    Image.fromarray(photo).save(folder / "site" / "photo.png")
    server = web.make_server(folder / "site")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{server.server_port}/", "folder": folder, "photo": photo}
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def playwright():
    """One Playwright per module (its sync API refuses a second one running in the same thread)."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} missing: `apt-get install -y chromium` (.ci/run does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as running:
        yield running


@pytest.fixture(scope="module")
def browser(playwright, tmp_path_factory):
    context = playwright.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("profile")),
                                                            executable_path=CHROMIUM, args=ARGS, headless=True,
                                                            viewport={"width": 1000, "height": 700})
    yield context
    context.close()


def python_map(site, target: int) -> np.ndarray:
    explainer = Explainer(site["folder"] / "site" / "model.onnx", "cpu")  # the page's model, explain's defaults
    return explainer.explain(site["folder"] / "site" / "photo.png", target=target).heatmaps[0, 0]


RESULT = "() => window.agf.ready.then(a => ({heatmap: Array.from(a.result.heatmap), shape: a.result.shape, " \
         "target: a.result.target, predicted: a.result.predicted, backend: a.result.backend, " \
         "probabilities: Array.from(a.result.probabilities)}))"


def test_the_page_explains_like_python(site, browser):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(site["url"] + "index.html?image=photo.png")
    top = page.evaluate(RESULT)
    assert not errors, errors
    assert top["backend"].startswith("wasm") and top["shape"] == [32, 32]
    predicted = top["predicted"]
    assert top["target"] == predicted and abs(sum(top["probabilities"]) - 1) < 1e-4
    assert pearson(top["heatmap"], python_map(site, predicted)) >= MIN_PEARSON

    chosen = (predicted + 3) % len(LABELS)
    page.goto(site["url"] + f"index.html?image=photo.png&class={chosen}")
    given = page.evaluate(RESULT)
    assert given["target"] == chosen
    expected = python_map(site, chosen)
    assert pearson(given["heatmap"], expected) >= MIN_PEARSON
    assert pearson(given["heatmap"], top["heatmap"]) < 0.99  # the class was honoured

    picked = (predicted + 5) % len(LABELS)  # the class picker, as a user would
    page.select_option("#picker", str(picked))
    page.wait_for_function(f"window.agf.result.target === {picked}")
    after = page.evaluate(RESULT)
    expected = python_map(site, picked)
    assert pearson(after["heatmap"], expected) >= MIN_PEARSON

    # the page shows it: method and class in the title, the top classes with their labels, the overlay
    assert page.inner_text("#title") == f"agf · {LABELS[picked]} ({picked})" + (" (predicted)" if picked == predicted else "")
    rows = page.locator("#top tbody tr").all_inner_texts()
    assert len(rows) == 4 and rows[0].startswith(f"{LABELS[predicted]} ({predicted})")
    assert "wasm" in page.inner_text("#status")
    shot = np.asarray(Image.open(io.BytesIO(page.locator("#view").screenshot())).convert("RGB"), np.int32)
    scale = shot.shape[0] / 32  # the 32×32 canvas drawn at 320 px, pixelated: sample each cell's centre
    centres = ((np.arange(32) + 0.5) * scale).astype(int)
    overlay = shot[np.ix_(centres, centres)]
    wanted = blend(site["photo"], np.asarray(after["heatmap"], np.float32).reshape(32, 32)).astype(np.int32)
    assert np.abs(overlay - wanted).max() <= 3, "the overlay is not explain's blend of the map"
    if os.environ.get("AGF_WRITE_DOCS"):
        page.screenshot(path=str(DOCS_SCREENSHOT), full_page=True)
    page.close()


def test_bad_input_is_one_line(tmp_path, capfd):
    model = tmp_path / "vgg.onnx"
    model.write_bytes(models.export(models.seeded(models.VGGish(), seed=3)).SerializeToString())
    ort_web = ["--ort-web", str(js_install() / "onnxruntime-web")]
    (tmp_path / "exists").mkdir()
    (tmp_path / "a-file").write_text("")
    cases = {"missing model": [str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "s1"), *ort_web],
             "existing site folder": [str(model), "-o", str(tmp_path / "exists"), *ort_web],
             "unwritable output": [str(model), "-o", str(tmp_path / "a-file" / "site"), *ort_web],
             "no onnxruntime-web": [str(model), "-o", str(tmp_path / "s2"), "--ort-web", str(tmp_path)]}
    for case, argv in cases.items():
        assert cli(["web", *argv]) == 1, case
        err = capfd.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("agf-onnx: error:"), (case, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "exists", "vgg.onnx"]  # nothing half-written
    shutil.rmtree(tmp_path / "exists")


def test_the_page_explains_like_python_on_webgpu(site, playwright, tmp_path):
    """The same page where the browser has WebGPU (SwiftShader's, in CI): it says so, and its map is Python's."""
    from .test_web_webgpu import ARGS as WEBGPU_ARGS

    context = playwright.chromium.launch_persistent_context(str(tmp_path), executable_path=CHROMIUM, args=WEBGPU_ARGS)
    page = context.new_page()
    page.goto(site["url"] + "index.html?image=photo.png&class=6")
    got = page.evaluate(RESULT)
    status = page.inner_text("#status")
    context.close()
    assert got["backend"] == "webgpu" and "webgpu" in status and got["target"] == 6
    assert pearson(got["heatmap"], python_map(site, 6)) >= MIN_PEARSON
