"""The bundle's encoder and decoder in the browser (onnxruntime-web, WebAssembly) beside
onnxruntime's native CPU latency of the same files, in one run.

    python -m benchmarks.browser_latency --out runs/bench/browser_latency.json [--repeats 5]
    python -m benchmarks.browser_latency --bundle runs/smoke/export/<key> ...   # an exported bundle's files

Without --bundle the files are those of a random-weight, fused RepViT-M1 student at 1024
(speed does not depend on the weights), written once to --files-dir: encoder.onnx,
decoder.onnx (the client decoder: N prompt sets, mask input), decoder_edgesam.onnx (the compact
single-prompt graph: no mask input), and the reduced-precision variants the export stage
writes (int8 QDQ encoder calibrated on one photo, dynamic int8 decoder, fp16 encoder and decoder).

Browser: headless Chromium (Debian's, driven by Playwright) on a page served from 127.0.0.1
with the demo's cross-origin isolation headers, so WebAssembly gets threads; the page uses
`navigator.hardwareConcurrency` threads, as the demo does. Native: onnxruntime's CPU provider
with the same thread count, right after the browser on the same variant (a shared machine's
load then weighs on both). Each (file, graph optimisation level) is timed as the median of
--repeats runs after one warm-up run; decoders on one box over a random embedding.

Then the demo page itself (`edgesam demo`'s server and page on a bundle of these files), with
the fp32 and the int8 decoder, each with and without the page's warm-up after loading: skimage's
astronaut encoded once, then --page-clicks single clicks (cleared in between); per click the
page's own figures: the decoder run and the mask upscaling to the 512 x 512 image, each kept,
and their sum, what a user waits for after a click (clicks 1-3 apart: that is where
WebAssembly tier-up shows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
          "disabled": "ORT_DISABLE_ALL"}
# (label, file, graph optimisation level): what each row measures.
VARIANTS = [
    ("encoder fp32", "encoder.onnx", "all"),
    ("encoder fp32, optimisation basic", "encoder.onnx", "basic"),
    ("encoder int8 (QDQ)", "encoder_int8.onnx", "all"),
    ("encoder fp16", "encoder_fp16.onnx", "all"),
    ("decoder.onnx, 1 box", "decoder.onnx", "all"),
    ("decoder.onnx, 1 box, optimisation basic", "decoder.onnx", "basic"),
    ("decoder.onnx, 1 box, optimisation disabled", "decoder.onnx", "disabled"),
    ("decoder_edgesam.onnx (compact), 1 box", "decoder_edgesam.onnx", "all"),
    ("decoder_fp16.onnx, 1 box", "decoder_fp16.onnx", "all"),
    ("decoder_int8.onnx (dynamic int8 MatMul weights), 1 box", "decoder_int8.onnx", "all"),
]

PAGE = """<!doctype html><meta charset="utf-8"><title>onnxruntime-web latency</title>
<script type="module">
import * as ort from '/ort/ort.wasm.min.mjs';
ort.env.wasm.wasmPaths = '/ort/';
ort.env.wasm.numThreads = self.crossOriginIsolated ? navigator.hardwareConcurrency || 1 : 1;
// One case: a session of the file at the level, a warm-up run, then `repeats` timed runs.
window.bench = async (c, repeats) => {
  try {
    const bytes = new Uint8Array(await (await fetch('/bench/' + c.file)).arrayBuffer());
    const t0 = performance.now();
    const session = await ort.InferenceSession.create(bytes, {executionProviders: ['wasm'], graphOptimizationLevel: c.level});
    const loadMs = performance.now() - t0;
    const feeds = {};
    for (const [name, spec] of Object.entries(c.feeds)) {
      const size = spec.shape.reduce((a, b) => a * b, 1);
      const data = spec.values ? Float32Array.from(spec.values) : new Float32Array(size);
      if (spec.random) for (let i = 0; i < size; i++) data[i] = Math.random() * 2 - 1;
      feeds[name] = new ort.Tensor('float32', data, spec.shape);
    }
    await session.run(feeds);
    const times = [];
    for (let i = 0; i < repeats; i++) {
      const s = performance.now();
      await session.run(feeds);
      times.push(performance.now() - s);
    }
    await session.release();
    return {times, loadMs};
  } catch (error) {
    return {error: String(error.message ?? error)};
  }
};
window.info = {threads: ort.env.wasm.numThreads, isolated: self.crossOriginIsolated,
  userAgent: navigator.userAgent, version: ort.env.versions?.web};
