"""The shared training loop on a linear model: fast checks of what every trainer relies on
(gradient accumulation, the learning rate, logging, checkpoints and resume)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from diffrt import atomic
from diffrt.errors import DiffrtError
from diffrt.train.checkpoints import check_resume, list_checkpoints, load_latest_checkpoint, save_checkpoint
from diffrt.train.config import TrainConfig, lr_at
from diffrt.train.ema import EMA
from diffrt.train.loop import step_generator, train


def linear_config(out: Path, **overrides) -> TrainConfig:
    base = dict(out=str(out), max_steps=4, batch_size=8, learning_rate=0.05, lr_warmup_steps=0, lr_schedule="constant",
                checkpoint_every=2, log_every=1, seed=0)
    return TrainConfig(**{**base, **overrides})


def train_linear(config: TrainConfig):
    """Fit y = sum(x) with a Linear(4, 1) on fresh draws of x from each step's generator."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)

    def loss_fn(micro: int, g: torch.Generator) -> torch.Tensor:
        x = torch.randn(config.batch_size, 4, generator=g).to(model.weight.device)  # the loop puts the model on the GPU
        return F.mse_loss(model(x), x.sum(dim=1, keepdim=True))

    return train(config, model, loss_fn, save_fn=lambda out: None), model


def csv_rows(out: Path) -> list[tuple[int, float]]:
    with open(out / "loss.csv", newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def test_gradient_accumulation_averages_the_micro_batches(tmp_path):
    """Two micro-batches of 4 rows give the gradient and logged loss of one batch of 8 rows."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=g)
    y = torch.randn(8, 1, generator=g)

    def first_step(accumulation: int):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        grads = []
        model.weight.register_post_accumulate_grad_hook(lambda p: grads.append(p.grad.clone()))
        rows = 8 // accumulation

        def loss_fn(micro: int, g: torch.Generator) -> torch.Tensor:
            part = slice(micro * rows, (micro + 1) * rows)
            device = model.weight.device  # the loop puts the model on the GPU
            return F.mse_loss(model(x[part].to(device)), y[part].to(device))

        cfg = linear_config(tmp_path / f"acc{accumulation}", max_steps=1, batch_size=rows,
                            gradient_accumulation_steps=accumulation, max_grad_norm=0)
        result = train(cfg, model, loss_fn, save_fn=lambda out: None)
        return result.losses[0], grads[-1]  # the last hook call sees the accumulated gradient

    loss2, grad2 = first_step(2)
    loss1, grad1 = first_step(1)
    assert loss2 == pytest.approx(loss1, rel=1e-6)
    torch.testing.assert_close(grad2, grad1, rtol=1e-6, atol=1e-7)


def test_lr_warmup_and_cosine_edges():
    cfg = TrainConfig(out="unused", learning_rate=1.0, lr_warmup_steps=4, max_steps=12, lr_schedule="cosine")
    assert [lr_at(s, cfg) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert lr_at(8, cfg) == pytest.approx(0.5)  # half-way through the decay
    assert lr_at(11, cfg) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 7 / 8)).item()))  # last step, > 0
    assert lr_at(12, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(11, replace(cfg, lr_schedule="constant")) == 1.0
    assert lr_at(0, replace(cfg, lr_warmup_steps=0)) == 1.0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_decay_follows_diffusers_schedule(schedule):
    """diffusers' get_scheduler, stepped once per optimizer step: after the warm-up, the rate of step s is (N - s) /
    (N - warmup) for "linear" and half a cosine over the same steps for "cosine"; the warm-up is one step ahead of
    diffusers' here (documented in lr_at's caller)."""
    from diffusers.optimization import get_scheduler

    cfg = TrainConfig(out="unused", learning_rate=1.0, lr_warmup_steps=4, max_steps=12, lr_schedule=schedule)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_scheduler(schedule, optimizer, num_warmup_steps=4, num_training_steps=12)
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert [lr_at(s, cfg) for s in range(4, 12)] == pytest.approx(rates[4:])
    if schedule == "linear":
        assert lr_at(11, cfg) == pytest.approx(1 / 8) and lr_at(12, cfg) == 0.0


def test_scale_lr_multiplies_the_rate_by_the_images_of_a_step(tmp_path):
    """diffusers' --scale_lr: learning_rate x gradient_accumulation_steps x train_batch_size x num_processes."""
    train_linear(linear_config(tmp_path / "plain", batch_size=4, gradient_accumulation_steps=2, lr_schedule="linear"))
    train_linear(linear_config(tmp_path / "scaled", batch_size=4, gradient_accumulation_steps=2, lr_schedule="linear",
                               scale_lr=True))
    plain, scaled = (json.loads((tmp_path / run / "checkpoints" / "step-0000002" / "state.json").read_text())
                     for run in ("plain", "scaled"))
    assert scaled["param_groups"][0]["lr"] == pytest.approx(8 * plain["param_groups"][0]["lr"])

    def lrs(run):
        with open(tmp_path / run / "loss.csv", newline="") as f:
            return [float(r["lr"]) for r in csv.DictReader(f)]

    assert lrs("scaled") == pytest.approx([8 * lr for lr in lrs("plain")]) and lrs("plain")[0] == pytest.approx(0.05)


def test_adamw_settings_reach_the_optimizer_and_a_resume_must_keep_them(tmp_path):
    settings = dict(weight_decay=0.0, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6)
    train_linear(linear_config(tmp_path, max_steps=2, **settings))
    [group] = json.loads((list_checkpoints(tmp_path / "checkpoints")[-1] / "state.json").read_text())["param_groups"]
    assert (group["weight_decay"], group["betas"], group["eps"]) == (0.0, [0.8, 0.95], 1e-6)
    with pytest.raises(DiffrtError, match="adam_beta2: 0.95 saved vs 0.999 now"):
        train_linear(linear_config(tmp_path, max_steps=4, resume=True, **{**settings, "adam_beta2": 0.999}))


@pytest.mark.parametrize("name, value, message", [
    ("adam_beta1", 1.0, "--adam-beta1 must be in [0, 1), got 1.0"),
    ("adam_beta2", -0.1, "--adam-beta2 must be in [0, 1), got -0.1"),
    ("adam_epsilon", 0.0, "--adam-epsilon must be a number > 0, got 0.0"),
    ("weight_decay", float("nan"), "--adam-weight-decay must be a number >= 0, got nan"),
    ("snr_gamma", 0.0, "--snr-gamma must be a number > 0"),
    ("noise_offset", -0.1, "--noise-offset must be a number >= 0"),
    ("lr_schedule", "polynomial", "--lr-schedule must be constant, linear or cosine"),
    ("ema_power", 0.75, "--ema-power and --ema-inv-gamma shape the warm-up of an EMA, which --ema-decay turns on: pass --ema-decay too"),
    ("ema_inv_gamma", 0.0, "--ema-power must be >= 0 (0: the (1 + n) / (10 + n) warm-up) and --ema-inv-gamma > 0, got 0.0 and 0.0"),
])
def test_optimizer_and_objective_settings_are_checked(tmp_path, name, value, message):
    with pytest.raises(DiffrtError, match=re.escape(message)):
        linear_config(tmp_path, **{name: value}).validate()


