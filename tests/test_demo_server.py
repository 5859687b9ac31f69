"""`edgesam demo`'s server (edgesam/client/demo.py), without a browser: it serves exactly its route
table (the page, onnxruntime-web's files, config.json and the bundle's ONNX files, each checked
by SHA-256 at start and when served), on 127.0.0.1 only, with the cross-origin isolation headers
that give WebAssembly threads. Fast: a fake page folder and a fake bundle, no npm, no export."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edgesam.client.bundle import FORMAT, VERSION, BundleError, file_entry
from edgesam.client.demo import HOST, PAGE_FILES, DemoError, make_server


@pytest.fixture
def web_dir(tmp_path: Path) -> Path:
    web = tmp_path / "web"
    dist = web / "node_modules" / "onnxruntime-web" / "dist"
    dist.mkdir(parents=True)
    for name in PAGE_FILES:
        (web / name).write_text(f"/* {name} */")
    (dist / "ort.wasm.min.mjs").write_text("export const ort = 1;")
    (dist / "ort-wasm-simd-threaded.wasm").write_bytes(b"\0asm")
    (dist / "ort.min.js.map").write_text("{}")  # not a .mjs / .wasm: not served
    (web / "package.json").write_text("{}")  # in web/ but not a page file: not served
    return web


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    root.mkdir()
    (root / "encoder.onnx").write_bytes(b"encoder bytes")
    (root / "decoder.onnx").write_bytes(b"decoder bytes")
    (root / "edgesam.pt").write_bytes(b"torch checkpoint")  # listed, but not an ONNX file: not served
    (root / "secret.onnx").write_bytes(b"not listed")
    files = {role: file_entry(root / name) for role, name in
             [("encoder", "encoder.onnx"), ("decoder", "decoder.onnx"), ("checkpoint", "edgesam.pt")]}
    (root / "config.json").write_text(json.dumps({"format": FORMAT, "version": VERSION, "img_size": 256,
                                                  "files": files}))
    return root


@pytest.fixture
def server(bundle: Path, web_dir: Path):
    server = make_server(bundle, 0, web_dir)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def test_serves_the_page_ort_and_listed_onnx_files_only(server, bundle):
    assert server.server_address[0] == HOST == "127.0.0.1"
    assert server.url.startswith("http://127.0.0.1:")
    assert sorted(server.routes) == sorted(
        ["/", *(f"/app/{n}" for n in PAGE_FILES), "/ort/ort.wasm.min.mjs", "/ort/ort-wasm-simd-threaded.wasm",
         "/bundle/config.json", "/bundle/encoder.onnx", "/bundle/decoder.onnx"])
    status, body, headers = get(server.url + "bundle/encoder.onnx")
    assert (status, body) == (200, b"encoder bytes")
    assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
    assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    status, _, headers = get(server.url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert get(server.url + "ort/ort-wasm-simd-threaded.wasm")[2]["Content-Type"] == "application/wasm"
    assert json.loads(get(server.url + "bundle/config.json")[1])["img_size"] == 256
    for path in ["bundle/secret.onnx", "bundle/edgesam.pt", "bundle/../bundle/secret.onnx", "app/package.json",
                 "bundle/%2e%2e/config.json", "ort/ort.min.js.map", "../../etc/passwd", "app/../../bundle/edgesam.pt"]:
        assert get(server.url + path)[0] == 404, path


def test_a_file_replaced_after_start_is_refused_with_the_reason(server, bundle):
    (bundle / "decoder.onnx").write_bytes(b"tampered bytes")
    status, body, _ = get(server.url + "bundle/decoder.onnx")
    assert status == 409
    assert b"does not match config.json" in body and b"decoder.onnx" in body
    assert get(server.url + "bundle/encoder.onnx")[0] == 200


def test_a_mismatched_bundle_is_refused_at_start(bundle, web_dir):
    (bundle / "encoder.onnx").write_bytes(b"another export")
    with pytest.raises(BundleError, match="encoder.onnx does not match"):
        make_server(bundle, 0, web_dir)
    (bundle / "config.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(BundleError, match="not an EdgeSAM bundle"):
        make_server(bundle, 0, web_dir)
    with pytest.raises(BundleError, match="config.json not found"):
        make_server(web_dir, 0, web_dir)


def test_missing_npm_install_names_the_fix(bundle, web_dir):
    import shutil

    shutil.rmtree(web_dir / "node_modules")
    with pytest.raises(DemoError, match="npm ci"):
        make_server(bundle, 0, web_dir)


def test_cli_exits_with_the_reason(bundle, web_dir, capsys):
    from edgesam.cli import main

    (bundle / "decoder.onnx").write_bytes(b"tampered")
    with pytest.raises(SystemExit, match="decoder.onnx does not match"):
        main(["demo", str(bundle), "--port", "0"])
