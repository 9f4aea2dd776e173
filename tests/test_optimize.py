"""Half-precision graphs compute their normalisation statistics in fp32 (export/optimize.py).

ONNX's reference evaluator computes each op in the type the graph gives it, as a strongly typed
TensorRT engine does: with it, the overflow the pass prevents can be shown on a CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from diffrt.components import ComponentSpec, TensorSpec
from diffrt.export import onnx as onnx_export

SPEC = ComponentSpec("norm", (TensorSpec("sample", ("batch", 8, 6, 6)),), (TensorSpec("out", ("batch", 8, 6, 6)),),
                     ranges={"batch": (1, 2, 4)})


class Block(nn.Module):
    """What a UNet resnet does before its convolution: GroupNorm, then SiLU; and a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.group = nn.GroupNorm(2, 8)
        self.layer = nn.LayerNorm(6)

    def forward(self, sample):
        return self.layer(nn.functional.silu(self.group(sample)))


def evaluate(path, x: np.ndarray) -> np.ndarray:
    import onnx
    from onnx.reference import ReferenceEvaluator

    with np.errstate(over="ignore", invalid="ignore"):
        return ReferenceEvaluator(onnx.load(str(path))).run(None, {"sample": x})[0].astype(np.float32)


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    return Block().eval()


def test_fp16_normalisations_match_pytorch_where_plain_fp16_overflows(block, tmp_path, monkeypatch):
    x = (torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(1)) * 400).half()  # UNet-sized activations
    with torch.no_grad():
        want = block(x.float()).numpy()  # what PyTorch computes (its fp16 kernels accumulate in fp32 too)
    upcast = onnx_export.export_onnx(block, SPEC, tmp_path / "upcast", dtype=torch.float16)
    monkeypatch.setattr(onnx_export, "upcast_normalizations", lambda model, half_type: 0)
    plain = onnx_export.export_onnx(block, SPEC, tmp_path / "plain", dtype=torch.float16)
    got, naive = evaluate(upcast, x.numpy()), evaluate(plain, x.numpy())
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()
    assert not np.isfinite(naive).all() or np.abs(naive - want).max() > 0.5 * np.abs(want).max()  # the variance overflowed


def test_every_normalisation_of_an_fp16_unet_reads_fp32(t2i_folder, tmp_path):
    import onnx

    from diffrt.text_to_image_models import component_specs, load_text_to_image

    model = load_text_to_image(t2i_folder)
    spec = component_specs(model, ["unet"], batch=(1, 2, 4), height=(32, 32, 64), width=(32, 32, 64))["unet"]
    path = onnx_export.export_onnx(model.module("unet"), spec, tmp_path / "unet", dtype=torch.float16)
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    norms = [n for n in graph.node if n.op_type in ("InstanceNormalization", "LayerNormalization", "GroupNormalization")]
    assert len(norms) > 10  # GroupNorms (as InstanceNormalization) and the transformer blocks' LayerNorms
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT and types[n.output[0]] == onnx.TensorProto.FLOAT for n in norms)
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16  # the graph itself stays fp16
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_fp32_graphs_are_left_as_they_are(block, tmp_path):
    import onnx

    path = onnx_export.export_onnx(block, SPEC, tmp_path / "fp32")
    assert not [n for n in onnx.load(str(path)).graph.node if n.op_type == "Cast"]


def test_norms_sharing_an_input_and_unnamed_nodes_keep_the_graph_valid():
    """Every rewritten norm gets casts of its own with names of their own, whatever the nodes are called."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from diffrt.export.optimize import upcast_normalizations

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 8])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, [2, 8]) for n in ("y0", "y1")]
    scale = helper.make_tensor("s", TensorProto.FLOAT16, [8], [1.0] * 8)
    nodes = [helper.make_node("LayerNormalization", ["x", "s"], ["y0"]),  # unnamed
             helper.make_node("LayerNormalization", ["x", "s"], ["y1"], name="LayerNormalization_0")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outs, [scale]), opset_imports=[helper.make_opsetid("", 17)])
    assert upcast_normalizations(model, TensorProto.FLOAT16) == 2
    onnx.checker.check_model(model, full_check=True)
    data = (np.arange(16, dtype=np.float16).reshape(2, 8) * 40)
    y0, y1 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": data})
    assert np.array_equal(y0, y1) and np.isfinite(y0).all()