def test_log_every_writes_the_mean_of_each_window(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _ = train_linear(linear_config(tmp_path, max_steps=7, log_every=3, checkpoint_every=7))
    rows = csv_rows(tmp_path)
    assert [s for s, _ in rows] == [3, 6, 7]  # the last step is always logged
    expected = [sum(result.losses[0:3]) / 3, sum(result.losses[3:6]) / 3, result.losses[6]]
    assert [v for _, v in rows] == pytest.approx(expected, rel=1e-5)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [3, 6, 7]


def test_log_window_spans_a_resume_from_a_checkpoint_between_rows(tmp_path):
    """A run dies after logging step 6 with its checkpoint at step 5: the resumed run's row for
    step 6 still averages steps 4-6, so loss.csv reads as the uninterrupted run's."""
    cfg = dict(max_steps=7, log_every=3, checkpoint_every=5)
    train_linear(linear_config(tmp_path / "full", **cfg))
    out = tmp_path / "run"
    train_linear(linear_config(out, **cfg))
    shutil.rmtree(out / "checkpoints" / "step-0000007")  # as if the run died after logging steps 6 and 7
    resumed, _ = train_linear(linear_config(out, resume=True, **cfg))
    assert resumed.start_step == 5
    full_rows, rows = csv_rows(tmp_path / "full"), csv_rows(out)
    assert [s for s, _ in rows] == [s for s, _ in full_rows] == [3, 6, 7]
    assert [v for _, v in rows] == pytest.approx([v for _, v in full_rows], rel=1e-6)


def test_a_finished_run_extended_with_more_steps_logs_as_an_uninterrupted_run(tmp_path):
    """The bug: a run to step 4 (log every 3) wrote its last row at 4, off the grid, and saved an empty loss
    window; extended to 6 steps with --resume, loss.csv and TensorBoard kept that row and the row at 6
    averaged steps 5-6 only, where an uninterrupted run has rows 3 and 6, the latter over steps 4-6."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_linear(linear_config(tmp_path / "full", max_steps=6, log_every=3))
    out = tmp_path / "run"
    train_linear(linear_config(out, max_steps=4, log_every=3))
    assert [s for s, _ in csv_rows(out)] == [3, 4]  # the control: a finished run logs its last step
    train_linear(linear_config(out, max_steps=6, log_every=3, resume=True))
    full_rows, rows = csv_rows(tmp_path / "full"), csv_rows(out)
    assert [s for s, _ in rows] == [s for s, _ in full_rows] == [3, 6]
    assert [v for _, v in rows] == pytest.approx([v for _, v in full_rows], rel=1e-6)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [3, 6]


def test_a_resume_with_another_log_every_keeps_the_rows_already_written(tmp_path):
    """The bug (a review's): whether the checkpoint's step had an extra row off the grid was read against the new
    --log-every, which --resume accepts: a run logged at 5 and 10, resumed with --log-every 3, lost its row 10."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_linear(linear_config(tmp_path, max_steps=10, log_every=5, checkpoint_every=10))
    before = csv_rows(tmp_path)
    train_linear(linear_config(tmp_path, max_steps=12, log_every=3, checkpoint_every=10, resume=True))
    rows = csv_rows(tmp_path)
    assert [s for s, _ in rows] == [5, 10, 12] and rows[:2] == before
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [5, 10, 12]


def test_a_diverged_run_stops_at_its_first_non_finite_loss_and_keeps_its_checkpoints(tmp_path):
    """The bug (a review's): a NaN loss trained on without a word, --checkpoints-total-limit pruned the good
    checkpoints for NaN ones, and DreamBooth saved an all-NaN LoRA and exited 0."""
    config = linear_config(tmp_path, max_steps=8, checkpoint_every=2, checkpoints_total_limit=1)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    calls = []

    def loss_fn(micro: int, g: torch.Generator) -> torch.Tensor:
        calls.append(micro)  # one call a step
        x = torch.randn(config.batch_size, 4, generator=g)
        loss = F.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        return loss * float("nan") if len(calls) == 4 else loss  # the fourth step diverges

    with pytest.raises(DiffrtError, match=r"the loss at step 4 is nan: training diverged, and the step was not applied; "
                                          r"the newest checkpoint, step-0000002, is as it was\. .*--learning-rate \(now 0.05\)") as err:
        train(config, model, loss_fn, save_fn=lambda out: None)
    assert "\n" not in str(err.value)
    assert torch.isfinite(model.weight).all()  # the step was not applied
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-0000002"]
    assert [s for s, _ in csv_rows(tmp_path)] == [1, 2, 3]


def test_resume_takes_one_data_folder_spelled_another_way(tmp_path, monkeypatch):
    """The bug (a review's): a run started with --data cat refused --resume with --data ./cat/ or its absolute path."""
    from diffrt.train.checkpoints import config_changes

    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    monkeypatch.chdir(tmp_path)
    saved = {"finetune": {"data": "cat", "model": "cat"}}
    for spelling in ("./cat/", str(tmp_path / "cat"), "dog/../cat"):
        assert config_changes(saved, {"finetune": {"data": spelling, "model": "cat"}}) == []
    assert config_changes(saved, {"finetune": {"data": "dog", "model": "cat"}}) == ["data: 'cat' saved vs 'dog' now"]
    assert config_changes({"d": {"data": "digits"}}, {"d": {"data": "./digits"}}) == [  # a bundled name is no folder
        "data: 'digits' saved vs './digits' now"]


def test_resume_tells_folders_apart_by_where_the_run_read_them(tmp_path, monkeypatch):
    """A checkpoint records where its folders were (trainer_state's "folders"): from another directory the same folder
    spelled another way is no change, another folder spelled like it (./cat there) is one (a review's: the record
    could only accept a resume, never refuse one), and a folder moved with its job keeps its spelling."""
    from diffrt.train.checkpoints import config_changes, folders

    for where in ("a/cat", "b/cat"):
        (tmp_path / where).mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    saved = {"finetune": {"data": "cat", "folders": folders({"data": "cat"})}}
    assert saved["finetune"]["folders"] == {"data": str(tmp_path / "a" / "cat")}
    monkeypatch.chdir(tmp_path / "b")
    assert config_changes(saved, {"finetune": {"data": str(tmp_path / "a" / "cat")}}) == []
    assert config_changes(saved, {"finetune": {"data": "../a/cat/"}}) == []
    assert config_changes(saved, {"finetune": {"data": "./cat"}}) == ["data: 'cat' saved vs './cat' now"]
    assert config_changes(saved, {"finetune": {"data": "cat"}}) == ["data: 'cat' saved vs 'cat' now"]
    (tmp_path / "a" / "cat").rename(tmp_path / "a" / "moved")  # the job's folders moved: the spelling is what is left
    assert config_changes(saved, {"finetune": {"data": "cat"}}) == []


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_a_finite_loss_with_a_non_finite_gradient_stops_the_run_too(tmp_path, max_grad_norm):
    """The bug (a review's): only the loss was checked; a finite loss whose gradient is not (a sqrt at 0; clipping
    turns an inf gradient into NaN) was applied, its NaN weights checkpointed over the good ones."""
    config = linear_config(tmp_path, max_steps=8, checkpoint_every=2, checkpoints_total_limit=1, max_grad_norm=max_grad_norm)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    calls = []

    def loss_fn(micro: int, g: torch.Generator) -> torch.Tensor:
        calls.append(micro)
        x = torch.randn(config.batch_size, 4, generator=g)
        loss = F.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        return loss + 0 * (model.weight.sum() * 0).sqrt() if len(calls) == 4 else loss  # d sqrt(0) = inf: a NaN gradient

    with pytest.raises(DiffrtError, match=r"the gradient at step 4 is not finite \(its norm is nan; the loss, [0-9.]+, is\): "
                                          r"training diverged, and the step was not applied; the newest checkpoint, "
                                          r"step-0000002, is as it was"):
        train(config, model, loss_fn, save_fn=lambda out: None)
    assert torch.isfinite(model.weight).all() and torch.isfinite(model.bias).all()
    [kept] = list_checkpoints(tmp_path / "checkpoints")
    assert kept.name == "step-0000002"
    assert all(torch.isfinite(t).all() for t in load_file(kept / "weights.safetensors").values())


def test_resume_of_a_checkpoint_older_than_a_setting_compares_it_with_what_that_run_trained_with():
    """The bug (a review's): a field an older checkpoint did not record was not compared, so --snr-gamma 5 (or a
    class-cond --prediction-type v_prediction) resumed a run that had trained without it, and said nothing."""
    from diffrt.train.checkpoints import config_changes

    old = {"config": {"learning_rate": 0.1}, "class_cond": {"widths": [16, 32]}}  # written before those settings existed
    same = {"config": {"learning_rate": 0.1, "snr_gamma": None, "noise_offset": 0.0, "ema_power": 0.0},
            "class_cond": {"widths": [16, 32], "prediction_type": "epsilon"}}
    assert config_changes(old, same) == []
    changed = {"config": {"learning_rate": 0.1, "snr_gamma": 5.0, "noise_offset": 0.0},
               "class_cond": {"widths": [16, 32], "prediction_type": "v_prediction"}}
    assert config_changes(old, changed) == ["snr_gamma: None saved vs 5.0 now",
                                            "prediction_type: 'epsilon' saved vs 'v_prediction' now"]


def train_linear_with_grids(config: TrainConfig):
    """train_linear, with a grid of two 8x8 images whose brightness follows the weights."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)

    def loss_fn(micro: int, g: torch.Generator) -> torch.Tensor:
        x = torch.randn(config.batch_size, 4, generator=g)
        return F.mse_loss(model(x), x.sum(dim=1, keepdim=True))

    def sample_fn() -> torch.Tensor:
        return torch.sigmoid(model.weight.sum()).expand(2, 3, 8, 8).detach()

    return train(config, model, loss_fn, save_fn=lambda out: None, sample_fn=sample_fn, sample_nrow=2)


def test_sample_grids_go_to_tensorboard_beside_their_pngs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_linear_with_grids(linear_config(tmp_path, sample_every=2))
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("samples")
    assert [e.step for e in images] == [2, 4]
    assert (images[0].width, images[0].height) == (Image.open(tmp_path / "samples" / "step-0000002.png").size)


def test_an_extended_run_keeps_its_last_grid_in_tensorboard(tmp_path):
    """The bug (a review's): extending a finished run whose last step is off the --log-every grid purges TensorBoard
    from that step, to drop its extra loss row, and the purge took that step's sample grid too, whose PNG was kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_linear_with_grids(linear_config(tmp_path, max_steps=4, log_every=3, sample_every=3))
    train_linear_with_grids(linear_config(tmp_path, max_steps=6, log_every=3, sample_every=3, resume=True))
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [f"step-000000{n}.png" for n in (3, 4, 6)]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [3, 6]
    images = {e.step: e for e in events.Images("samples")}
    assert sorted(images) == [3, 4, 6]
    import io

    logged = Image.open(io.BytesIO(images[4].encoded_image_string)).convert("RGB")
    assert logged.tobytes() == Image.open(tmp_path / "samples" / "step-0000004.png").convert("RGB").tobytes()


def test_a_torn_last_loss_row_is_dropped_on_resume(tmp_path):
    """A power cut during an append leaves loss.csv's last line cut short, without its newline: "20,0.1234,0.05" as
    "2" or "3,0.1": --resume drops it, where it kept a torn row of a step before the checkpoint's (and an empty
    step failed to parse)."""
    train_linear(linear_config(tmp_path, max_steps=4, checkpoint_every=4, log_every=1))
    whole = (tmp_path / "loss.csv").read_text()
    for torn in ("2", "3,0.1", ",", "2\x0c0,0.1,0.05\n"):  # the last: a row garbled within, read whole, not as two
        (tmp_path / "loss.csv").write_text(whole + torn)
        train_linear(linear_config(tmp_path, max_steps=4, checkpoint_every=4, log_every=1, resume=True))
        assert (tmp_path / "loss.csv").read_text() == whole, torn


def test_a_file_where_the_run_keeps_a_folder_is_refused_before_any_step(tmp_path):
    (tmp_path / "samples").write_text("notes")
    with pytest.raises(DiffrtError, match=r"samples is a file where the run keeps its samples; move it, or choose another --out"):
        train_linear(linear_config(tmp_path))
    assert not (tmp_path / "loss.csv").exists()


def test_a_resume_with_another_number_of_processes_is_refused(tmp_path):
    """Each process draws its own rows of a step's batch, so a run resumed with another process count
    trains on other data: refused by name, as a changed --batch-size is (the bug: it ran on silently)."""
    train_linear(linear_config(tmp_path, max_steps=2))
    state_file = tmp_path / "checkpoints" / "step-0000002" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["num_processes"] == 1
    state_file.write_text(json.dumps({**state, "num_processes": 2}))  # what a two-process run saves
    with pytest.raises(DiffrtError, match=r"other settings \(num_processes: 2 saved vs 1 now\)"):
        train_linear(linear_config(tmp_path, max_steps=4, resume=True))


def test_fresh_run_drops_the_tensorboard_steps_of_a_run_that_died_before_its_first_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_linear(linear_config(tmp_path, max_steps=3))
    shutil.rmtree(tmp_path / "checkpoints")  # as if the run died after logging steps 1-3, before saving
    train_linear(linear_config(tmp_path, max_steps=3))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [s for s, _ in csv_rows(tmp_path)] == [1, 2, 3]


def test_resume_past_max_steps_fails_clearly(tmp_path):
    train_linear(linear_config(tmp_path, max_steps=4))
    with pytest.raises(DiffrtError, match=r"--resume: .*step 4, past --max-steps 2; pass --max-steps 4 or more") as err:
        train_linear(linear_config(tmp_path, max_steps=2, resume=True))
    assert "\n" not in str(err.value)


def test_check_resume_refuses_what_train_refuses_before_any_setup(tmp_path):
    """check_resume (called by trainers before their costly setup) fails with train's own message."""
    check_resume(linear_config(tmp_path))  # a fresh run: nothing to check
    with pytest.raises(DiffrtError, match="no complete checkpoint"):
        check_resume(linear_config(tmp_path, resume=True))
    train_linear(linear_config(tmp_path, max_steps=4))
    check_resume(linear_config(tmp_path, max_steps=6, resume=True))  # a resumable change
    with pytest.raises(DiffrtError, match="past --max-steps 2"):
        check_resume(linear_config(tmp_path, max_steps=2, resume=True))
    with pytest.raises(DiffrtError, match="learning_rate: 0.05 saved vs 0.1 now"):
        check_resume(linear_config(tmp_path, learning_rate=0.1, resume=True))


def test_fresh_run_into_a_folder_with_checkpoints_refuses(tmp_path):
    train_linear(linear_config(tmp_path, max_steps=2))
    before = (tmp_path / "loss.csv").read_text()
    with pytest.raises(DiffrtError, match=r"already holds checkpoints .*step-0000002.*--resume.*empty --out") as err:
        train_linear(linear_config(tmp_path, max_steps=4))
    assert "\n" not in str(err.value)
    assert (tmp_path / "loss.csv").read_text() == before  # refused before any step


def test_resume_purges_tensorboard_steps_logged_after_the_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_linear(linear_config(tmp_path, max_steps=3))
    shutil.rmtree(tmp_path / "checkpoints" / "step-0000003")  # as if the run died after logging step 3
    train_linear(linear_config(tmp_path, max_steps=3, resume=True))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]  # step 3 once, from the resumed run


@pytest.mark.parametrize("power", [0.75, 2 / 3])
def test_ema_power_warm_up_averages_as_diffusers_ema_model(power):
    """--ema-power: diffusers' EMAModel(use_ema_warmup=True), update for update, on weights that change each step."""
    from diffusers.training_utils import EMAModel

    param = torch.nn.Parameter(torch.zeros(3))
    named = {"w": param}
    ours = EMA(named, decay=0.9999, power=power, inv_gamma=2.0)
    theirs = EMAModel([param], decay=0.9999, use_ema_warmup=True, power=power, inv_gamma=2.0)
    for n in range(1, 40):
        with torch.no_grad():
            param.copy_(torch.tensor([n, n * n, -n], dtype=torch.float32))
        ours.update(named, n)
        theirs.step([param])
        torch.testing.assert_close(ours.shadow["w"], theirs.shadow_params[0], rtol=1e-6, atol=1e-5)
    assert ours.decay_at(39) == pytest.approx(theirs.get_decay(39))


def test_failed_checkpoint_save_leaves_the_older_one_to_resume_from(tmp_path, monkeypatch):
    """The second file of the step-4 save fails: no step-4 folder, no temporary left, and --resume
    continues from step 2 exactly as an uninterrupted run does."""
    full, _ = train_linear(linear_config(tmp_path / "full", ema_decay=0.5))
    out = tmp_path / "run"
    (out / "checkpoints" / ".step-left-by-a-crash").mkdir(parents=True)
    calls, save = [], atomic.save_safetensors

    def flaky(path, tensors):
        calls.append(path)
        if len(calls) == 5:  # step 2 writes weights, optimizer, ema; step 4 fails on its optimizer file
            raise OSError("disk full (injected)")
        save(path, tensors)

    monkeypatch.setattr(atomic, "save_safetensors", flaky)
    with pytest.raises(OSError, match="injected"):
        train_linear(linear_config(out, ema_decay=0.5))
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000002"]
    assert not list((out / "checkpoints").glob(".step-*"))  # neither the failed save nor the older leftover

    resumed, _ = train_linear(linear_config(out, ema_decay=0.5, resume=True))
    assert resumed.start_step == 2
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-6)
    assert [s for s, _ in csv_rows(out)] == [1, 2, 3, 4]


def test_checkpoint_load_puts_ema_on_the_parameters_device_and_restores_the_loss_scale(tmp_path):
    """A checkpoint loads onto CPU; the EMA averages must follow each parameter (CUDA in a GPU
    run; the meta device stands in for it here), and an fp16 run's loss scale comes back."""
    named = {"w": torch.nn.Parameter(torch.ones(3))}
    optimizer = torch.optim.AdamW(named.values())
    save_checkpoint(tmp_path, 1, named, optimizer, EMA(named, 0.9), {"scaler": {"scale": 1024.0, "growth_factor": 2.0,
                    "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 7}})
    on_meta = {"w": torch.nn.Parameter(torch.ones(3, device="meta"))}
    ema = EMA(on_meta, 0.9)
    ema.load({"w": torch.full((3,), 2.0, dtype=torch.float16)}, on_meta)
    assert ema.shadow["w"].device.type == "meta" and ema.shadow["w"].dtype == torch.float32

    scaler = torch.amp.GradScaler("cpu")
    assert load_latest_checkpoint(tmp_path, named, optimizer, EMA(named, 0.9), scaler)["step"] == 1
    assert scaler.get_scale() == 1024.0 and scaler.state_dict()["_growth_tracker"] == 7



class _RecordAutocast(torch.autograd.Function):
    """The identity, noting whether autocast (for its input's device) is on in its forward and backward."""

    seen: dict = {}

    @staticmethod
    def forward(ctx, x):
        ctx.device_type = x.device.type
        _RecordAutocast.seen["forward"] = torch.is_autocast_enabled(x.device.type)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _RecordAutocast.seen["backward"] = torch.is_autocast_enabled(ctx.device_type)
        return grad


def test_mixed_precision_autocasts_the_forward_only_and_can_change_between_runs(tmp_path):
    """bf16 runs the forward pass under autocast (bf16 matmuls, fp32 weights) and the backward pass
    outside it, as torch.amp advises. accelerate refuses a second Accelerator with another
    mixed_precision in one process; the loop lets a bf16 run follow an fp32 one."""
    train_linear(linear_config(tmp_path / "fp32", max_steps=1))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    dtypes = []

    def loss_fn(micro: int, g: torch.Generator) -> torch.Tensor:
        x = torch.randn(8, 4, generator=g).to(model.weight.device)
        y = _RecordAutocast.apply(model(x))
        dtypes.append(y.dtype)
        return F.mse_loss(y.float(), x.sum(dim=1, keepdim=True))

    result = train(linear_config(tmp_path / "bf16", mixed_precision="bf16"), model, loss_fn, save_fn=lambda out: None)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert _RecordAutocast.seen == {"forward": True, "backward": False}
    assert model.weight.dtype == torch.float32 and all(torch.isfinite(torch.tensor(result.losses)))
    assert len(result.step_seconds) == len(result.losses) == 4 and min(result.step_seconds) > 0  # bench_train's medians
    with pytest.raises(DiffrtError, match="mixed-precision"):
        linear_config(tmp_path / "bad", mixed_precision="fp8").validate()


def test_mixed_precision_defaults_to_accelerates_setting(monkeypatch, tmp_path):
    """The bug: --mixed-precision defaulted to "no" and overrode `accelerate launch --mixed_precision bf16` (which
    exports ACCELERATE_MIXED_PRECISION): an fp32 run with an fp32 base, twice the memory, without a word. diffusers'
    scripts default the flag to None, leaving accelerate's setting in force."""
    from diffrt.cli import _train_config, build_parser

    def parsed(*flags):
        return _train_config(build_parser().parse_args(["train", "class-cond", "--out", str(tmp_path), *flags]))

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert parsed().mixed_precision == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert parsed().mixed_precision == "bf16"
    assert parsed("--mixed-precision", "no").mixed_precision == "no"  # the flag wins
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(DiffrtError, match="ACCELERATE_MIXED_PRECISION is 'fp8'.*pass --mixed-precision"):
        parsed()


@pytest.fixture
def fp16_loss_scaling(request, monkeypatch):
    """The device of an fp16 run with its loss scaler: "cuda" (a GPU: accelerate's own GradScaler), or "cpu", where
    the loop is given accelerate's Accelerator with torch's CPU GradScaler, which a CPU Accelerator does not make (its
    fp16 needs CUDA). The scaler's work (scale, unscale, skip, back off) is torch's either way; on the CPU it is the
    loop's handling of it that is tested, on every machine. accelerate's process state (its device included) is
    dropped before and after the CPU variant: on a GPU machine it would otherwise keep the CUDA device an earlier run
    chose, or give its CPU one to the runs after it."""
    if request.param != "cpu":
        yield request.param
        return
    import diffrt.train.loop as loop
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    def accelerator(mixed_precision: str):
        AcceleratorState._reset_state(reset_partial_state=True)
        made = Accelerator(mixed_precision="no", cpu=True)
        AcceleratorState._shared_state["_mixed_precision"] = "fp16"  # so that clipping unscales first, as on a GPU
        made.native_amp, made.scaler = True, torch.amp.GradScaler("cpu")
        return made

    monkeypatch.setattr(loop, "_accelerator", accelerator)
    yield request.param
    AcceleratorState._reset_state(reset_partial_state=True)


FP16_DEVICES = [pytest.param("cpu", id="cpu-scaler"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("fp16_loss_scaling", FP16_DEVICES, indirect=True)
def test_fp16_steps_the_loss_scaler_skips_are_reported(fp16_loss_scaling, tmp_path, caplog):
    """A gradient that overflows fp16 on every step: the GradScaler skips each, and the run said nothing while it
    "finished" untrained."""
    import logging

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    before = model.weight.detach().clone()

    def loss_fn(micro: int, g: torch.Generator) -> torch.Tensor:  # finite in fp32; scaled, its gradient overflows fp16
        return model(torch.full((8, 4), 6e4, device=model.weight.device)).float().pow(2).mean()

    with caplog.at_level(logging.WARNING, logger="diffrt.train.loop"):
        train(linear_config(tmp_path / "run", mixed_precision="fp16", max_grad_norm=0.0, max_steps=1), model, loss_fn,
              save_fn=lambda out: None)
    assert "the fp16 loss scaler skipped 1 of the steps up to 1" in caplog.text
    assert torch.equal(model.weight.detach().cpu(), before)  # no step taken


@pytest.mark.parametrize("fp16_loss_scaling", FP16_DEVICES, indirect=True)
def test_a_non_finite_loss_under_the_fp16_loss_scaler_stops_the_run(fp16_loss_scaling, tmp_path):
    """The bug (a review's): under fp16 the finite check was left to the loss scaler, which mends an overflowing
    gradient but not a NaN loss: it skipped every step, and the run "finished" and saved its untrained weights."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    before = model.weight.detach().clone()

    def loss_fn(micro: int, g: torch.Generator) -> torch.Tensor:
        x = torch.randn(8, 4, generator=g).to(model.weight.device)
        return F.mse_loss(model(x), x.sum(dim=1, keepdim=True)) * float("nan")

    with pytest.raises(DiffrtError, match=r"the loss at step 1 is nan: training diverged.*--mixed-precision bf16"):
        train(linear_config(tmp_path / "run", mixed_precision="fp16"), model, loss_fn, save_fn=lambda out: None)
    assert torch.equal(model.weight.detach().cpu(), before)


def train_linear_overflowing_once(config: TrainConfig):
    """train_linear with a loss whose gradient overflows fp16 at the first loss scale on the first step only: the
    scaler skips it and halves its scale, which the checkpoints then carry, and every later step is taken."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    first = step_generator(config.seed, 0, 0, 0).initial_seed()  # the first step's generator tells it apart

    def loss_fn(micro: int, g: torch.Generator) -> torch.Tensor:
        x = torch.randn(config.batch_size, 4, generator=g).to(model.weight.device)
        loss = F.mse_loss(model(x), x.sum(dim=1, keepdim=True)) * 1e-3
        return loss * 1e6 if g.initial_seed() == first else loss

    return train(config, model, loss_fn, save_fn=lambda out: None), model


@pytest.mark.parametrize("fp16_loss_scaling", FP16_DEVICES, indirect=True)
def test_fp16_scales_the_loss_and_resumes_with_its_scale_and_ema(fp16_loss_scaling, tmp_path):
    """fp16: fp32 weights on the device, the GradScaler's state in each checkpoint, and a resumed run that ends where
    the uninterrupted one does: losses, weights, EMA and the loss scale (the first step's overflow halved it; a resume
    that started again from the first scale would end with another). A review found the GPU test's steps all
    overflowed but one, so a resume that dropped the scaler's state passed it."""
    device = fp16_loss_scaling
    config = dict(mixed_precision="fp16", ema_decay=0.9)
    full, model = train_linear_overflowing_once(linear_config(tmp_path / "full", **config))
    assert model.weight.device.type == device and model.weight.dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(full.losses)))

    out = tmp_path / "run"
    train_linear_overflowing_once(linear_config(out, max_steps=2, **config))

    def scaler_state(run, step: int) -> dict:
        return json.loads((run / "checkpoints" / f"step-{step:07d}" / "state.json").read_text())["scaler"]

    assert scaler_state(out, 2)["scale"] == 65536.0 / 2  # the first step was skipped, the scale halved
    resumed, again = train_linear_overflowing_once(linear_config(out, resume=True, **config))
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-5)
    assert scaler_state(out, 4) == scaler_state(tmp_path / "full", 4)
    assert torch.allclose(again.weight, model.weight, rtol=1e-6, atol=1e-7)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        initial = torch.nn.Linear(4, 1).weight.detach()
    assert not torch.allclose(model.weight.detach().cpu(), initial)  # the steps after the first were taken
    ema_full = load_file(tmp_path / "full" / "checkpoints" / "step-0000004" / "ema.safetensors")
    ema_run = load_file(out / "checkpoints" / "step-0000004" / "ema.safetensors")
    assert all(torch.allclose(ema_full[k], ema_run[k], rtol=1e-6, atol=1e-7) for k in ema_full)

    named = {"weight": torch.nn.Parameter(torch.zeros(1, 4, device=device)), "bias": torch.nn.Parameter(torch.zeros(1, device=device))}
    ema, scaler = EMA(named, 0.9), torch.amp.GradScaler(device)
    load_latest_checkpoint(out / "checkpoints", named, torch.optim.AdamW(named.values()), ema, scaler)
    assert all(v.device.type == device and v.dtype == torch.float32 for v in ema.shadow.values())
    assert scaler.get_scale() == scaler_state(out, 4)["scale"]


def test_allow_tf32_holds_for_the_run_only(no_tf32):
    """The bug (a review's): --allow-tf32 turned TF32 on for the rest of the process (a notebook's, a test session's
    later fp32 work ran in TF32). The loop holds it for its steps (on a CUDA device) and gives the switches back, on
    an error too. (The switches are set on CPU builds as well.)"""
    from diffrt.train.loop import tf32

    with pytest.raises(RuntimeError, match="a step failed"), tf32(True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        raise RuntimeError("a step failed")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    with tf32(False):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_any_64_bit_seed_trains_and_small_seeds_keep_their_generators(tmp_path):
    """A --seed of 1234567890 (or a timestamp) overflowed manual_seed at the first step; the layout is
    now taken modulo 2^64, which leaves the generators of every seed that worked before as they were."""
    result, _ = train_linear(linear_config(tmp_path / "big", seed=1234567890))
    assert len(result.losses) == 4
    for seed in (0, 7, -3):
        old = ((seed * 1_000_003 + 5) * 64 + 2) * 1024 + 1
        assert step_generator(seed, 5, 2, 1).initial_seed() == torch.Generator().manual_seed(old).initial_seed()
    with pytest.raises(DiffrtError, match="--seed must fit in 64 bits"):
        train_linear(linear_config(tmp_path / "huge", seed=2**64))


def test_accumulation_beyond_the_seed_layout_is_one_line(tmp_path):
    """Each micro-batch's generator is a pure function of (step, micro-batch, process); past 64
    micro-batches two of them would draw the same data and noise, so such a run is refused."""
    from diffrt.errors import DiffrtError
    from diffrt.train.config import MAX_ACCUMULATION, TrainConfig
    from diffrt.train.loop import step_generator

    seeds = {step_generator(0, s, m).initial_seed() for s in range(3) for m in range(MAX_ACCUMULATION)}
    assert len(seeds) == 3 * MAX_ACCUMULATION
    with pytest.raises(DiffrtError, match="--gradient-accumulation-steps must be <= 64, got 65"):
        TrainConfig(out=str(tmp_path / "run"), gradient_accumulation_steps=65).validate()


def train_with_dropout(config: TrainConfig, global_seed: int):
    """train_linear's task through a hidden layer with dropout, whose masks come from torch's global
    generator; that generator is left at `global_seed` (whatever the process did before) for the run."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1))

    def loss_fn(micro: int, g: torch.Generator) -> torch.Tensor:
        x = torch.randn(config.batch_size, 4, generator=g).to(model[0].weight.device)
        return F.mse_loss(model(x), x.sum(dim=1, keepdim=True))

    torch.manual_seed(global_seed)
    return train(config, model, loss_fn, save_fn=lambda out: None)


def test_dropout_masks_follow_the_seed_and_resume_exactly(tmp_path):
    """A pretrained UNet2DModel may have dropout (diffusers' `dropout`, e.g. 0.1), which draws from the
    global generator, not from the step's: two runs with one --seed differed, and so did a resumed run
    from the uninterrupted one. The caller's global generator is left as it was."""
    cfg = dict(gradient_accumulation_steps=2)
    full = train_with_dropout(linear_config(tmp_path / "full", **cfg), global_seed=1)
    after = torch.rand(4)
    again = train_with_dropout(linear_config(tmp_path / "again", **cfg), global_seed=2)
    assert again.losses == full.losses
    out = tmp_path / "run"
    train_with_dropout(linear_config(out, max_steps=2, **cfg), global_seed=3)
    resumed = train_with_dropout(linear_config(out, resume=True, **cfg), global_seed=4)
    assert resumed.losses == full.losses[2:]
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(4))  # the global generator is where the caller left it


def test_resume_with_only_damaged_checkpoints_says_how_to_start_afresh(tmp_path):
    """Every checkpoint damaged: a fresh run refuses the --out (it holds checkpoints) and said to pass
    --resume, which said to run without --resume. It names the way out now, and that way works."""
    train_linear(linear_config(tmp_path, max_steps=2))
    for ckpt in list_checkpoints(tmp_path / "checkpoints"):
        (ckpt / "state.json").unlink()
    with pytest.raises(DiffrtError, match="already holds checkpoints"):
        train_linear(linear_config(tmp_path, max_steps=2))
    with pytest.raises(DiffrtError, match=r"only 1 damaged \(newest step-0000002\); remove .*checkpoints to start afresh") as err:
        train_linear(linear_config(tmp_path, max_steps=2, resume=True))
    assert "without --resume" not in str(err.value) and "\n" not in str(err.value)
    shutil.rmtree(tmp_path / "checkpoints")
    assert len(train_linear(linear_config(tmp_path, max_steps=2))[0].losses) == 2


def test_out_that_is_a_file_is_one_line_before_any_setup(tmp_path):
    """An --out that is (or lies under) a file failed at train's first mkdir with a FileExistsError
    (NotADirectoryError) traceback, after the trainer had loaded its model and data."""
    (tmp_path / "notes.txt").write_text("not a folder")
    for out in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "run"):
        with pytest.raises(DiffrtError, match=r"notes.txt is a file, not a folder") as err:
            linear_config(out).validate()
        assert "\n" not in str(err.value)
    linear_config(tmp_path / "new" / "run").validate()  # a folder yet to be made is fine


@pytest.mark.parametrize("name", ["lr_warmup_steps", "sample_every"])
def test_negative_warmup_or_sample_every_is_refused(tmp_path, name):
    """--sample-every -1 wrote a grid after every step (done % -1 == 0) and --lr-warmup-steps -3 started
    the cosine part-way down, both without a word."""
    flag = "--" + name.replace("_", "-")
    with pytest.raises(DiffrtError, match=f"{flag} must be >= 0, got -1"):
        linear_config(tmp_path, **{name: -1}).validate()
    linear_config(tmp_path, **{name: 0}).validate()


def test_checkpoints_total_limit_keeps_the_newest_and_resume_continues_from_it(tmp_path):
    """--checkpoints-total-limit 1 leaves only the checkpoint just saved and changes no loss; --resume
    finds it, may change the limit (it says what is kept, not what is computed) and continues exactly."""
    full, _ = train_linear(linear_config(tmp_path / "full", max_steps=8))
    out = tmp_path / "run"
    first, _ = train_linear(linear_config(out, max_steps=6, checkpoints_total_limit=1))
    assert first.losses == full.losses[:6]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000006"]
    assert not list((out / "checkpoints").glob(".*"))  # removed whole, no renamed folder left behind
    check_resume(linear_config(out, max_steps=8, checkpoints_total_limit=2, resume=True))
    resumed, _ = train_linear(linear_config(out, max_steps=8, checkpoints_total_limit=2, resume=True))
    assert resumed.start_step == 6 and resumed.losses == full.losses[6:]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000006", "step-0000008"]


def test_checkpoints_total_limit_counts_and_removes_complete_checkpoints_only(tmp_path):
    """A damaged checkpoint neither takes the place of a complete one nor is removed by the limit
    (--resume skips it, with a warning, as before)."""
    out = tmp_path / "run"
    train_linear(linear_config(out, max_steps=4))
    (out / "checkpoints" / "step-0000002" / "state.json").unlink()
    resumed, _ = train_linear(linear_config(out, max_steps=8, checkpoints_total_limit=1, resume=True))
    assert resumed.start_step == 4
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000002", "step-0000008"]


def test_checkpoints_total_limit_below_one_is_refused(tmp_path):
    with pytest.raises(DiffrtError, match=r"--checkpoints-total-limit must be >= 1 .*got 0; leave it out to keep every") as err:
        linear_config(tmp_path, checkpoints_total_limit=0).validate()
    assert "\n" not in str(err.value)
    linear_config(tmp_path, checkpoints_total_limit=1).validate()


# What killed saves leave (atomic.make_temp_dir's folders, hex; atomic_path's files, hex now, tempfile's
# before) and what must survive beside them: the user's files, and other hidden names, however alike
# (an 8-letter word is not a staging folder's token). A trailing "/" marks a folder.
LEFTOVERS = [".model.1a2b3c4d/", ".model.old/", ".lora-0f9e8d7c/", ".loss.csv.0a1b2c3d.tmp", ".dreambooth.json.abcdef12.tmp",
             "samples/.step-0000002.png.12345678.tmp", "checkpoints/.step-5e6f7a8b/", "checkpoints/.step-0000002.old/",
             "class_images/.class-00003.png.9abcdef0.tmp"]
NOT_LEFTOVERS = [".git/", ".cache.abcd1234/", ".lora-backup/", ".model.previous/", ".model.original/", ".lora-previous/", ".loss.csv.bak", "notes.txt", "model/.model.1a2b3c4d/",
                 "tensorboard/.events.abcd1234.tmp", "samples/.notes.abcd1234.tmp", "class_images/.lora-1a2b3c4d/"]


def _plant(out: Path, names: list[str]) -> None:
    for name in names:
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir()
            (path / "weights.safetensors").write_text("half a file")
        else:
            path.write_text("half a file")


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_removes_what_killed_saves_left_and_nothing_else(tmp_path, caplog, resume):
    """A run killed during its final save or a checkpoint save left its staging folders and files in
    --out (gigabytes at SD size) that nothing reads; the next run, fresh or resumed, removes them, says
    so, and touches no other file, however alike its name."""
    out = tmp_path / "run"
    if resume:
        train_linear(linear_config(out, max_steps=2))
    # A model/ folder is a finished run's result, which a fresh run refuses (check_no_earlier_run): resumed runs only.
    kept = NOT_LEFTOVERS if resume else [name for name in NOT_LEFTOVERS if not name.startswith("model/")]
    _plant(out, LEFTOVERS + kept)
    with caplog.at_level("INFO", logger="diffrt.train.checkpoints"):  # remove_killed_saves logs there
        result, _ = train_linear(linear_config(out, max_steps=4, resume=resume))
    assert result.start_step == (2 if resume else 0)
    assert [name for name in LEFTOVERS if (out / name).exists()] == []
    assert [name for name in kept if not (out / name).exists()] == []
    removed = [r.getMessage() for r in caplog.records if "left by an interrupted save" in r.getMessage()]
    assert sorted(m.split("removed ", 1)[1].split(",")[0] for m in removed) == sorted(str(out / n) for n in LEFTOVERS)


def test_out_is_checked_where_the_run_writes(tmp_path, monkeypatch):
    """--out is written into when it exists (not its parent, which may be another user's: a run in /scratch/$USER was
    refused, and a read-only --out let through), else made in its nearest existing folder."""
    import os

    from diffrt import atomic

    mine, theirs = tmp_path / "mine", tmp_path
    mine.mkdir()
    writable = {str(mine)}
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) in writable)
    atomic.check_writable(mine, folder=True)  # the parent is not writable, --out is: fine
    with pytest.raises(DiffrtError, match=r"new/run: .* is not writable here"):
        atomic.check_writable(theirs / "new" / "run", folder=True)  # made in the parent: refused
    writable.clear()
    with pytest.raises(DiffrtError, match=r"mine: .*mine is not writable here"):
        linear_config(mine).validate()  # a read-only --out is refused before any setup


def test_an_out_without_locks_trains_with_a_warning(tmp_path, monkeypatch, caplog):
    """A filesystem without flock (some network mounts answer ENOLCK): the run goes on unguarded and says so,
    rather than refusing to train there."""
    import errno
    import fcntl
    from dataclasses import dataclass

    from diffrt.train.checkpoints import holds_out

    @dataclass
    class Run:
        train: TrainConfig

        def validate(self) -> None:
            self.train.validate()

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="diffrt.train.checkpoints"):
        holds_out(lambda run: train_linear(run.train))(Run(linear_config(tmp_path / "run", max_steps=2)))
    assert f"two runs into {tmp_path / 'run'} at once would not be stopped" in caplog.text
    assert [s for s, _ in csv_rows(tmp_path / "run")] == [1, 2]


