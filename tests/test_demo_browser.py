"""The demo page in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright
for Python) loads a bundle exported by the smoke profile from `edgesam demo`'s server, gets an
skimage photo, a click and a dragged box; the page's masks (encoder and decoder run by
onnxruntime-web in the page) agree with `OnnxPredictor`'s on the same prompts. Also the page's
messages for an unreadable image and for a bundle file that no longer matches config.json.

Its own step: `scripts/test.sh -m browser` (the smoke export takes minutes). Set
EDGESAM_DEMO_BUNDLE to an exported bundle to skip the export, EDGESAM_DEMO_SCREENSHOTS to a
folder to keep the screenshots (demo_<bundle>.png: docs/images/ was made so).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
IOU_MIN = 0.99
TIMEOUT_MS = 180_000  # the encoder's first run in WebAssembly, on a loaded 2-core machine


def find_chromium() -> str:
    """Debian's chromium, installed here when missing (Playwright's own browsers cannot be downloaded)."""
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    if shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], check=False,
                       capture_output=True, timeout=600)
        if path := shutil.which("chromium"):
            return path
    pytest.skip("chromium is not installed and cannot be installed here (apt-get install chromium, as root)")


@pytest.fixture(scope="session")
def smoke_bundle(tmp_path_factory) -> Path:
    """The export stage's bundle of a smoke run (the whole DAG: about 3 minutes on 2 cores)."""
    if given := os.environ.get("EDGESAM_DEMO_BUNDLE"):
        return Path(given)
    work = tmp_path_factory.mktemp("smoke")
    subprocess.run([sys.executable, "-m", "pipelines", "all", "--profile", "smoke", "--work-dir", str(work)],
                   check=True, cwd=REPO, timeout=1200)
    configs = sorted((work / "export").glob("*/config.json"))
    assert len(configs) == 1, configs
    return configs[0].parent


def reference_teacher_bundle(out: Path) -> Path:
    """The shipped reference teacher (a tiny SAM at 256 that segments the embedded benchmark, see
    data/reference_teacher/CARD.md) written in the bundle format: encoder.onnx (image ->
    image_embeddings) and the client decoder.onnx, with config.json as the export stage writes
    it. The smoke student's masks are a few hundred pixels (7 KD steps); these are objects, so
    the page-vs-OnnxPredictor IoU is measured on masks of real extent as well."""
    import json

    import torch

    from edgesam.client.bundle import FORMAT, VERSION, file_entry
    from edgesam.export.onnx import _export, export_prompt_decoder
    from edgesam.models.reference import load_reference

    sam = load_reference(REPO / "data" / "reference_teacher" / "reference_teacher.pt")
    size = sam.image_encoder.img_size
    out.mkdir(parents=True, exist_ok=True)
    _export(sam.image_encoder, (torch.zeros(1, 3, size, size),), out / "encoder.onnx", ("image",),
            ("image_embeddings",), 17)
    export_prompt_decoder(sam, out / "decoder.onnx")
    config = {"format": FORMAT, "version": VERSION, "img_size": size, "mask_threshold": sam.mask_threshold,
              "embedding_size": list(sam.prompt_encoder.image_embedding_size),
              "pixel_mean": sam.pixel_mean.flatten().tolist(), "pixel_std": sam.pixel_std.flatten().tolist(),
              "model": {"backbone": "reference teacher (ViT)", "img_size": size},
              "files": {"encoder": file_entry(out / "encoder.onnx"), "decoder": file_entry(out / "decoder.onnx")}}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="session", params=["smoke_student", "reference_teacher"])
def bundle(request, tmp_path_factory) -> tuple[str, Path]:
    if request.param == "smoke_student":
        return request.param, request.getfixturevalue("smoke_bundle")
    return request.param, reference_teacher_bundle(tmp_path_factory.mktemp("teacher_bundle"))


@pytest.fixture(scope="session")
def playwright():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as playwright:
        yield playwright


def launch(playwright, *args: str):
    return playwright.chromium.launch(executable_path=find_chromium(), headless=True,
                                      args=["--no-sandbox", "--disable-dev-shm-usage", *args])


@pytest.fixture(scope="session")
def browser(playwright):
    browser = launch(playwright)
    yield browser
    browser.close()


class Served:
    def __init__(self, bundle: Path) -> None:
        from edgesam.client.demo import make_server

        self.server = make_server(bundle)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return self.server.url

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def open_page(browser, url: str, messages: list[str]):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
    page.goto(url)
    return page


def wait_status(page, statuses: tuple[str, ...], messages: list[str], extra: str = "true") -> dict:
    try:
        page.wait_for_function(f"() => {list(statuses)}.includes(window.edgesam?.state.status) && ({extra})",
                               timeout=TIMEOUT_MS)
    except Exception as exc:
        state = page.evaluate("() => window.edgesam && JSON.stringify({...window.edgesam.state, mask: null})")
        raise AssertionError(f"page never reached {statuses}: {state}\n" + "\n".join(messages)) from exc
    return page.evaluate("() => ({...window.edgesam.state, mask: null})")


