"""`diffrt export` and `diffrt refit` refuse what cannot work in one line, exit status 2, before any work."""

from __future__ import annotations

import pytest

from diffrt.cli import main
from diffrt.runtime.backends import available_backends, backend_available


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffrt: error: "), lines
    return lines[0]


@pytest.mark.skipif(backend_available("tensorrt"), reason="TensorRT is available here")
def test_tensorrt_commands_without_tensorrt_say_so_first(uncond_model_dir, tmp_path, capsys, monkeypatch):
    from diffrt.export import artifact

    def no_onnx_work(*args, **kwargs):
        raise AssertionError("ONNX export started before the backend check")

    monkeypatch.setattr(artifact, "export_onnx", no_onnx_work)
    line = one_line_error(capsys, ["export", "--model", str(uncond_model_dir), "--out", str(tmp_path / "a"), "--backend", "tensorrt"])
    assert "backend 'tensorrt' is not available" in line and f"available here: {', '.join(available_backends())}" in line
    assert not (tmp_path / "a").exists()
    # What the folder is comes first (a review's: "TensorRT is not available" hid a mistyped folder until the user had
    # found a GPU); an artifact with engines on this machine is test_refit's.
    line = one_line_error(capsys, ["refit", str(tmp_path / "no-such-artifact")])
    assert "no-such-artifact is not a folder (not found); give the artifact folder" in line  # not "has no manifest.json"
    assert not (tmp_path / "no-such-artifact").exists()
    (tmp_path / "empty").mkdir()
    assert "empty has no manifest.json: not an artifact folder" in one_line_error(capsys, ["refit", str(tmp_path / "empty")])


def test_old_opset_and_bf16_onnx_are_one_line(uncond_model_dir, tmp_path, capsys):
    line = one_line_error(capsys, ["export", "--model", str(uncond_model_dir), "--out", str(tmp_path / "a"), "--opset", "13"])
    assert "--opset 13 is below 17" in line
    line = one_line_error(capsys, ["export", "--model", str(uncond_model_dir), "--out", str(tmp_path / "b"), "--precision", "bf16"])
    assert "bf16 needs --backend tensorrt" in line
    line = one_line_error(capsys, ["export", "--model", str(uncond_model_dir), "--out", str(tmp_path / "c"), "--workspace-gb", "8"])
    assert "--workspace-gb caps TensorRT's builder; it needs --backend tensorrt" in line
    line = one_line_error(capsys, ["export", "--model", str(uncond_model_dir), "--out", str(tmp_path / "c"), "--workspace-gb", "0",
                                   "--backend", "tensorrt"])
    assert "--workspace-gb 0.0 must be a positive number of GiB" in line
    assert not any((tmp_path / name).exists() for name in "abc")


def test_the_workspace_cap_names_no_automatic_export_folder(tmp_path):
    """A builder's memory cap is a resource, not a property of the engine: the folder `diffrt generate` keeps an
    automatic export in is the same with or without it (and the same as before the option existed)."""
    from diffrt.export.options import ExportOptions, options_text

    assert options_text(ExportOptions(backend="tensorrt", workspace_gb=4.0)) == options_text(ExportOptions(backend="tensorrt"))
    assert "workspace" not in options_text(ExportOptions(workspace_gb=4.0))
