"""`diffrt generate` (issue #5): device resolution, strict mode, what the output line reports, and
one-line errors (exit status 2). In-process through `diffrt.cli.main`, so each test takes seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrt.cli import main
from diffrt.generate import GenerateRequest, generate

LONG_PROMPT = " ".join(f"word{i}" for i in range(60))  # well over the tiny text encoder's 77 tokens


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffrt: error: "), err
    for fragment in fragments:
        assert fragment in err[0]
    return err[0]


def test_class_label_out_of_range_is_one_line(classemb_model_dir, tmp_path, capsys):
    code = main(["generate", "--model", str(classemb_model_dir), "--class-label", "7", "--steps", "1",
                 "--out", str(tmp_path / "x.png")])
    assert code == 2
    one_line_error(capsys, "class label 7 is out of range", "classes 0..3")
    assert not (tmp_path / "x.png").exists()


def test_device_defaults_to_auto_and_the_line_names_what_ran(uncond_model_dir, tmp_path, capsys):
    assert GenerateRequest().device is None and GenerateRequest().cuda_graph is True
    out = tmp_path / "x.npy"
    assert main(["generate", "--model", str(uncond_model_dir), "--steps", "1", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {out} (torch, ") and "truncated" not in line
    assert np.load(out).shape == (1, 16, 16, 3)
    result = generate(GenerateRequest(model=str(uncond_model_dir), num_inference_steps=1))
    assert result.images.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_tensorrt_with_a_cpu_device_is_one_line_before_any_work(uncond_model_dir, tmp_path, capsys, monkeypatch):
    from diffrt.runtime import backends

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "require_backend", lambda name: None)  # as if TensorRT were installed
    code = main(["generate", "--model", str(uncond_model_dir), "--backend", "tensorrt", "--device", "cpu",
                 "--out", str(tmp_path / "x.png")])
    assert code == 2
    one_line_error(capsys, "backend 'tensorrt' runs on a CUDA device, not cpu")


def test_strict_refuses_an_artifact_on_the_torch_backend(uncond_model_dir, tmp_path, capsys):
    from diffrt.export.artifact import ExportOptions, export_pixel_model

    artifact = export_pixel_model(uncond_model_dir, tmp_path / "art", ExportOptions(batch=(1, 2, 8), verify=False)).folder
    args = ["generate", "--model", str(artifact), "--steps", "1", "--out", str(tmp_path / "x.npy")]
    assert main([*args, "--strict"]) == 2
    one_line_error(capsys, "strict mode refuses")
    assert main(args) == 0  # without --strict: a warning, and the source weights run
    assert main([*args, "--backend", "onnxruntime", "--strict"]) == 0
    assert "(onnxruntime on CPUExecutionProvider, " in capsys.readouterr().out


def test_a_truncated_prompt_is_a_warning_and_on_the_output_line(t2i_folder, tmp_path, capsys):
    out = tmp_path / "x.npy"
    assert main(["generate", "--model", str(t2i_folder), "--prompt", LONG_PROMPT, "--steps", "1", "--device", "cpu",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().endswith("(prompt truncated)")
    warnings = [line for line in captured.err.splitlines() if line.startswith("diffrt: warning: ")]
    assert len(warnings) == 1 and "77 tokens" in warnings[0] and "word59" in warnings[0].replace(" ", "")
