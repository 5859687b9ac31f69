"""ONNX export of EdgeSAM, onnxruntime parity and latency, CoreML.

* ``encoder.onnx``: ``image`` (1, 3, S, S) normalized and padded as `Sam.preprocess` ->
  ``image_embeddings`` (1, 256, S/16, S/16) from the reparameterized (fused) backbone, then
  the backbone's maps ``features_s8``, ``features_s16``, ``features_s32`` (the RPN's input).
* ``decoder.onnx``: the client decoder (`PromptDecoder`): N prompt sets per call, points and
  box together, mask input; low-res logits of all four mask tokens; only static shapes or
  the prompt count (no shape computed from a float input).
* ``decoder_sam.onnx``: segment-anything's `SamOnnxModel` interface (image_embeddings,
  point_coords, point_labels, mask_input, has_mask_input, orig_im_size -> masks,
  iou_predictions, low_res_masks), usable with SAM's ONNX demo code.
* ``decoder_edgesam.onnx``: EdgeSAM's compact interface (image_embeddings, point_coords,
  point_labels -> scores, masks): all four mask tokens as low-res logits, no mask input.
* ``rpn.onnx``: the RPN head on the encoder's maps -> per-location scores and boxes.

Point coordinates are in the model's input frame; labels are float: 1 foreground,
0 background, 2 / 3 box corners, -1 padding (add one (0, 0) padding point when there is no
box, as `Sam`'s prompt encoder does; `edgesam.client.transforms.prompt_arrays` builds them).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from segment_anything.modeling import Sam
from torch import nn

from edgesam.artifacts import atomic_path
from edgesam.eval.speed import latency_ms
from edgesam.export.decoder import PromptDecoder
from edgesam.export.modules import CompactDecoder, EncoderGraph, RPNGraph, SamDecoder, pyramid_names
from edgesam.models.decoding import decode
from edgesam.models.rpn import RPN

SAM_DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
SAM_DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
COMPACT_INPUTS = ("image_embeddings", "point_coords", "point_labels")
COMPACT_OUTPUTS = ("scores", "masks")
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input")
DECODER_OUTPUTS = ("scores", "masks")
RPN_OUTPUTS = ("rpn_scores", "rpn_boxes")
POINT_AXES = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
PROMPT_AXES = {"point_coords": {0: "num_prompts", 1: "num_points"}, "point_labels": {0: "num_prompts", 1: "num_points"},
               "mask_input": {0: "num_prompts"}, "has_mask_input": {0: "num_prompts"},
               "scores": {0: "num_prompts"}, "masks": {0: "num_prompts"}}
ONNX_FILES = {"encoder": "encoder.onnx", "decoder": "decoder.onnx", "decoder_sam": "decoder_sam.onnx",
              "decoder_edgesam": "decoder_edgesam.onnx"}
RPN_FILE = "rpn.onnx"


class ParityError(RuntimeError):
    """An exported model's onnxruntime outputs differ from PyTorch beyond the tolerance."""


def fused_copy(sam: Sam) -> Sam:
    """A deep copy of `sam` in eval mode with its encoder reparameterized (if it can be)."""
    sam = copy.deepcopy(sam).eval()
    if hasattr(sam.image_encoder, "fuse"):
        sam.image_encoder.fuse()
    return sam


def _export(module: nn.Module, args: tuple, path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...],
            opset: int, dynamic_axes: dict | None = None) -> None:
    """TorchScript-based ONNX export, written atomically. The wrapper is put in eval mode first:
    the exporter restores the mode it finds, and a fresh wrapper's train mode would reach the
    wrapped model's BatchNorm layers."""
    module.eval()
    with atomic_path(path) as tmp, torch.no_grad():
        torch.onnx.export(module, args, str(tmp), dynamo=False, export_params=True, opset_version=opset,
                          do_constant_folding=True, input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes=dynamic_axes)