# -- a clean stop on SIGINT / SIGTERM ----------------------------------------------------------------


@pytest.fixture(autouse=True)
def signals_as_in_a_terminal():
    """Python's own SIGINT and SIGTERM handling for each test, whatever the test process inherited (a CI runner may start
    it with SIGINT ignored, as a shell starts a background job; an earlier test, Ray's init, leaves a SIGTERM handler),
    and what was there before afterwards: the signal tests send both to this process."""
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for signum, handler in before.items():
        if handler is not None:
            signal.signal(signum, handler)


def _signalled_at(config: TrainConfig, signals: dict[int | str, list[int]]):
    """train_linear, its loss function sending this process signals[s] (in order) during step s (1-based), and its
    save function signals["save"], with a sample grid (the weights as a 2x2 image)."""
    import os

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    step = {"n": 0}

    def loss_fn(micro: int, g: torch.Generator) -> torch.Tensor:
        step["n"] += 1
        for signum in signals.get(step["n"], []):
            os.kill(os.getpid(), signum)
        x = torch.randn(config.batch_size, 4, generator=g)
        return F.mse_loss(model(x), x.sum(dim=1, keepdim=True))

    def save_fn(out: Path) -> None:
        for signum in signals.get("save", []):
            os.kill(os.getpid(), signum)
        (out / "saved").touch()

    return train(config, model, loss_fn, save_fn=save_fn,
                 sample_fn=lambda: torch.sigmoid(model.weight.detach()).view(1, 1, 2, 2).expand(1, 3, 2, 2)), model


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_after_the_step_with_its_checkpoint_and_resume_continues_exactly(signum, tmp_path):
    """A preempted job (SIGTERM) or a Ctrl-C mid-run lost every step since the last checkpoint. Now the step under
    way finishes, is checkpointed (--checkpoint-every is 100 here) and logged, and --resume continues as an
    uninterrupted run would; the process's own handlers are back afterwards."""
    import signal

    from diffrt.errors import TrainingInterrupted

    signum = getattr(signal, signum)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(TrainingInterrupted, match=rf"^stopped by {signum.name} after step 3 of 6: saved .*step-0000003; "
                                                  r"--resume continues the run \(with --max-steps 3, it saves") as stopped:
        _signalled_at(linear_config(tmp_path / "stopped", max_steps=6, checkpoint_every=100, log_every=2), {3: [signum]})
    assert (stopped.value.signum, stopped.value.step) == (signum, 3)
    assert {s: signal.getsignal(s) for s in before} == before
    assert [p.name for p in list_checkpoints(tmp_path / "stopped" / "checkpoints")] == ["step-0000003"]
    assert not (tmp_path / "stopped" / "saved").exists()  # the result is the finished run's
    _, resumed = _signalled_at(linear_config(tmp_path / "stopped", max_steps=6, checkpoint_every=100, log_every=2,
                                             resume=True), {})
    _, whole = _signalled_at(linear_config(tmp_path / "whole", max_steps=6, checkpoint_every=100, log_every=2), {})
    assert torch.equal(resumed.weight, whole.weight)
    assert csv_rows(tmp_path / "stopped") == csv_rows(tmp_path / "whole")  # step 4's row: the mean of steps 3 and 4
    assert (tmp_path / "stopped" / "saved").exists()


