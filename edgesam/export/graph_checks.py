"""Static-shape checks of exported ONNX graphs, for runtimes that build engines ahead of time.

TensorRT (and most NPU compilers) reject graphs whose tensor shapes are computed from the
*values* of a float input, such as segment-anything's `orig_im_size` crop and resize. Two
checks, both on the ONNX graph alone:

* `output_dims`: onnx shape inference (with data propagation) on a copy whose declared
  output shapes are erased, so every output dim reported is one inference derived: an int,
  an input's symbolic dim (e.g. ``num_prompts``) or None (unknown);
* `float_shape_operands`: the nodes whose shape operand (Reshape's shape, Resize's sizes,
  Range's bounds, ...) depends on the value of a float graph input. `Shape` and `Size`
  read only dims, so they end the dependence.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, shape_inference

# Operand positions that set an output shape (or which elements are read), by op type.
SHAPE_OPERANDS = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4), "Resize": (1, 2, 3), "Upsample": (1,), "TopK": (1,), "Pad": (1,),
    "OneHot": (1,), "Split": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "NonZero": (0,),
}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
DIM_ONLY_OPS = {"Shape", "Size"}


class StaticShapeError(ValueError):
    """A graph has an output shape that is neither static nor an input's dim."""


def _load(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def output_dims(model: onnx.ModelProto | str | Path) -> dict[str, list[int | str | None]]:
    """Each output's dims as onnx shape inference derives them from the inputs alone."""
    bare = onnx.ModelProto()
    bare.CopyFrom(_load(model))
    del bare.graph.value_info[:]
    for output in bare.graph.output:
        output.type.tensor_type.ClearField("shape")
    inferred = shape_inference.infer_shapes(bare, data_prop=True)
    known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}

    def dims(name: str) -> list[int | str | None]:
        tensor = known[name].type.tensor_type if name in known else None
        if tensor is None or not tensor.HasField("shape"):
            return [None]
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]

    return {o.name: dims(o.name) for o in bare.graph.output}


def input_dim_names(model: onnx.ModelProto | str | Path) -> set[str]:
    return {d.dim_param for i in _load(model).graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}


def float_shape_operands(model: onnx.ModelProto | str | Path) -> list[str]:
    """'node (op) <- input' for every shape operand that a float graph input's value reaches."""
    graph = _load(model).graph
    weights = {w.name for w in graph.initializer}
    origin: dict[str, set[str]] = {i.name: {i.name} for i in graph.input
                                   if i.type.tensor_type.elem_type in FLOAT_TYPES and i.name not in weights}
    found = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        for position in SHAPE_OPERANDS.get(node.op_type, ()):
            if position < len(node.input) and node.input[position] in origin:
                found += [f"{node.name or node.output[0]} ({node.op_type}) <- {source}"
                          for source in sorted(origin[node.input[position]])]
        if node.op_type in DIM_ONLY_OPS:
            continue
        sources = set().union(*(origin.get(name, set()) for name in node.input))
        if sources:
            origin.update({name: sources for name in node.output})
    return found


def check_static_shapes(model: onnx.ModelProto | str | Path) -> dict[str, list[int | str]]:
    """Raise `StaticShapeError` unless every output dim is an int or an input's symbolic dim and
    no shape operand depends on a float input's value; returns the output dims."""
    model = _load(model)
    allowed = input_dim_names(model)
    dims = output_dims(model)
    problems = [f"output {name} has shape {shape}" for name, shape in dims.items()
                if any(not isinstance(d, int) and d not in allowed for d in shape)]
    problems += [f"shape operand from a float input's value: {p}" for p in float_shape_operands(model)]
    if problems:
        raise StaticShapeError("graph shapes are not static: " + "; ".join(problems[:8]))
    return dims  # type: ignore[return-value]