</script>"""


def build_files(out: Path) -> dict[str, Path]:
    """The random-weight 1024 student's ONNX files and their reduced-precision variants."""
    import torch
    from skimage import data

    from edgesam.client.transforms import preprocess
    from edgesam.export.onnx import export_compact_decoder, export_encoder, export_prompt_decoder, fused_copy
    from edgesam.export.quantize import prepare_encoder, quantize_decoder, quantize_encoder, to_fp16
    from edgesam.models.edgesam import build_edgesam

    files = {name: out / name for name in ("encoder.onnx", "encoder_int8.onnx", "encoder_fp16.onnx", "decoder.onnx",
                                           "decoder_edgesam.onnx", "decoder_fp16.onnx", "decoder_int8.onnx")}
    if all(p.is_file() for p in files.values()):
        return files
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    sam = fused_copy(build_edgesam("repvit_m1", img_size=1024))
    print("exporting the random-weight student at 1024 ...", flush=True)
    export_encoder(sam, files["encoder.onnx"])
    export_prompt_decoder(sam, files["decoder.onnx"])
    export_compact_decoder(sam, files["decoder_edgesam.onnx"])
    to_fp16(files["encoder.onnx"], files["encoder_fp16.onnx"])
    to_fp16(files["decoder.onnx"], files["decoder_fp16.onnx"])
    quantize_decoder(files["decoder.onnx"], files["decoder_int8.onnx"])
    print("int8 encoder (one calibration photo) ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare_encoder(sam, Path(tmp))
        x, _ = preprocess(data.astronaut(), 1024, [123.675, 116.28, 103.53], [58.395, 57.12, 57.375])
        quantize_encoder(prepared, files["encoder_int8.onnx"], [x], per_channel=False)
    return files


def bundle_files(bundle: Path) -> dict[str, Path]:
    config = json.loads((bundle / "config.json").read_text())
    return {e["file"]: bundle / e["file"] for e in config["files"].values() if e["file"].endswith(".onnx")}


def feeds_for(path: Path) -> dict[str, dict]:
    """JSON feed specs of one file: encoders a random image, decoders one box on a random embedding."""
    import onnxruntime as ort

    inputs = {i.name: i.shape for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()}
    if "image" in inputs:
        return {"image": {"shape": inputs["image"], "random": True}}
    h, w = inputs["image_embeddings"][2:]
    size = 16 * h
    box = [0.2 * size, 0.25 * size, 0.7 * size, 0.8 * size]
    specs = {"image_embeddings": {"shape": [1, 256, h, w], "random": True},
             "point_coords": {"shape": [1, 2, 2], "values": box},
             "point_labels": {"shape": [1, 2], "values": [2, 3]}}
    if "mask_input" in inputs:
        specs["mask_input"] = {"shape": [1, 1, 4 * h, 4 * w]}
        specs["has_mask_input"] = {"shape": [1], "values": [0]}
    return specs


def native_feeds(specs: dict[str, dict]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for name, spec in specs.items():
        if spec.get("random"):
            out[name] = rng.uniform(-1, 1, spec["shape"]).astype(np.float32)
        elif "values" in spec:
            out[name] = np.array(spec["values"], np.float32).reshape(spec["shape"])
        else:
            out[name] = np.zeros(spec["shape"], np.float32)
    return out


def native_ms(path: Path, level: str, specs: dict[str, dict], threads: int, repeats: int) -> list[float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = native_feeds(specs)
    session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(1000 * (time.perf_counter() - start))
    return times


def native_op_profile(path: Path, specs: dict[str, dict], threads: int, repeats: int) -> dict[str, float]:
    """onnxruntime's profiler on `path`: the share of node time per op type (where the time goes)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = native_feeds(specs)
        for _ in range(repeats + 1):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    by_node: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + event["dur"]
            node = event["name"].removesuffix("_kernel_time")
            by_node[node] = by_node.get(node, 0.0) + event["dur"]
    whole = sum(by_op.values()) or 1.0

    def shares(totals: dict[str, float], top: int) -> dict[str, float]:
        return {k: round(t / whole, 4) for k, t in sorted(totals.items(), key=lambda kv: -kv[1])[:top]}

    return {"by_op_type": shares(by_op, 12), "top_nodes": shares(by_node, 12)}


class Browser:
    """The benchmark page in headless Chromium, served with the demo's headers from 127.0.0.1."""

    def __init__(self, files: dict[str, Path], chromium_args: tuple[str, ...] = ()) -> None:
        from edgesam.client.demo import WEB_DIR, DemoServer, Route, _web_routes

        self.chromium_args = chromium_args
        self.tmp = tempfile.TemporaryDirectory()
        (Path(self.tmp.name) / "bench.html").write_text(PAGE)
        routes = {k: v for k, v in _web_routes(WEB_DIR).items() if k.startswith("/ort/")}
        routes |= {"/": Route(Path(self.tmp.name) / "bench.html")}
        routes |= {f"/bench/{name}": Route(path) for name, path in files.items()}
        self.server = DemoServer(routes)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> Browser:
        from playwright.sync_api import sync_playwright

        self.playwright = sync_playwright().start()
        self.browser = self.playwright.chromium.launch(
            executable_path=shutil.which("chromium") or "/usr/bin/chromium", headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage", *self.chromium_args])
        self.page = self.browser.new_page()
        self.page.goto(self.server.url)
        self.page.wait_for_function("() => window.info !== undefined", timeout=60_000)
        self.info = self.page.evaluate("() => window.info")
        return self

    def run(self, case: dict, repeats: int) -> dict:
        return self.page.evaluate("([c, r]) => window.bench(c, r)", [case, repeats])

    def __exit__(self, *exc: object) -> None:
        self.browser.close()
        self.playwright.stop()
        self.server.shutdown()
        self.server.server_close()
        self.tmp.cleanup()


def page_bundle(files: dict[str, Path], out: Path) -> Path:
    """A bundle folder of the 1024 files (copies) with the config.json the demo server reads."""
    from edgesam.client.bundle import FORMAT, VERSION, file_entry
    from edgesam.data.transforms import PIXEL_MEAN, PIXEL_STD

    roles = {"encoder": "encoder.onnx", "encoder_int8": "encoder_int8.onnx", "decoder": "decoder.onnx",
             "decoder_int8": "decoder_int8.onnx"}
    out.mkdir(parents=True, exist_ok=True)
    for name in roles.values():
        shutil.copyfile(files[name], out / name)
    config = {"format": FORMAT, "version": VERSION, "img_size": 1024, "embedding_size": [64, 64],
              "mask_threshold": 0.0, "pixel_mean": list(PIXEL_MEAN), "pixel_std": list(PIXEL_STD),
              "model": {"backbone": "repvit_m1 (random weights)", "img_size": 1024},
              "files": {role: file_entry(out / name) for role, name in roles.items()}}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def page_clicks(browser: Browser, bundle: Path, decoder: str, clicks: int, warm_up: bool) -> dict[str, Any]:
    """The demo page's own per-click milliseconds (decoder run + mask upscaling) for `clicks`
    single clicks (cleared in between) right after the first image, with or without the page's
    warm-up after loading (`?warmup=0`), and that image's encoder milliseconds. No click is
    dropped: the first ones are what the warm-up is for (WebAssembly tier-up)."""
    from PIL import Image
    from skimage import data

    from edgesam.client.demo import make_server

    server = make_server(bundle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    page = browser.browser.new_page(viewport={"width": 1280, "height": 1000})
    state = "window.edgesam?.state"
    try:
        page.goto(f"{server.url}?decoder={decoder}" + ("" if warm_up else "&warmup=0"))
        page.wait_for_function(f"() => {state}?.status === 'ready'", timeout=300_000)
        warm_up_ms = page.evaluate(f"() => {state}.warmUpMs ?? 0")
        with tempfile.TemporaryDirectory() as tmp:
            Image.fromarray(data.astronaut()).save(Path(tmp) / "astronaut.png")
            page.set_input_files("#file", str(Path(tmp) / "astronaut.png"))
            page.wait_for_function(f"() => {state}?.encodes > 0 && {state}.status === 'ready'", timeout=300_000)
        encoder_ms = page.evaluate(f"() => {state}.timings.encoderMs")
        rect, split = page.locator("#overlay").bounding_box(), {"decoder_ms": [], "mask_ms": []}
        for i in range(clicks):
            decodes = page.evaluate(f"() => {state}.decodes")
            page.mouse.click(rect["x"] + rect["width"] * (0.3 + 0.4 * i / clicks), rect["y"] + rect["height"] * 0.4)
            page.wait_for_function(f"() => {state}.decodes > {decodes}", timeout=60_000)
            t = page.evaluate(f"() => {state}.timings")
            split["decoder_ms"].append(round(t["decoderMs"], 1))
            split["mask_ms"].append(round(t["maskMs"], 1))
            page.click("#clear")
        times = [round(d + m, 1) for d, m in zip(split["decoder_ms"], split["mask_ms"])]
        return {"warm_up_ms": warm_up_ms, "first_encoder_ms": encoder_ms, "click_ms": times, **split,
                "first_3_ms": statistics.median(times[:3]), "later_ms": statistics.median(times[3:]),
                "later_decoder_ms": statistics.median(split["decoder_ms"][3:]),
                "later_mask_ms": statistics.median(split["mask_ms"][3:])}
    finally:
        page.close()
        server.shutdown()
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "browser_latency.json")
    parser.add_argument("--bundle", type=Path, help="time an exported bundle's files instead")
    parser.add_argument("--files-dir", type=Path, default=REPO / "runs" / "bench" / "browser_files_1024")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="labels' substrings to keep (default: every variant)")
    parser.add_argument("--page-clicks", type=int, default=10, help="clicks per demo page run")
    parser.add_argument("--chromium-arg", action="append", default=[],
                        help="extra Chromium flag, e.g. --chromium-arg=--js-flags=--no-liftoff (optimised WebAssembly "
                             "from the first run)")
    args = parser.parse_args()

    files = bundle_files(args.bundle) if args.bundle else build_files(args.files_dir)
    variants = [v for v in VARIANTS if v[1] in files and (not args.only or any(s in v[0] for s in args.only))]
    cases = [{"label": label, "file": file, "level": level, "feeds": feeds_for(files[file])}
             for label, file, level in variants]
    used = {c["file"] for c in cases}
    rows = []
    # Each variant in the browser, then natively, back to back: on a shared machine both sides
    # of a row see about the same load.
    with Browser({k: v for k, v in files.items() if k in used}, tuple(args.chromium_arg)) as browser:
        threads = int(browser.info["threads"])
        print(f"browser: {threads} WebAssembly thread(s), cross-origin isolated {browser.info['isolated']}", flush=True)
        for case in cases:
            load = os.getloadavg()[0]
            web = browser.run(case, args.repeats)
            native = native_ms(files[case["file"]], case["level"], case["feeds"], threads, args.repeats)
            row = {"variant": case["label"], "file": case["file"], "level": case["level"],
                   "bytes": files[case["file"]].stat().st_size, "loadavg_1min": load,
                   "native_ms": statistics.median(native), "native_times_ms": native}
            if "error" in web:
                row["browser_error"] = web["error"]
            else:
                row |= {"browser_ms": statistics.median(web["times"]), "browser_times_ms": web["times"],
                        "browser_session_ms": web["loadMs"]}
                row["ratio"] = row["browser_ms"] / row["native_ms"]
            print(f"  {case['label']}: browser {row.get('browser_ms', float('nan')):.1f} ms, "
                  f"native {row['native_ms']:.1f} ms (load {load:.1f})", flush=True)
            rows.append(row)
        info = browser.info
        clicks = {}
        if not args.bundle and not args.only:
            bundle = page_bundle(files, args.files_dir / "page_bundle")
            for decoder in ("decoder", "decoder_int8"):
                for warm_up in (True, False):
                    name = f"{decoder}, {'warm-up' if warm_up else 'no warm-up'}"
                    clicks[name] = page_clicks(browser, bundle, decoder, args.page_clicks, warm_up)
                    print(f"  demo page, {name}: {clicks[name]}", flush=True)

    profiles = {file: native_op_profile(files[file], feeds_for(files[file]), threads, args.repeats)
                for file in ("decoder.onnx", "encoder.onnx") if file in used}
    for file, shares in profiles.items():
        for kind, values in shares.items():
            print(f"native {file}: share of node time, {kind}: "
                  + ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(values.items())[:6]), flush=True)

    import onnxruntime

    report = {
        "what": "median ms of one run (after a warm-up run) at the files' input size; decoders: one box",
        "files": "random-weight fused RepViT-M1 student at 1024" if not args.bundle else str(args.bundle),
        "browser": {"engine": "headless Chromium, onnxruntime-web WebAssembly (SIMD, threaded)",
                    "chromium_args": args.chromium_arg,
                    "threads": threads, "cross_origin_isolated": info["isolated"],
                    "user_agent": info["userAgent"], "onnxruntime_web": info.get("version")},
        "native": {"onnxruntime": onnxruntime.__version__, "provider": "CPUExecutionProvider",
                   "intra_op_threads": threads},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "loadavg_at_end": os.getloadavg()},
        "repeats": args.repeats,
        "rows": rows,
        "native_profile_shares": profiles,
        "page_clicks": clicks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nbrowser: {threads} WebAssembly thread(s), cross-origin isolated {info['isolated']}; "
          f"native onnxruntime {onnxruntime.__version__}, {threads} thread(s); load {os.getloadavg()[0]:.1f}")
    print(f"{'variant':48} {'MiB':>6} {'browser ms':>11} {'native ms':>10} {'ratio':>6} {'load':>5}")
    for row in rows:
        web = f"{row['browser_ms']:11.1f}" if "browser_ms" in row else f"{'error':>11}"
        ratio = f"{row['ratio']:6.2f}" if "ratio" in row else f"{'':>6}"
        print(f"{row['variant']:48} {row['bytes'] / 2**20:6.1f} {web} {row['native_ms']:10.1f} {ratio} "
              f"{row['loadavg_1min']:5.1f}")
        if "browser_error" in row:
            print(f"    browser: {row['browser_error'][:200]}")
    if clicks:
        print(f"\n{'demo page (decoder + mask upscaling per click)':48} {'warm-up':>8} {'1st encode':>10} "
              f"{'clicks 1-3':>10} {'later':>6} {'(decoder':>8} {'+ mask)':>7}")
    for name, c in clicks.items():
        print(f"{name:48} {c['warm_up_ms']:8.0f} {c['first_encoder_ms']:10.0f} {c['first_3_ms']:10.1f} "
              f"{c['later_ms']:6.1f} {c['later_decoder_ms']:8.1f} {c['later_mask_ms']:7.1f}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
