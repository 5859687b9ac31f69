"""Reduced-precision copies of the exported graphs: int8 encoder and decoder, fp16 encoder / decoder.

* int8: onnxruntime static quantization in QDQ format (what TensorRT, OpenVINO, QNN and
  onnxruntime's own int8 kernels read), uint8 activations and int8 weights (U8S8, the fast
  path of x86 VNNI), calibrated (MinMax by default) on real images through a
  `CalibrationDataReader`. Only Conv / MatMul / Gemm are quantized: the element-wise ops
  between them (GELU, the squeeze-excite gates, the neck's LayerNorm) stay float, since their
  int8 versions cost more in quantize / dequantize pairs than they save. The source graph
  is exported at opset >= 20, where GELU is one `Gelu` node (below 20 it is five
  element-wise nodes that QDQ would split apart).
* int8 decoder: onnxruntime dynamic quantization of the MatMul weights (int8, per tensor),
  activations quantized per call (`DynamicQuantizeLinear` + `MatMulInteger`), so no
  calibration set: the decoder's inputs are embeddings and prompts, not images. Its time is
  matmuls (the two-way transformer over the 64 x 64 image tokens and the upscaling), and
  WebAssembly's integer matmul is what makes a click live in the browser (docs/DEMO.md).
* fp16: weights and compute in float16, inputs and outputs kept float32 (`keep_io_types`),
  so clients feed and read the same arrays as for fp32. x86 CPUs without AVX512-FP16 run
  fp16 graphs slower than fp32; the files are for GPUs, NPUs and ARM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16
from segment_anything.modeling import Sam

from edgesam.artifacts import atomic_path
from edgesam.export.onnx import export_encoder

QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]
MIN_QUANT_OPSET = 20  # opset 20 has the Gelu operator
CALIBRATION = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}


class ImageCalibration(CalibrationDataReader):
    """Encoder inputs (1, 3, S, S) float32, one per calibration image."""

    def __init__(self, inputs: Iterable[np.ndarray]):
        self.inputs: list[np.ndarray] = list(inputs)
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._iter, None)
        return None if x is None else {"image": x}

    def rewind(self) -> None:
        self._iter: Iterator[np.ndarray] = iter(self.inputs)


def prepare_encoder(sam: Sam, tmp: Path, opset: int = 17) -> Path:
    """The fused encoder of `sam` at opset >= 20, pre-processed for quantization (shape
    inference, folding) in `tmp`: once for every weight mode `quantize_encoder` then writes."""
    source, prepared = Path(tmp) / "encoder_source.onnx", Path(tmp) / "encoder_prepared.onnx"
    export_encoder(sam, source, max(opset, MIN_QUANT_OPSET))
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    return prepared


def quantize_encoder(prepared: Path, path: Path, calibration: Iterable[np.ndarray], per_channel: bool,
                     method: str = "minmax") -> None:
    """Write `prepare_encoder`'s graph as a static int8 QDQ graph calibrated on `calibration`."""
    reader = ImageCalibration(calibration)
    if not reader.inputs:
        raise ValueError("int8 calibration needs at least one image")
    with atomic_path(path) as out:
        quantize_static(str(prepared), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CALIBRATION[method], op_types_to_quantize=QUANTIZED_OPS)


def quantize_decoder(source: Path, path: Path) -> None:
    """Write the decoder graph `source` with dynamically quantized int8 MatMul weights."""
    with atomic_path(path) as out:
        prepared = out.with_name(out.name + ".prepared.onnx")
        try:
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_dynamic(str(prepared), str(out), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
        finally:
            prepared.unlink(missing_ok=True)


def to_fp16(source: Path, path: Path) -> None:
    """`source` with float16 weights and compute, float32 inputs and outputs."""
    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    with atomic_path(path) as out:
        onnx.save(model, str(out))