@pytest.mark.parametrize("first", ["SIGINT", "SIGTERM"])
def test_a_ctrl_c_after_the_first_signal_stops_at_once(first, tmp_path):
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # another test's (ray's) may be set
    with pytest.raises(KeyboardInterrupt):
        _signalled_at(linear_config(tmp_path, max_steps=6, checkpoint_every=100), {3: [getattr(signal, first), signal.SIGINT]})
    assert list_checkpoints(tmp_path / "checkpoints") == []
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("first", ["SIGINT", "SIGTERM"])
def test_a_sigterm_after_the_first_signal_lets_the_checkpoint_be_saved(first, tmp_path):
    """torchrun passes on what it receives, and a scheduler may signal a whole process group: a process gets the
    same SIGTERM twice, and the second, killing it mid-save, would lose the checkpoint the first asked for."""
    import signal

    from diffrt.errors import TrainingInterrupted

    with pytest.raises(TrainingInterrupted, match="after step 3 of 6"):
        _signalled_at(linear_config(tmp_path, max_steps=6, checkpoint_every=100),
                      {3: [getattr(signal, first), signal.SIGTERM], 4: [signal.SIGTERM]})
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-0000003"]


def test_resuming_a_stopped_run_to_its_step_ends_it_as_a_run_to_that_step(tmp_path):
    """The stop's line offers `--resume --max-steps N` to keep the run as it is: that writes what a run to N writes
    at its end, the loss row for steps since the last one and the sample grid, besides the result."""
    import signal

    from diffrt.errors import TrainingInterrupted

    with pytest.raises(TrainingInterrupted):
        _signalled_at(linear_config(tmp_path / "stopped", max_steps=6, checkpoint_every=100, log_every=2), {3: [signal.SIGINT]})
    assert not (tmp_path / "stopped" / "samples" / "step-0000003.png").exists()
    _signalled_at(linear_config(tmp_path / "stopped", max_steps=3, checkpoint_every=100, log_every=2, resume=True), {})
    _signalled_at(linear_config(tmp_path / "whole", max_steps=3, checkpoint_every=100, log_every=2), {})
    assert csv_rows(tmp_path / "stopped") == csv_rows(tmp_path / "whole")
    assert [s for s, _ in csv_rows(tmp_path / "whole")] == [2, 3]
    grids = [(tmp_path / run / "samples" / "step-0000003.png").read_bytes() for run in ("stopped", "whole")]
    assert grids[0] == grids[1]
    # Once more: a finished run resumed at its own --max-steps writes no second row or grid.
    _signalled_at(linear_config(tmp_path / "stopped", max_steps=3, checkpoint_every=100, log_every=2, resume=True), {})
    assert csv_rows(tmp_path / "stopped") == csv_rows(tmp_path / "whole")


