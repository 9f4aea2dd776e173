"""Graph passes on an exported ONNX model, before it is saved.

    upcast_normalizations(model)   fp16/bf16 graphs: normalisation statistics in fp32

Why upcast. A normalisation squares its input to take the variance, and fp16 tops out at 65504:
an activation past ~256 squares to inf, and the division that follows gives NaN, which turns a
generated image black (RELIABILITY #4). A diffusion UNet's activations routinely reach the
hundreds. PyTorch's GroupNorm and LayerNorm kernels accumulate fp16 inputs in fp32, so the eager
model never sees this; an fp16 ONNX built strongly typed by TensorRT computes each op in the type
the graph gives it, and TensorRT itself warns that layernorms in fp16 may overflow and should run
in fp32. So every InstanceNormalization (GroupNorm's export), LayerNormalization and
GroupNormalization of a half-precision graph reads its input, scale and bias cast to fp32 and
casts its output back: the same numbers PyTorch computes, at the cost of two casts per norm.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

NORMALIZATIONS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization")


def upcast_normalizations(model, half_type: int) -> int:
    """Rewrite `model` (an onnx.ModelProto exported in `half_type`, TensorProto.FLOAT16 or BFLOAT16)
    in place so that its half-precision normalisations compute in fp32; returns how many were
    rewritten. A norm whose input is known to be of another type is left alone; one of unknown type
    (shape inference cannot run in memory on a graph over 2 GB) is taken to be in the graph's type."""
    from onnx import TensorProto, helper

    graph = model.graph
    types = _elem_types(model)
    nodes = []
    count = 0
    for node in graph.node:
        input_type = types.get(node.input[0], half_type) if node.input else None
        half = input_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16)
        if node.op_type not in NORMALIZATIONS or not half or len(node.output) != 1:
            nodes.append(node)
            continue
        prefix = f"{node.name or node.op_type}/fp32_{count}"  # the count keeps names unique, named nodes or not
        inputs = []
        for i, name in enumerate(node.input):
            if not name:  # an omitted optional input stays omitted
                inputs.append(name)
                continue
            cast = f"{name}__fp32_{count}_{i}"  # one tensor may feed several norms: one cast each, each its own name
            nodes.append(helper.make_node("Cast", [name], [cast], name=f"{prefix}/upcast_{i}", to=TensorProto.FLOAT))
            inputs.append(cast)
        output = node.output[0]
        wide = f"{output}__fp32"
        upcast = helper.make_node(node.op_type, inputs, [wide], name=node.name, domain=node.domain)
        upcast.attribute.extend(node.attribute)
        nodes.append(upcast)
        nodes.append(helper.make_node("Cast", [wide], [output], name=f"{prefix}/downcast", to=input_type))
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
        log.info("normalisations computed in fp32 in a half-precision graph: %d", count)
    return count


def _elem_types(model) -> dict[str, int]:
    """Element type of every named tensor the graph declares (inputs, outputs, value_info,
    initializers, Constant outputs), after ONNX shape inference fills in the intermediates."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=False)
    except Exception:  # noqa: BLE001 - a model too large or odd for in-memory inference: declared types only
        inferred = model
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    types.update({init.name: init.data_type for init in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types