def page_mask(page, shape: tuple[int, int]) -> np.ndarray:
    raw = base64.b64decode(page.evaluate("() => window.edgesam.maskBase64()"))
    return np.frombuffer(raw, np.uint8).reshape(shape).astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def screen_point(page, x: float, y: float, hw: tuple[int, int]) -> tuple[float, float]:
    rect = page.locator("#overlay").bounding_box()
    return rect["x"] + (x + 0.5) * rect["width"] / hw[1], rect["y"] + (y + 0.5) * rect["height"] / hw[0]


def decode_after(page, action, decodes: int, messages: list[str]) -> dict:
    action()
    return wait_status(page, ("ready", "error"), messages, f"window.edgesam.state.decodes > {decodes}")


def photo_and_predictor(image: np.ndarray, bundle: Path, folder: Path, **options):
    """The photo as a PNG file for the page, its (h, w), and OnnxPredictor set to it."""
    from edgesam.client.predictor import OnnxPredictor

    photo = folder / "astronaut.png"
    Image.fromarray(image).save(photo)
    predictor = OnnxPredictor(bundle, **options)
    predictor.set_image(image)
    return photo, image.shape[:2], predictor


def open_image(page, photo: Path, hw: tuple[int, int], messages: list[str]) -> None:
    """Wait for the models, set `photo` and wait for its encoding."""
    state = wait_status(page, ("ready", "error"), messages)
    assert state["status"] == "ready", state["error"]
    page.set_input_files("#file", str(photo))
    state = wait_status(page, ("ready", "error"), messages, "window.edgesam.state.encodes > 0")
    assert state["status"] == "ready", state["error"]
    assert (state["height"], state["width"]) == hw


def click_and_box_match(page, predictor, hw: tuple[int, int], name: str, messages: list[str]) -> None:
    """A click, then a dragged box, with the mouse: the page's masks and chosen tokens are
    `predictor`'s on the same prompts."""
    # A click: the best of SAM's three multimask outputs, as the page shows it.
    state = decode_after(page, lambda: page.mouse.click(*screen_point(page, 260, 180, hw)), 0, messages)
    assert state["status"] == "ready", state["error"]
    (x, y), = state["points"]
    assert abs(x - 260.5) < 1 and abs(y - 180.5) < 1
    masks, scores, _ = predictor.predict(np.array([[x, y]]), np.array([1]), multimask_output=True)
    want = masks[int(np.argmax(scores))]
    got = page_mask(page, hw)
    assert 0 < want.sum() < want.size
    print(f"{name}: click mask IoU {iou(got, want):.6f}, {int(got.sum())} vs {int(want.sum())} pixels")
    assert iou(got, want) >= IOU_MIN, (iou(got, want), got.sum(), want.sum())
    assert state["token"] == 1 + int(np.argmax(scores))

    # A dragged box (the click cleared first): the single-mask output.
    page.click("#clear")
    decodes = state["decodes"]

    def drag() -> None:
        page.mouse.move(*screen_point(page, 140, 60, hw))
        page.mouse.down()
        page.mouse.move(*screen_point(page, 300, 200, hw), steps=8)
        page.mouse.move(*screen_point(page, 380, 330, hw), steps=8)
        page.mouse.up()

    state = decode_after(page, drag, decodes, messages)
    assert state["status"] == "ready", state["error"]
    assert state["points"] == [] and state["box"] is not None
    box = np.array(state["box"])
    np.testing.assert_allclose(box, [140.5, 60.5, 380.5, 330.5], atol=1)
    masks, _, _ = predictor.predict(box=box, multimask_output=False)
    got = page_mask(page, hw)
    assert 0 < masks[0].sum() < masks[0].size
    print(f"{name}: box mask IoU {iou(got, masks[0]):.6f}, {int(got.sum())} vs {int(masks[0].sum())} pixels")
    assert iou(got, masks[0]) >= IOU_MIN, (iou(got, masks[0]), got.sum(), masks[0].sum())
    assert state["token"] == 0