def _dummy_points(sam: Sam, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    size = sam.image_encoder.img_size
    coords = torch.rand(1, n, 2) * size
    labels = torch.tensor([[1.0] * (n - 1) + [-1.0]])
    return coords, labels


def export_encoder(sam: Sam, path: Path, opset: int = 17) -> None:
    """The (already fused) image encoder: `image` -> `image_embeddings`, then the pyramid maps."""
    size = sam.image_encoder.img_size
    _export(EncoderGraph(sam), (torch.randn(1, 3, size, size),), path, ("image",),
            ("image_embeddings", *pyramid_names(sam)), opset)


def sam_decoder_inputs(sam: Sam, coords: torch.Tensor, labels: torch.Tensor, orig_hw: tuple[int, int],
                       embeddings: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Inputs of the `SamOnnxModel` interface (no mask input)."""
    size = sam.prompt_encoder.image_embedding_size
    return {
        "image_embeddings": embeddings if embeddings is not None else torch.randn(1, 256, *size),
        "point_coords": coords,
        "point_labels": labels,
        "mask_input": torch.zeros(1, 1, 4 * size[0], 4 * size[1]),
        "has_mask_input": torch.tensor([0.0]),
        "orig_im_size": torch.tensor(orig_hw, dtype=torch.float32),
    }


def export_sam_decoder(sam: Sam, path: Path, opset: int = 17) -> None:
    """segment-anything's ONNX decoder interface (all mask outputs, as SAM's export default)."""
    coords, labels = _dummy_points(sam, 5)
    feeds = sam_decoder_inputs(sam, coords, labels, (1500, 2250))
    _export(SamDecoder(sam, return_single_mask=False), tuple(feeds.values()), path, SAM_DECODER_INPUTS,
            SAM_DECODER_OUTPUTS, opset, POINT_AXES)


def export_compact_decoder(sam: Sam, path: Path, opset: int = 17) -> None:
    """EdgeSAM's compact decoder interface."""
    size = sam.prompt_encoder.image_embedding_size
    coords, labels = _dummy_points(sam, 5)
    _export(CompactDecoder(sam), (torch.randn(1, 256, *size), coords, labels), path, COMPACT_INPUTS,
            COMPACT_OUTPUTS, opset, POINT_AXES)


def prompt_decoder_inputs(sam: Sam, coords: torch.Tensor, labels: torch.Tensor, embeddings: torch.Tensor,
                          mask_input: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Inputs of `decoder.onnx` for N prompt sets (`mask_input` None: no mask input)."""
    n, (h, w) = len(coords), sam.prompt_encoder.image_embedding_size
    return {"image_embeddings": embeddings, "point_coords": coords, "point_labels": labels,
            "mask_input": torch.zeros(n, 1, 4 * h, 4 * w) if mask_input is None else mask_input,
            "has_mask_input": torch.full((n,), 0.0 if mask_input is None else 1.0)}


def export_prompt_decoder(sam: Sam, path: Path, opset: int = 17) -> None:
    """The client decoder: N prompt sets per call (a dynamic axis, as the point count)."""
    coords, labels = _dummy_points(sam, 5)
    feeds = prompt_decoder_inputs(sam, coords.repeat(3, 1, 1), labels.repeat(3, 1),
                                  torch.randn(1, 256, *sam.prompt_encoder.image_embedding_size))
    _export(PromptDecoder(sam), tuple(feeds.values()), path, DECODER_INPUTS, DECODER_OUTPUTS, opset, PROMPT_AXES)


def export_rpn(sam: Sam, rpn: RPN, path: Path, opset: int = 17) -> None:
    """The RPN head on the encoder graph's pyramid outputs -> (rpn_scores, rpn_boxes)."""
    size = sam.image_encoder.img_size
    with torch.no_grad():
        features = sam.image_encoder.forward_pyramid(torch.zeros(1, 3, size, size))[1]
    _export(RPNGraph(rpn, size), tuple(features), path, pyramid_names(sam), RPN_OUTPUTS, opset)


def export_onnx(fused: Sam, out_dir: Path, opset: int = 17, rpn: RPN | None = None) -> dict[str, Path]:
    """The fused model's encoder and decoder interfaces (and the RPN head) under `out_dir`."""
    files = {name: Path(out_dir) / file for name, file in ONNX_FILES.items()}
    export_encoder(fused, files["encoder"], opset)
    export_prompt_decoder(fused, files["decoder"], opset)
    export_sam_decoder(fused, files["decoder_sam"], opset)
    export_compact_decoder(fused, files["decoder_edgesam"], opset)
    if rpn is not None:
        files["rpn"] = Path(out_dir) / RPN_FILE
        export_rpn(fused, rpn, files["rpn"], opset)
    return files


def session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU onnxruntime session with `threads` intra-op threads (default: torch's)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _numpy(feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in feeds.items()}


def _compare(name: str, got: np.ndarray, want: torch.Tensor, atol: float, rtol: float) -> dict[str, Any]:
    want = want.detach().cpu().numpy()
    if got.shape != want.shape:
        raise ParityError(f"{name}: onnxruntime shape {got.shape} != PyTorch shape {want.shape}")
    diff = np.abs(got - want)
    ok = bool(np.all(diff <= atol + rtol * np.abs(want)))
    return {"max_abs_diff": float(diff.max()), "max_abs_value": float(np.abs(want).max()), "within_tolerance": ok}


def _prompts(size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Points with a padding point; a point with a box (labels 2, 3), in `Sam`'s token order."""
    return [
        (torch.tensor([[[0.3 * size, 0.4 * size], [0.6 * size, 0.5 * size], [0.0, 0.0]]]), torch.tensor([[1.0, 0.0, -1.0]])),
        (torch.tensor([[[0.4 * size, 0.5 * size], [0.2 * size, 0.2 * size], [0.7 * size, 0.8 * size]]]),
         torch.tensor([[1.0, 2.0, 3.0]])),
    ]


@torch.no_grad()
def check_parity(sam: Sam, files: dict[str, Path], image: torch.Tensor, orig_hw: tuple[int, int],
                 atol: float = 1e-3, rtol: float = 1e-3, rpn: RPN | None = None) -> dict[str, Any]:
    """Run the exported files in onnxruntime and compare with PyTorch on `image` (a
    preprocessed 1x3xSxS tensor) and a few point / box prompts (for `decoder.onnx` also
    several prompt sets in one call, with and without mask input). Raises `ParityError`
    when any output is off by more than atol + rtol * |PyTorch value|; returns the differences.
    """
    report: dict[str, Any] = {"atol": atol, "rtol": rtol}
    embeddings, features = sam.image_encoder.forward_pyramid(image)
    got = session(files["encoder"]).run(None, {"image": image.numpy()})
    report["encoder"] = {name: _compare(f"encoder {name}", g, w, atol, rtol)
                         for name, g, w in zip(("image_embeddings", *pyramid_names(sam)), got, (embeddings, *features))}
    report["decoder_sam"], report["decoder_edgesam"] = {}, {}
    sam_decoder, compact = session(files["decoder_sam"]), session(files["decoder_edgesam"])
    for i, (coords, labels) in enumerate(_prompts(sam.image_encoder.img_size)):
        feeds = sam_decoder_inputs(sam, coords, labels, orig_hw, embeddings)
        want = SamDecoder(sam, return_single_mask=False)(**feeds)
        outs = sam_decoder.run(None, _numpy(feeds))
        for name, g, w in zip(SAM_DECODER_OUTPUTS, outs, want):
            report["decoder_sam"][f"prompt{i}/{name}"] = _compare(f"decoder_sam {name}", g, w, atol, rtol)
        # The compact decoder against `decode` with the same prompts (all four mask tokens).
        low, iou = decode(sam, embeddings, *_as_decode_prompts(coords, labels), num_outputs=4)
        scores, masks = compact.run(None, _numpy({"image_embeddings": embeddings, "point_coords": coords,
                                                   "point_labels": labels}))
        report["decoder_edgesam"][f"prompt{i}/scores"] = _compare("decoder_edgesam scores", scores, iou, atol, rtol)
        report["decoder_edgesam"][f"prompt{i}/masks"] = _compare("decoder_edgesam masks", masks, low, atol, rtol)
    report["decoder"] = _prompt_decoder_parity(sam, files["decoder"], embeddings, atol, rtol)
    if rpn is not None:
        report["rpn"] = _rpn_parity(sam, rpn, files["rpn"], features, atol, rtol)
    failed = [f"{part} {key}: max |diff| {value['max_abs_diff']:.2e}"
              for part in ("encoder", "decoder", "decoder_sam", "decoder_edgesam", "rpn") if part in report
              for key, value in report[part].items() if not value["within_tolerance"]]
    report["passed"] = not failed
    if failed:
        raise ParityError(f"ONNX parity broken beyond atol={atol}, rtol={rtol}: " + "; ".join(failed))
    return report


def _prompt_decoder_parity(sam: Sam, path: Path, embeddings: torch.Tensor, atol: float,
                           rtol: float) -> dict[str, Any]:
    """`decoder.onnx` against `decode` on 2 and 3 prompt sets per call, one batch with mask input."""
    decoder, out = session(path), {}
    for i, (coords, labels) in enumerate(_prompts(sam.image_encoder.img_size)):
        n = 2 + i
        coords, labels = coords.repeat(n, 1, 1) * torch.linspace(0.5, 1.0, n).reshape(n, 1, 1), labels.repeat(n, 1)
        mask_input = torch.randn(n, 1, *[4 * s for s in sam.prompt_encoder.image_embedding_size]) if i else None
        low, iou = decode(sam, embeddings, *_as_decode_prompts(coords, labels), mask_input=mask_input, num_outputs=4)
        scores, masks = decoder.run(None, _numpy(prompt_decoder_inputs(sam, coords, labels, embeddings, mask_input)))
        out[f"prompts{i}/scores"] = _compare("decoder scores", scores, iou, atol, rtol)
        out[f"prompts{i}/masks"] = _compare("decoder masks", masks, low, atol, rtol)
    return out


def _rpn_parity(sam: Sam, rpn: RPN, path: Path, features: list[torch.Tensor], atol: float,
                rtol: float) -> dict[str, Any]:
    """`rpn.onnx` against `RPNGraph` in PyTorch (the decoding `proposals` does before NMS)."""
    want = RPNGraph(rpn, sam.image_encoder.img_size)(*features)
    got = session(path).run(None, _numpy(dict(zip(pyramid_names(sam), features))))
    return {name: _compare(f"rpn {name}", g, w, atol, rtol) for name, g, w in zip(RPN_OUTPUTS, got, want)}


def _as_decode_prompts(coords: torch.Tensor, labels: torch.Tensor):
    """ONNX-style prompts (N sets of the same structure: box corners as labels 2/3, explicit
    padding) in `decode`'s terms: (points, labels, boxes)."""
    n = len(coords)
    corners = (labels[0] == 2) | (labels[0] == 3)
    boxes = coords[:, corners].reshape(n, 4) if corners.any() else None
    keep = ~corners & (labels[0] != -1)
    return coords[:, keep], labels[:, keep].long(), boxes


def ort_latency_ms(path: Path, feeds: dict[str, np.ndarray], repeats: int = 10) -> float:
    """Median onnxruntime CPU latency of one run, after a warm-up run."""
    sess = session(path)
    return latency_ms(lambda: sess.run(None, feeds), repeats)


def export_coreml(sam: Sam, path: Path) -> dict[str, Any]:
    """Convert the fused encoder to a CoreML ML program with nearest upsampling in the neck.

    Returns {"status": "exported", ...} or {"status": "skipped", "reason": ...} when
    coremltools is not installed (`pip install 'edgesam[coreml]'`).
    """
    if importlib.util.find_spec("coremltools") is None:
        return {"status": "skipped", "reason": "coremltools is not installed (pip install 'edgesam[coreml]')"}
    import coremltools as ct

    encoder = copy.deepcopy(sam.image_encoder).eval()
    size = encoder.img_size
    example = torch.randn(1, 3, size, size)
    with torch.no_grad():
        reference = encoder(example)
        encoder.upsample_mode = "nearest"
        nearest = encoder(example)
        traced = torch.jit.trace(encoder, example)
    model = ct.convert(traced, inputs=[ct.TensorType(name="image", shape=example.shape)],
                       outputs=[ct.TensorType(name="image_embeddings")], convert_to="mlprogram")
    with atomic_path(path) as tmp:  # keeps the .mlpackage suffix coremltools wants
        model.save(str(tmp))
    return {"status": "exported", "file": path.name,
            "nearest_vs_bilinear_max_abs_diff": float((nearest - reference).abs().max())}
