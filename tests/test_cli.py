"""The `diffrt` command: help and version work, user errors are one line and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from diffrt.cli import main
from diffrt.errors import DiffrtError

SUBCOMMANDS = ["train", "export", "refit", "generate", "bench", "serve", "triton-repo", "demo"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffrt", *args], capture_output=True, text=True, timeout=300)


def test_version_and_help():
    from diffrt import __version__

    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"diffrt {__version__}"
    out = run_cli("--help")
    assert out.returncode == 0
    for name in SUBCOMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS + ["train class-cond", "train finetune", "train dreambooth-lora"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    assert "usage: diffrt" in capsys.readouterr().out


def _assert_one_line_error(out: subprocess.CompletedProcess, *fragments: str) -> None:
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr  # one line, no traceback
    assert lines[0].startswith("diffrt: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_model_folder(tmp_path):
    _assert_one_line_error(run_cli("generate", "--model", str(tmp_path / "nope")), "model folder not found", "nope")
    _assert_one_line_error(run_cli("export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "a")), "model folder not found")


def test_unknown_backend_names_the_available_ones(uncond_model_dir):
    out = run_cli("generate", "--model", str(uncond_model_dir), "--backend", "warp-drive")
    _assert_one_line_error(out, "unknown backend 'warp-drive'", "available here: torch")


def test_unavailable_tensorrt_is_one_line(uncond_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine may really have TensorRT")
    out = run_cli("generate", "--model", str(uncond_model_dir), "--backend", "tensorrt")
    _assert_one_line_error(out, "backend 'tensorrt' is not available", "available here:")


def test_bad_values_are_one_line(uncond_model_dir, tmp_path):
    _assert_one_line_error(run_cli("export", "--model", str(uncond_model_dir), "--out", str(tmp_path / "a"), "--batch", "4:2:1"), "MIN:OPT:MAX")
    _assert_one_line_error(run_cli("generate", "--model", str(uncond_model_dir), "--out", str(tmp_path / "x.jpg")), ".png", ".npy")
    _assert_one_line_error(run_cli("generate", "--model", str(uncond_model_dir), "--color", "reddish", "--out", str(tmp_path / "x.png")), "hex colour")
    _assert_one_line_error(run_cli("generate", "--model", str(uncond_model_dir), "--lora-scale", "0.5", "--out", str(tmp_path / "x.png")),
                           "lora_scale 0.5: this model runs no LoRA", "--lora FILE[:SCALE]")
    _assert_one_line_error(run_cli("train", "class-cond", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")), "data folder not found")


def test_generate_writes_npy_in_unit_range(classemb_model_dir, tmp_path):
    out = tmp_path / "images.npy"
    assert main(["generate", "--model", str(classemb_model_dir), "--class-label", "2", "--num-images", "3",
                 "--steps", "3", "--out", str(out)]) == 0
    images = np.load(out)
    assert images.dtype == np.float32 and images.shape == (3, 16, 16, 3)
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_serve_flags_reach_the_service_config(monkeypatch):
    from diffrt.serve import app

    seen = {}
    monkeypatch.setattr(app, "serve", lambda config: seen.setdefault("config", config))
    assert main(["serve", "--backend", "tensorrt", "--device", "cuda", "--strict", "--no-cuda-graph",
                 "--lora", "a.safetensors:0.8", "--lora", "b.safetensors"]) == 0
    config = seen["config"]
    assert (config.backend, config.device, config.strict, config.cuda_graph) == ("tensorrt", "cuda", True, False)
    assert config.loras == [("a.safetensors", 0.8), ("b.safetensors", 1.0)]
    assert config.runtime_config().loras == config.loras
    seen.clear()
    assert main(["serve"]) == 0  # defaults: auto device, fallbacks allowed, graphs on, no LoRA
    assert (seen["config"].device, seen["config"].strict, seen["config"].cuda_graph, seen["config"].loras) == (None, False, True, [])


def test_demo_ui_flags_reach_the_demo(monkeypatch, tmp_path):
    from diffrt.serve import ui

    seen = {}
    monkeypatch.setattr(ui, "launch_ui", lambda **kwargs: seen.update(kwargs))
    assert main(["demo", "--ui", "--model", str(tmp_path), "--controlnet", "cn", "--lora", "a.safetensors:0.5",
                 "--backend", "onnxruntime", "--port", "7000"]) == 0
    assert seen == {"host": "127.0.0.1", "port": 7000, "model": str(tmp_path), "backend": "onnxruntime", "controlnet": ["cn"],
                    "loras": [("a.safetensors", 0.5)]}
    _assert_one_line_error(run_cli("demo", "--model", str(tmp_path)), "choose the model of the Gradio demo; add --ui")
    # The options of one mode given to the other were ignored without a word.
    _assert_one_line_error(run_cli("demo", "--port", "1234"), "--port sets where the Gradio demo listens; add --ui")
    _assert_one_line_error(run_cli("demo", "--host", "0.0.0.0"), "--host sets where the Gradio demo listens; add --ui")
    _assert_one_line_error(run_cli("demo", "--ui", "--out", "x.png"), "the Gradio demo (--ui) writes no file")
    _assert_one_line_error(run_cli("demo", "--ui", "--controlnet", "a", "--controlnet", "b", "--backend", "torch"),
                           "the demo UI takes one control image")  # one upload: Generate refused every click


def test_demo_ui_on_port_0_serves_on_a_free_port():
    """From the CLI review: `demo --ui --port 0` (the help's "0 picks a free one", as for serve) handed Gradio port 0,
    which listened there, printed ":0" and died in its own start-up check with a traceback."""
    import re
    import signal
    import time
    import urllib.request

    pytest.importorskip("gradio")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, "-m", "diffrt", "demo", "--ui", "--port", "0", "--backend", "torch"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        seen = []
        for line in proc.stdout:  # ends if the process dies
            seen.append(line)
            url = re.search(r"Running on local URL:\s+(http://127\.0\.0\.1:(\d+))", line)
            if url:
                break
        assert url and int(url.group(2)) != 0, "".join(seen)
        with urllib.request.urlopen(url.group(1), timeout=60) as page:
            assert page.status == 200 and b"gradio" in page.read().lower()
        # Ctrl-C ends the demo as interrupted, as every other command (Gradio's own wait, which its launch enters
        # after the lines above, took it as a normal end: exit 0, and a script running the demo went on).
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == -signal.SIGINT
    finally:
        proc.kill()
        proc.wait(60)


def test_mistakes_found_by_trying_the_readme_are_one_line(uncond_model_dir, tmp_path):
    """Each of these gave a traceback (or, for serve, a process that stayed up answering 503)."""
    import torch

    afile = tmp_path / "afile"
    afile.write_text("")
    cases = [
        (("export", "--model", str(uncond_model_dir), "--out", str(tmp_path / "a"), "--lora", str(tmp_path / "missing.safetensors")),
         "LoRA file not found"),
        (("export", "--model", str(uncond_model_dir), "--out", str(afile)), "is a file; an export writes a folder"),
        (("generate", "--model", str(uncond_model_dir), "--device", "tpu"), "device 'tpu' (--device) is not a device torch knows"),
        (("generate", "--model", str(uncond_model_dir), "--negative-prompt", "a cat", "--control-scale", "0.5"),
         "--negative-prompt/--control-scale need a text-to-image model"),
        (("serve", "--model", str(tmp_path / "missing")), "model folder not found"),
        (("serve", "--backend", "warp-drive"), "unknown backend 'warp-drive'"),
    ]
    if not torch.cuda.is_available():
        cases += [(("generate", "--model", str(uncond_model_dir), "--device", "cuda"), "torch sees no CUDA GPU here"),
                  (("demo", "--backend", "tensorrt"), "backend 'tensorrt' is not available")]
    for args, words in cases:
        _assert_one_line_error(run_cli(*args), words)
    out = run_cli("serve", "--port", "99999")
    assert out.returncode == 2 and "is not a TCP port" in out.stderr


def test_mistakes_found_by_a_new_user_are_one_line(t2i_folder, uncond_model_dir, tmp_path, capsys):
    """From a walk through the README as a new user: each gave a traceback, a misleading line (a mistyped path with
    --prompt read "this is a pixel-space model"), or failed only after all the sampling."""
    from PIL import Image

    afile, unet, out = tmp_path / "afile", str(t2i_folder / "unet"), str(tmp_path / "x.png")
    afile.write_text("")
    control = tmp_path / "edges.png"
    Image.new("RGB", (32, 32)).save(control)
    not_pixel, not_controlnet = "is a UNet2DConditionModel, not a UNet2DModel", "is a UNet2DConditionModel, not a ControlNetModel"
    sd = ["--model", str(t2i_folder), "--prompt", "cat", "--steps", "1"]
    cases = [
        (["generate", "--model", str(tmp_path / "sdd"), "--prompt", "cat", "--out", out], "model folder not found"),
        (["generate", "--model", unet, "--prompt", "cat", "--out", out], not_pixel),
        (["generate", "--model", unet, "--class-label", "1", "--out", out], not_pixel),
        (["export", "--model", unet, "--out", str(tmp_path / "a")], not_pixel),
        (["generate", *sd, "--controlnet", unet, "--control-image", str(control), "--out", out], not_controlnet),
        (["export", "--model", str(t2i_folder), "--controlnet", unet, "--out", str(tmp_path / "b")], not_controlnet),
        (["generate", *sd, "--image", str(tmp_path), "--out", out], "is a folder; pass an image file"),
        (["generate", "--model", str(uncond_model_dir), "--out", str(afile / "x.png")], "afile is a file, not a folder, so nothing can be made in it"),
        (["triton-repo", "--out", str(afile)], "afile is a file, not a folder; pass a folder path"),
        (["train", "class-cond", "--data", str(afile), "--out", str(tmp_path / "run")], "afile is a file, not a data folder"),
        (["export", "--model", str(afile), "--out", str(tmp_path / "c")], "afile is a file, not a model folder"),
    ]
    for args, words in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("diffrt: error: ")]  # beside loading progress bars
        assert len(errors) == 1 and words in errors[0] and "Traceback" not in err, (args, err)


def test_an_os_error_is_one_line(uncond_model_dir, tmp_path, monkeypatch, capsys):
    """What only the operating system knows (a read-only mount as root, a full disk) failed with a traceback."""
    from diffrt import atomic

    def full(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(atomic, "write_bytes", full)
    assert main(["generate", "--model", str(uncond_model_dir), "--steps", "1", "--num-images", "1", "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("diffrt: error: ")]  # after the step bar
    assert len(errors) == 1 and "No space left on device" in errors[0] and "x.png" in errors[0] and "Traceback" not in err


def test_serve_on_a_port_in_use_is_one_line_before_the_model_loads(capsys, monkeypatch):
    import socket

    from diffrt.serve import app

    monkeypatch.setattr(app, "create_app", lambda config: pytest.fail("the model started loading"))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0] and "pass another --port" in err[0]


@pytest.mark.parametrize(("args", "words"), [
    (("serve", "--port", "99999"), "'99999' is not a TCP port"),
    (("export",), "the following arguments are required: --out"),
    (("generate", "--scheduler", "heun"), "invalid choice: 'heun'"),
    (("warp",), "invalid choice: 'warp'"),
    (("train", "class-cond", "--resume", "latest"), "argument --resume: takes no value, or auto; got 'latest'"),
    # An unknown option is named by its command's parser, whose --help lists it (`diffrt --help` lists commands).
    (("generate", "--bogus"), "unrecognized arguments: --bogus (`diffrt generate --help` lists the options)"),
    (("train", "finetune", "--model", "m", "--data", "d", "extra"), "unrecognized arguments: extra (`diffrt train finetune --help`"),
    # From a review: Path("") is the current folder, so an unset `--out "$OUT"` trained (or exported) into it.
    (("train", "class-cond", "--out", ""), "--out is empty (an unset shell variable?)"),
    (("train", "finetune", "--model", "m", "--data", " ", "--out", "o"), "--data is empty"),
    (("export", "--out", "a", "--lora", ""), "--lora is empty"),
    (("generate", "--model", ""), "--model is empty"),
])
def test_a_malformed_command_line_is_one_line_too(args, words, capsys):
    """argparse's own errors (bad value, missing option, unknown command) are one line naming
    --help, not the whole usage block (README: a user error prints one line)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("diffrt") and ": error: " in err[0] and words in err[0] and "--help` lists the options" in err[0]


def test_serve_refuses_a_host_or_lora_it_cannot_use_before_the_model_loads(capsys, monkeypatch, tmp_path):
    """From a CLI review: a host that is not this machine's with --port 0 got past the check (skipped for port 0),
    loaded and warmed the model, and ended in uvicorn's line with no `diffrt: error:`; with a port, the line blamed
    the port. A missing LoRA file was found by the worker after uvicorn started, in a 20-line traceback."""
    from diffrt.serve import app

    monkeypatch.setattr(app, "create_app", lambda config: pytest.fail("the model started loading"))
    for port in ("0", "8766"):
        assert main(["serve", "--host", "999.1.1.1", "--port", port]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot listen on 999.1.1.1" in err[0] and "--host must be an address of this machine" in err[0]
    assert main(["serve", "--port", "0", "--lora", str(tmp_path / "nofile.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LoRA file not found" in err[0]


def test_mistakes_found_by_a_cli_review_are_one_line_before_any_work(uncond_model_dir, tmp_path, capsys):
    """export into a non-UTF-8 --out failed inside torch.onnx with 14,000 lines and left a rebuild marker; demo on
    eager PyTorch printed a bogus "1.00x" row; triton-repo wrote a repository Triton would refuse to load."""
    import os

    bad_out = os.fsdecode(bytes(tmp_path) + b"/ex\xff")
    cases = [(["export", "--model", str(uncond_model_dir), "--out", bad_out], "is not valid UTF-8"),
             (["demo", "--backend", "torch", "--out", str(tmp_path / "d.png")], "the demo times an exported backend against eager"),
             (["triton-repo", "--model", str(uncond_model_dir), "--out", str(tmp_path / "repo"), "--max-image-side", "-5"],
              "--max-image-side must be a number of pixels"),
             (["triton-repo", "--model", str(uncond_model_dir), "--out", str(tmp_path / "repo"), "--queue-delay-ms", "-1"],
              "--queue-delay-ms must be a number of milliseconds >= 0")]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("diffrt: error: ") and words in err[0], err
    assert sorted(os.listdir(tmp_path)) == []  # nothing written: no artifact, marker, grid or repository


def test_the_other_commands_help_gives_their_defaults(capsys):
    """Only the trainers' --help gave defaults: export's batch range (1:8:64, where README's example passes 1:2:4),
    generate's steps and seed, serve's port were nowhere to be read."""
    for command, shown in (("export", ("--batch MIN:OPT:MAX UNet batch range (CFG doubles the image count; the VAE's range starts at half MIN, the text encoder's at 1) (default: 1:8:64)",
                                       "(default: fp32)")),
                           ("generate", ("(default: 25)", "(default: out.png)", "7.5 on text-to-image ones as diffusers")),
                           ("serve", ("(default: 8000)", "(default: onnxruntime)"))):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(s in text for s in shown), command
        assert "(default: [])" not in text and "(default: True)" not in text and "(default: None)" not in text


def test_serve_exits_when_the_model_cannot_load(uncond_model_dir, tmp_path):
    """A model that fails in the worker (here: strict mode refusing PyTorch for an artifact) ends
    `diffrt serve` with that one line instead of a server answering 503 for ever."""
    from diffrt.export.artifact import export_pixel_model
    from diffrt.export.options import ExportOptions
    from diffrt.serve.app import ServeConfig, serve

    export_pixel_model(uncond_model_dir, tmp_path / "artifact", ExportOptions(verify=False))
    with pytest.raises(DiffrtError, match="a fallback strict mode refuses"):
        serve(ServeConfig(model=str(tmp_path / "artifact"), backend="torch", strict=True, port=0, api_key_env=None, log_level="warning"))


def test_bench_lists_its_configurations():
    out = run_cli("bench", "--list")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    names = [line.split()[0] for line in lines]
    assert {"digits", "tiny-t2i-controlnet", "sd15"} <= set(names)
    # One column each: the longest name does not push its row's columns out of line.
    assert len({line.index(" any  " if " any  " in line else " GPU  ") for line in lines}) == 1, lines


def test_trainer_help_gives_each_trainers_own_defaults(capsys):
    """The trainers' defaults differ (learning rate 1e-3 for class-cond, 1e-4 for the others): --help said none."""
    import re

    for trainer, lr in (("class-cond", "0.001"), ("dreambooth-lora", "0.0001")):
        with pytest.raises(SystemExit):
            main(["train", trainer, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert re.search(rf"--learning-rate LEARNING_RATE AdamW's peak learning rate \(default: {lr}\)", text)
        assert "(default: None)" not in text and "(default: False)" not in text  # unset options and flags: no default


def test_trainer_defaults_follow_diffusers_scripts():
    """dreambooth-lora ran a cosine schedule after 100 warm-up steps by default, where diffusers' DreamBooth-LoRA
    recipe (what its users compare against) is constant with no warm-up; the pixel trainers keep
    train_unconditional.py's cosine."""
    from diffrt.cli import build_parser

    parser = build_parser()
    dreambooth = parser.parse_args(["train", "dreambooth-lora", "--model", "m", "--instance-data", "d", "--instance-prompt", "p"])
    assert (dreambooth.lr_schedule, dreambooth.lr_warmup_steps, dreambooth.learning_rate) == ("constant", 0, 1e-4)
    for trainer in (["class-cond"], ["finetune", "--model", "m", "--data", "d"]):
        args = parser.parse_args(["train", *trainer])
        assert (args.lr_schedule, args.lr_warmup_steps) == ("cosine", 100)


@pytest.mark.parametrize("quiet", [False, True])
def test_a_stopped_run_says_so_once_from_a_data_parallel_run(quiet, monkeypatch, capsys, tmp_path):
    """A training run stopped by a signal prints one line and returns 128 + the signal; in a data-parallel run each
    process printed it, so the launcher's log held it once per GPU. The other processes' stops are quiet."""
    import signal

    from diffrt import cli
    from diffrt.errors import TrainingInterrupted

    def stopped(args):
        raise TrainingInterrupted("stopped by SIGTERM after step 3 of 6: saved it", signal.SIGTERM, 3, quiet=quiet)

    monkeypatch.setattr(cli, "_cmd_train_class_cond", stopped)
    assert main(["train", "class-cond", "--out", str(tmp_path / "run")]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip() == ("" if quiet else "diffrt: stopped by SIGTERM after step 3 of 6: saved it")


def test_verbose_is_taken_after_the_command_too(tmp_path, capsys):
    """The bug (a review's): `-v` worked only before the command (`diffrt train class-cond --max-steps 1 -v` gave
    "unrecognized arguments: -v"), while error lines end "(-v shows where)". Every command and trainer takes it, and
    one given before the command is not undone by the command's parser."""
    import argparse

    from diffrt.cli import build_parser

    parser = build_parser()
    train = ["train", "class-cond", "--max-steps", "1"]
    assert parser.parse_args([*train, "-v", "--out", "x"]).verbose is True
    assert parser.parse_args(["-v", *train]).verbose is True and parser.parse_args(train).verbose is False

    def commands(p):  # every parser under the top one, trainers included
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield name, sub
                    yield from commands(sub)

    missing = [name for name, sub in commands(parser) if "-v" not in sub._option_string_actions]
    assert missing == [], missing
    # Through main, to the command's own check (--out is a file): not refused as an unrecognized argument.
    (tmp_path / "out").write_text("a file where --out should be")
    rc = main([*train, "--resolution", "8", "--widths", "16", "32", "--out", str(tmp_path / "out"), "-v"])
    err = capsys.readouterr().err
    assert rc == 2 and "unrecognized arguments" not in err and "diffrt: error: " in err