def test_page_masks_match_onnx_predictor(browser, bundle, tmp_path, astronaut):
    name, bundle = bundle
    photo, hw, predictor = photo_and_predictor(astronaut, bundle, tmp_path)
    messages: list[str] = []
    with Served(bundle) as url:
        page = open_page(browser, url + "?decoder=decoder", messages)  # fp32, as OnnxPredictor's default
        open_image(page, photo, hw, messages)
        click_and_box_match(page, predictor, hw, name, messages)
        timings = page.locator("#timings").inner_text()
        assert "encoder" in timings and "decoder" in timings, timings
        shots = Path(os.environ.get("EDGESAM_DEMO_SCREENSHOTS", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        shot = shots / f"demo_{name}.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        page.close()
    assert not [m for m in messages if m.startswith("pageerror")], messages


def test_page_says_why_an_image_cannot_be_read(browser, smoke_bundle, tmp_path):
    bad = tmp_path / "holiday.jpg"
    bad.write_bytes(b"this is not a JPEG")
    messages: list[str] = []
    with Served(smoke_bundle) as url:
        page = open_page(browser, url, messages)
        assert wait_status(page, ("ready", "error"), messages)["status"] == "ready"
        page.set_input_files("#file", str(bad))
        state = wait_status(page, ("error",), messages)
        assert "holiday.jpg cannot be read as an image" in state["error"]
        assert "cannot be read as an image" in page.locator("#status").inner_text()
        page.close()


def test_page_says_why_a_bundle_does_not_match(browser, smoke_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(smoke_bundle, bundle)
    messages: list[str] = []
    with Served(bundle) as url:
        (bundle / "decoder_int8.onnx").write_bytes(b"replaced after the server started")  # the page's default
        page = open_page(browser, url, messages)
        state = wait_status(page, ("error",), messages)
        assert "decoder_int8.onnx" in state["error"] and "does not match config.json" in state["error"], state["error"]
        assert "does not match" in page.locator("#status").inner_text()
        page.close()


def test_page_runs_the_int8_decoder_by_default(browser, smoke_bundle, tmp_path, astronaut):
    """A bundle with an int8 decoder: the page picks it (the menu's default), and its click mask
    is the one OnnxPredictor gives with the same file. The image is opened while the page still
    warms up (a long warm-up asked for): it is encoded once, after the warm-up."""
    photo, hw, predictor = photo_and_predictor(astronaut, smoke_bundle, tmp_path, decoder_precision="int8")
    messages: list[str] = []
    with Served(smoke_bundle) as url:
        page = open_page(browser, url + "?warmup=2000", messages)  # seconds of warm-up runs
        page.set_input_files("#file", str(photo))
        assert page.evaluate("() => window.edgesam.state.status") in ("starting", "loading", "warming", "reading")
        state = wait_status(page, ("ready", "error"), messages, "window.edgesam.state.encodes > 0")
        assert state["status"] == "ready" and state["warmUpMs"] > 0, state
        assert page.locator("#decoder").input_value() == "decoder_int8"
        page.wait_for_timeout(500)  # a second encode (the race this guards against) would have started by now
        assert page.evaluate("() => window.edgesam.state.encodes") == 1
        state = decode_after(page, lambda: page.mouse.click(*screen_point(page, 260, 180, hw)), 0, messages)
        assert state["status"] == "ready" and state["decoder"] == "decoder_int8", state
        masks, scores, _ = predictor.predict(np.array(state["points"]), np.array([1]), multimask_output=True)
        want, got = masks[int(np.argmax(scores))], page_mask(page, hw)
        print(f"int8 decoder: click mask IoU {iou(got, want):.6f}, {int(got.sum())} vs {int(want.sum())} pixels")
        assert 0 < want.sum() < want.size and iou(got, want) >= IOU_MIN, (iou(got, want), got.sum(), want.sum())
        page.close()


@pytest.fixture(scope="session")
def webgpu_browser(playwright):
    """Chromium with WebGPU on (`--enable-unsafe-webgpu`: on a machine without a GPU, Chromium's
    SwiftShader adapter, WebGPU computed on the CPU): the page's WebGPU backend, checked for
    results, not for speed."""
    browser = launch(playwright, "--enable-unsafe-webgpu")
    yield browser
    browser.close()


def test_page_on_webgpu_masks_match_onnx_predictor(webgpu_browser, tmp_path, astronaut):
    """`?backend=webgpu`: onnxruntime-web's WebGPU execution provider runs the reference teacher's
    encoder and decoder; the click and box masks agree with OnnxPredictor's (CPU, float32)."""
    bundle = reference_teacher_bundle(tmp_path / "bundle")
    photo, hw, predictor = photo_and_predictor(astronaut, bundle, tmp_path)
    messages: list[str] = []
    with Served(bundle) as url:
        page = open_page(webgpu_browser, url + "?backend=webgpu&decoder=decoder&warmup=1", messages)
        adapter = page.evaluate("async () => navigator.gpu ? Boolean(await navigator.gpu.requestAdapter()) : false")
        if not adapter:
            pytest.skip("this Chromium offers no WebGPU adapter, not even SwiftShader's")
        open_image(page, photo, hw, messages)
        assert page.evaluate("() => window.edgesam.state.backend") == "webgpu"
        device = page.evaluate("async () => { const ort = await import('/ort/ort.webgpu.min.mjs');"
                               " return Boolean(await ort.env.webgpu.device); }")
        assert device, "onnxruntime-web made no WebGPU device: the sessions ran on WebAssembly"
        click_and_box_match(page, predictor, hw, "webgpu", messages)
        assert "WebGPU" in page.locator("#timings").inner_text()
        page.close()
    assert not [m for m in messages if m.startswith("pageerror")], messages
