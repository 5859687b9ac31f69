"""`edgesam demo BUNDLE`: a local web page that runs an exported bundle in the browser.

The page (`web/`) runs the bundle's encoder and decoder with onnxruntime-web, so the image
never leaves the browser; this module only serves files, from a fixed table built at start:
the page's own files, onnxruntime-web's scripts and WebAssembly binaries from the npm install
(`web/node_modules`, `npm ci` in `web/`), the bundle's config.json and its ONNX files. A URL
that is not in the table is a 404, so no path from a request ever reaches the file system.
ONNX files are checked by SHA-256 against config.json at start and again as they are served
(the bytes sent are the bytes hashed): a file replaced while the server runs is refused with
the reason, which the page shows. It binds 127.0.0.1 only.

The responses carry the cross-origin isolation headers (COOP / COEP) without which the
browser gives WebAssembly no threads (SharedArrayBuffer).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from edgesam.client.bundle import CONFIG, Bundle, BundleError

HOST = "127.0.0.1"
WEB_DIR = Path(__file__).resolve().parents[2] / "web"
ORT_DIST = Path("node_modules") / "onnxruntime-web" / "dist"
PAGE_FILES = ("index.html", "app.js", "model.js", "transforms.js", "style.css")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript",
                 ".css": "text/css", ".json": "application/json", ".wasm": "application/wasm",
                 ".onnx": "application/octet-stream"}
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
                     "Cross-Origin-Resource-Policy": "same-origin", "X-Content-Type-Options": "nosniff"}

log = logging.getLogger("edgesam.client.demo")


class DemoError(RuntimeError):
    """The demo cannot be served: the page's files or onnxruntime-web are missing."""


@dataclass(frozen=True)
class Route:
    path: Path
    sha256: str | None = None  # bundle files: the digest config.json lists

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES.get(self.path.suffix, "application/octet-stream")


def _web_routes(web_dir: Path) -> dict[str, Route]:
    """The page's files and onnxruntime-web's ES modules and WebAssembly binaries."""
    missing = [name for name in PAGE_FILES if not (web_dir / name).is_file()]
    if missing:
        raise DemoError(f"the demo page's files are missing from {web_dir}: {', '.join(missing)}")
    dist = web_dir / ORT_DIST
    if not dist.is_dir():
        raise DemoError(f"onnxruntime-web is not installed ({dist} not found): run `npm ci` in {web_dir} "
                        "(scripts/setup_venv.sh does)")
    routes = {"/": Route(web_dir / "index.html")}
    routes |= {f"/app/{name}": Route(web_dir / name) for name in PAGE_FILES}
    routes |= {f"/ort/{p.name}": Route(p) for p in sorted(dist.iterdir()) if p.suffix in (".mjs", ".wasm")}
    return routes


def _bundle_routes(bundle: Bundle) -> dict[str, Route]:
    """config.json and every ONNX file it lists, each verified now (a mismatch raises BundleError)."""
    routes = {f"/bundle/{CONFIG}": Route(bundle.root / CONFIG)}
    for role, entry in bundle.config["files"].items():
        if entry["file"].endswith(".onnx"):
            routes[f"/bundle/{entry['file']}"] = Route(bundle.path(role), entry["sha256"])
    return routes


def demo_routes(bundle_dir: str | Path, web_dir: Path = WEB_DIR) -> dict[str, Route]:
    """Every URL the demo serves and the file behind it."""
    bundle = _bundle_routes(Bundle.open(bundle_dir))  # the bundle first: its errors say more to a user
    return _web_routes(Path(web_dir)) | bundle


class DemoHandler(http.server.BaseHTTPRequestHandler):
    """GET of a URL in the server's route table; anything else is 404."""

    server: DemoServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        route = self.server.routes.get(urlsplit(self.path).path)
        if route is None:
            self._send(404, b"not found", "text/plain; charset=utf-8")
            return
        try:
            body = route.path.read_bytes()
        except OSError as exc:
            self._send(410, f"{route.path.name} cannot be read any more: {exc}".encode(), "text/plain; charset=utf-8")
            return
        if route.sha256 is not None and hashlib.sha256(body).hexdigest() != route.sha256:
            message = (f"{route.path} does not match {CONFIG} (SHA-256 differs): the file was replaced or truncated "
                       "after the demo started")
            self._send(409, message.encode(), "text/plain; charset=utf-8")
            return
        self._send(200, body, route.content_type)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in ISOLATION_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
        log.debug("%s " + format, self.address_string(), *args)


class DemoServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, routes: dict[str, Route], port: int = 0) -> None:
        self.routes = routes
        super().__init__((HOST, port), DemoHandler)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"


def make_server(bundle_dir: str | Path, port: int = 0, web_dir: Path = WEB_DIR) -> DemoServer:
    """A demo server for `bundle_dir` on 127.0.0.1:`port` (0: a free port), not yet serving."""
    return DemoServer(demo_routes(bundle_dir, web_dir), port)


def serve(bundle_dir: str | Path, port: int = 8765, web_dir: Path = WEB_DIR) -> None:
    """Serve the demo until interrupted; bundle or set-up problems exit with the reason."""
    try:
        server = make_server(bundle_dir, port, web_dir)
    except (BundleError, DemoError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    except OSError as exc:
        raise SystemExit(f"error: cannot listen on {HOST}:{port}: {exc}") from exc
    config = Bundle.open(bundle_dir).config
    print(json.dumps({"url": server.url, "bundle": str(Path(bundle_dir).resolve()), "img_size": config["img_size"],
                      "files": sorted(r for r in server.routes if r.startswith("/bundle/"))}, indent=2))
    print(f"open {server.url} in a browser; Ctrl-C stops the server", flush=True)
    with server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped")