@pytest.mark.parametrize("when", ["last step", "save"])
def test_a_signal_at_the_end_lets_the_run_finish_and_still_stops(when, tmp_path):
    """A signal during the last step or the saving of the result: the run finishes and saves it (a second SIGTERM,
    as a launcher passes it on, does not cost it), and the caller still hears of the signal (a script that was
    Ctrl-C'd must stop, not go on to its next command)."""
    import signal

    from diffrt.errors import TrainingInterrupted

    signals = {3: [signal.SIGTERM], "save": [signal.SIGTERM]} if when == "last step" else {"save": [signal.SIGTERM] * 2}
    before = signal.getsignal(signal.SIGTERM)  # another test's (ray's) may be set
    with pytest.raises(TrainingInterrupted, match=rf"^stopped by SIGTERM at the end of the run: all 3 steps are done and "
                                                  rf"the result is saved in {re.escape(str(tmp_path))}$") as stopped:
        _signalled_at(linear_config(tmp_path, max_steps=3, checkpoint_every=100), signals)
    assert stopped.value.step == 3 and (tmp_path / "saved").exists()
    assert [s for s, _ in csv_rows(tmp_path)] == [1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) == before


def test_an_ignored_sigint_stays_ignored(tmp_path):
    """A background job of a shell script starts with SIGINT ignored: a Ctrl-C meant for the shell in front must not
    stop it."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result, _ = _signalled_at(linear_config(tmp_path, max_steps=4, checkpoint_every=100), {2: [signal.SIGINT]})
        assert result.steps == 4 and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_resume_auto_starts_a_new_run_where_there_is_no_checkpoint_and_resumes_where_there_is(tmp_path, caplog):
    """One command line for every attempt of a requeued job: `--resume auto`."""
    with caplog.at_level("INFO", logger="diffrt.train.config"):
        first, _ = train_linear(linear_config(tmp_path, max_steps=2, resume="auto"))
    assert first.start_step == 0 and "--resume auto: " in caplog.text and "holds no checkpoint yet; starting a new run" in caplog.text
    again, model = train_linear(linear_config(tmp_path, max_steps=4, resume="auto"))
    _, whole = train_linear(linear_config(tmp_path / "whole", max_steps=4))
    assert again.start_step == 2 and torch.equal(model.weight, whole.weight)
    # Damaged checkpoints only: not a new run over them, but --resume's own answer.
    for ckpt in list_checkpoints(tmp_path / "checkpoints"):
        (ckpt / "state.json").unlink()
    with pytest.raises(DiffrtError, match="no complete checkpoint .* damaged"):
        train_linear(linear_config(tmp_path, max_steps=6, resume="auto"))
    with pytest.raises(DiffrtError, match="resume must be True, False or 'auto', got 'yes'"):
        linear_config(tmp_path, resume="yes").validate()


def test_gradient_buckets_keep_order_split_on_dtype_device_and_size():
    """Data-parallel averaging packs gradients as DDP does: consecutive tensors of one dtype and device, up to the cap;
    a tensor over the cap is a bucket of its own; nothing is dropped or reordered (each process builds the same list)."""
    from diffrt.train.data_parallel import buckets

    f32 = [torch.zeros(n) for n in (3, 3, 5, 20, 1)]
    f64 = torch.zeros(2, dtype=torch.float64)
    grads = [f32[0], f32[1], f64, f32[2], f32[3], f32[4]]
    got = list(buckets(grads, bucket_bytes=6 * 4))  # six float32s
    assert [[id(g) for g in b] for b in got] == [[id(f32[0]), id(f32[1])], [id(f64)], [id(f32[2])], [id(f32[3])], [id(f32[4])]]
    assert [g for b in got for g in b] == grads and list(buckets([], 10)) == []


def test_a_stopped_linear_run_resumed_to_its_step_logs_the_rate_its_last_step_ran_at(tmp_path, caplog):
    """From a review: stopped after step 3 of 6 and resumed with --max-steps 3, the last loss row gave the rate the
    new 3-step schedule puts at step 3 (near 0) where the step ran at the 6-step schedule's. The checkpoint keeps the
    rate. Grids a killed run left past the checkpoint go."""
    import logging
    import signal

    from diffrt.errors import TrainingInterrupted

    out = tmp_path / "stopped"
    stopped = linear_config(out, max_steps=6, checkpoint_every=100, log_every=2, lr_schedule="linear")
    with pytest.raises(TrainingInterrupted):
        _signalled_at(stopped, {3: [signal.SIGINT]})
    atomic.write_bytes(out / "samples" / "step-0000005.png", b"a grid a killed run left")  # past the checkpoint
    with caplog.at_level(logging.WARNING, logger="diffrt.train.loop"):
        _signalled_at(replace(stopped, max_steps=3, resume=True), {})
    with open(out / "loss.csv", newline="") as f:
        rows = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}
    assert rows[3] == pytest.approx(lr_at(2, stopped), rel=1e-5) and rows[3] > 0.01  # loss.csv keeps 6 digits
    assert not (out / "samples" / "step-0000005.png").exists() and (out / "samples" / "step-0000003.png").is_file()
    assert "moves the end of the" not in caplog.text  # no step is left to run at another rate


def test_extending_a_run_warns_only_where_the_rate_moves(tmp_path, caplog):
    """A finished cosine run extended with --resume --max-steps restarts the decay from near zero (as diffusers'
    scripts do when their scheduler is rebuilt): the warning says so. A constant rate moves nothing: no warning."""
    import logging

    for schedule, warned in (("constant", False), ("cosine", True)):
        out = tmp_path / schedule
        train_linear(linear_config(out, max_steps=4, lr_schedule=schedule))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="diffrt.train.loop"):
            train_linear(linear_config(out, max_steps=8, lr_schedule=schedule, resume=True))
        assert ("moves the end of the" in caplog.text) is warned, caplog.text
    assert re.search(r"--max-steps 8 \(the checkpoint's run: 4\) moves the end of the cosine learning-rate decay: step 5 "
                     r"runs at 0\.025 where the saved run's schedule gives 0; the run is not the one an uninterrupted run "
                     r"to 8 would be", caplog.text), caplog.text


@pytest.mark.parametrize("result", ["model/", "pytorch_lora_weights.safetensors"])
def test_fresh_run_into_a_finished_run_without_checkpoints_refuses(tmp_path, result):
    """The bug (a review's): a finished run's --out, its checkpoints removed to save space, took a new run without a
    word: its loss.csv truncated, its sample grids deleted as "a killed run's grid", its result replaced. Refused in one
    line naming what is there, before anything is touched, `--resume auto` (a fresh run there) too."""
    train_linear(linear_config(tmp_path, max_steps=2))
    shutil.rmtree(tmp_path / "checkpoints")
    _plant(tmp_path, [result, "samples/step-0000002.png"])  # what a trainer's save and grid leave
    before = (tmp_path / "loss.csv").read_text()
    for resume in (False, "auto"):
        with pytest.raises(DiffrtError, match=rf"already holds a finished run \(.*{re.escape(result.rstrip('/'))}\) and no "
                                              r"checkpoint .*choose another --out, or remove") as err:
            train_linear(linear_config(tmp_path, max_steps=2, resume=resume))
        assert "\n" not in str(err.value)
    assert (tmp_path / "loss.csv").read_text() == before and (tmp_path / "samples" / "step-0000002.png").exists()


def test_a_folder_where_the_run_writes_its_loss_log_is_refused_before_any_step(tmp_path):
    """The bug (a review's): a folder at OUT/loss.csv failed the run at its first log row (Errno 21)."""
    (tmp_path / "loss.csv").mkdir()
    with pytest.raises(DiffrtError, match=r"loss.csv is a folder where the run writes its loss.csv; move it, or choose another --out"):
        train_linear(linear_config(tmp_path))
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "tensorboard").exists()


def test_checkpoints_from_step_ten_million_on_are_found_in_step_order(tmp_path):
    """The bug (a review's): checkpoint folders were matched by exactly seven digits, so step-10000000 (save_checkpoint's
    {step:07d}) was invisible to --resume, and by name a later one would sort before step-9999999."""
    model = torch.nn.Linear(4, 1)
    named = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(named.values())
    config = linear_config(tmp_path, max_steps=10_000_001, resume=True)
    for step in (9_999_999, 10_000_000):
        save_checkpoint(tmp_path / "checkpoints", step, named, optimizer, None, {"config": vars(config)})
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-9999999", "step-10000000"]
    state = load_latest_checkpoint(tmp_path / "checkpoints", named, optimizer, None)
    assert state["step"] == 10_000_000


def test_fp16_on_the_cpu_records_the_fp32_it_ran_and_the_same_command_resumes(tmp_path, caplog):
    """The bug (a review's): --mixed-precision fp16 on the CPU trained in fp32 but its checkpoints recorded fp16."""
    if torch.cuda.is_available():
        pytest.skip("fp16 runs on the GPU")
    with caplog.at_level("WARNING", logger="diffrt.train.loop"):
        train_linear(linear_config(tmp_path, max_steps=2, mixed_precision="fp16"))
    assert caplog.text.count("--mixed-precision fp16 needs a GPU") == 1
    state = json.loads((tmp_path / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["config"]["mixed_precision"] == "no"
    result, _ = train_linear(linear_config(tmp_path, max_steps=4, mixed_precision="fp16", resume=True))
    assert result.start_step == 2
