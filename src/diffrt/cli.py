"""The `diffrt` command. Thin: parse arguments, call one library function, report.

A user error (`DiffrtError`: missing file, bad value, unavailable backend) prints one line
saying what is wrong and how to fix it and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from diffrt import __version__
from diffrt.errors import DiffrtError, TrainingInterrupted

EXIT_USAGE = 2
EXIT_FAILURE = 1  # the system refused a read or write


def _add_train_options(p: argparse.ArgumentParser, trainer: str) -> None:
    """The options every trainer shares, their defaults read from the trainer's Python defaults (train.config's
    trainer_defaults), so that the command and a config made in Python train alike."""
    from diffrt.train.config import trainer_defaults  # imports no torch: --help stays quick

    d = trainer_defaults(trainer)
    p.add_argument("--out", default=d.out, help="output folder (model, checkpoints, samples, logs)")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per optimizer step and process")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, help="AdamW's peak learning rate")
    p.add_argument("--lr-warmup-steps", type=int, default=d.lr_warmup_steps, help="steps of linear warm-up to --learning-rate")
    p.add_argument("--lr-schedule", choices=["constant", "linear", "cosine"], default=d.lr_schedule,
                   help="after the warm-up: constant, or a linear or cosine decay to 0 at --max-steps")
    p.add_argument("--scale-lr", action="store_true",
                   help="take --learning-rate per image: the schedule peaks at it times batch size x accumulation x processes")
    p.add_argument("--adam-weight-decay", type=float, default=d.weight_decay, help="AdamW's decoupled weight decay")
    p.add_argument("--adam-beta1", type=float, default=d.adam_beta1, help="AdamW's first-moment decay")
    p.add_argument("--adam-beta2", type=float, default=d.adam_beta2, help="AdamW's second-moment decay")
    p.add_argument("--adam-epsilon", type=float, default=d.adam_epsilon, help="AdamW's denominator epsilon")
    p.add_argument("--snr-gamma", type=float, default=d.snr_gamma, metavar="GAMMA",
                   help="Min-SNR loss weighting, capping each timestep's weight at GAMMA (the paper's 5.0; default off)")
    p.add_argument("--noise-offset", type=float, default=d.noise_offset,
                   help="offset noise: add this times a per-channel normal draw to the noise, so that very dark or bright "
                        "images can be learnt (0.05-0.1 are usual; default 0: off)")
    p.add_argument("--gradient-accumulation-steps", type=int, default=d.gradient_accumulation_steps,
                   help="micro-batches of --batch-size whose gradients make one step (the loss divided by their count)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: accelerate's (ACCELERATE_MIXED_PRECISION, which `accelerate launch` exports from its "
                        "--mixed_precision or `accelerate config`'s file), else no")
    p.add_argument("--allow-tf32", action="store_true",
                   help="GPU: fp32 matmuls in TF32 (Ampere and later; faster, ~fp16 mantissa); process-wide, as diffusers' flag")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass: less memory, slower")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="clip the gradient's norm to this (0: no clipping)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA of the weights (0 disables)")
    p.add_argument("--ema-power", type=float, default=d.ema_power,
                   help="EMA warm-up as diffusers' EMAModel(use_ema_warmup=True): 1 - (1 + (n - 1) / inv_gamma) ^ -power at update n "
                        "(train_unconditional.py: 0.75); default 0: min(decay, (1 + n) / (10 + n))")
    p.add_argument("--ema-inv-gamma", type=float, default=d.ema_inv_gamma, help="the EMA power warm-up's inverse gamma")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="save a checkpoint every N steps (and after the last)")
    p.add_argument("--checkpoints-total-limit", type=int, default=d.checkpoints_total_limit, metavar="N",
                   help="keep only the newest N complete checkpoints, removing older ones after each save (default: keep all)")
    p.add_argument("--sample-every", type=int, default=d.sample_every, help="write a sample grid every N steps (0: at the end)")
    p.add_argument("--log-every", type=int, default=d.log_every, help="log the mean loss of every N steps to loss.csv and TensorBoard")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the initial weights and every step's draws")
    p.add_argument("--resume", nargs="?", const=True, default=d.resume, type=_resume_value, metavar="auto",
                   help="continue from the newest complete checkpoint in --out; `--resume auto`: where --out holds none "
                        "yet, start a new run (one command line for every attempt of a job that may be requeued)")


def _resume_value(value: str) -> str:
    if value != "auto":
        raise argparse.ArgumentTypeError(f"takes no value, or auto; got {value!r}")
    return value


def _mixed_precision(given: str | None) -> str:
    """--mixed-precision, else accelerate's setting as diffusers' scripts take it (their flag defaults to None):
    a run under `accelerate launch --mixed_precision bf16` trained in fp32, with an fp32 base, without a word."""
    if given is not None:
        return given
    env = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if env not in ("no", "fp16", "bf16"):
        raise DiffrtError(f"ACCELERATE_MIXED_PRECISION is {env!r}; diffrt trains in no, fp16 or bf16: pass --mixed-precision")
    if env != "no":
        logging.getLogger(__name__).info("mixed precision %s, from accelerate's setting (ACCELERATE_MIXED_PRECISION)", env)
    return env


def _train_config(args):
    from diffrt.train.config import TrainConfig

    return TrainConfig(
        out=args.out, max_steps=args.max_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        lr_warmup_steps=args.lr_warmup_steps, lr_schedule=args.lr_schedule, scale_lr=args.scale_lr,
        weight_decay=args.adam_weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_epsilon=args.adam_epsilon,
        snr_gamma=args.snr_gamma, noise_offset=args.noise_offset,
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=_mixed_precision(args.mixed_precision),
        allow_tf32=args.allow_tf32,
        gradient_checkpointing=args.gradient_checkpointing, ema_decay=args.ema_decay, ema_power=args.ema_power,
        ema_inv_gamma=args.ema_inv_gamma, max_grad_norm=args.max_grad_norm,
        checkpoint_every=args.checkpoint_every, checkpoints_total_limit=args.checkpoints_total_limit,
        sample_every=args.sample_every, log_every=args.log_every, seed=args.seed, resume=args.resume,
    )


def _trained(result, saved: Path) -> str:
    """The closing line of a training run: the steps this run took (a --resume from step S ran S+1 on), and what it saved."""
    ran = result.steps - result.start_step
    if ran == 0:
        return f"nothing to train: the checkpoint is at step {result.steps}, the --max-steps; saved {saved} from it"
    resumed = f" (steps {result.start_step + 1}-{result.steps}, resumed)" if result.start_step else ""
    return f"trained {ran} step{'s' if ran != 1 else ''}{resumed}, {result.samples_per_second:.1f} samples/s; saved {saved}"


def _cmd_train_class_cond(args) -> int:
    from diffrt.train.classcond import ClassCondConfig, train_class_conditioned

    cfg = ClassCondConfig(data=args.data, conditioning=args.conditioning, sample_size=args.resolution,
                          widths=tuple(args.widths), label_dropout=args.label_dropout, num_classes=args.num_classes,
                          crop=args.crop, random_flip=args.random_flip, prediction_type=args.prediction_type,
                          beta_schedule=args.beta_schedule, train=_train_config(args))
    result = train_class_conditioned(cfg)
    print(_trained(result, Path(args.out) / 'model'))
    return 0


def _cmd_train_finetune(args) -> int:
    from diffrt.train.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(model=args.model, data=args.data, crop=args.crop, random_flip=args.random_flip,
                         label_dropout=args.label_dropout, train=_train_config(args))
    result = finetune(cfg)
    print(_trained(result, Path(args.out) / 'model'))
    return 0


def _cmd_train_dreambooth_lora(args) -> int:
    from diffrt.train.dreambooth import LORA_WEIGHT_NAME, TEXT_ENCODER_TARGETS, DreamBoothConfig, train_dreambooth_lora

    cfg = DreamBoothConfig(
        model=args.model, instance_data=args.instance_data, instance_prompt=args.instance_prompt,
        class_prompt=args.class_prompt, with_prior_preservation=args.with_prior_preservation, class_data=args.class_data,
        num_class_images=args.num_class_images, prior_loss_weight=args.prior_loss_weight, rank=args.rank,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=tuple(args.target_modules),
        train_text_encoder=args.train_text_encoder, sample_batch_size=args.sample_batch_size,
        text_encoder_target_modules=tuple(args.text_encoder_target_modules or TEXT_ENCODER_TARGETS),
        resolution=args.resolution, crop=args.crop, random_flip=args.random_flip, validation_prompt=args.validation_prompt,
        num_validation_images=args.num_validation_images, inference_steps=args.inference_steps,
        class_inference_steps=args.class_inference_steps,
        guidance_scale=args.guidance_scale, train=_train_config(args),
    )
    result = train_dreambooth_lora(cfg)
    print(_trained(result, Path(args.out) / LORA_WEIGHT_NAME))
    return 0


def _loras(args) -> list[tuple[str, float]]:
    """--lora FILE[:SCALE] arguments as (path, scale) pairs, parsed the one way LoRA specs are."""
    from diffrt.export.lora import LoraSpec

    specs = [LoraSpec.parse(text) for text in args.lora]
    return [(str(spec.path), spec.scale) for spec in specs]


def _cmd_export(args) -> int:
    from diffrt.export.artifact import export_model
    from diffrt.export.options import ExportOptions, parse_range

    options = ExportOptions(
        backend=args.backend, precision=args.precision, batch=parse_range(args.batch, "batch"),
        height=parse_range(args.height, "height") if args.height else None,
        width=parse_range(args.width, "width") if args.width else None,
        opset=args.opset, exporter=args.exporter, loras=_loras(args), verify=not args.no_verify, vae_encoder=args.vae_encoder,
        workspace_gb=args.workspace_gb,
    )
    result = export_model(args.model, args.out, options, controlnets=args.controlnet)
    state = "cache hit, nothing rebuilt" if result.cache_hit else f"exported in {result.seconds:.1f} s"
    print(f"{result.folder}: {state}")
    for name, comp in result.manifest["components"].items():
        checks = [f"{backend}: max rel err {p['max_rel']:.1e}, cosine {p['cosine']:.6f}"
                  for backend, p in comp.get("parity", {}).items()]
        print(f"  {name:<16} {comp['bytes'] / 1e6:8.2f} MB   {'; '.join(checks) or 'not verified'}")
    return 0


def _cmd_refit(args) -> int:
    from diffrt.export.refit import refit_artifact

    report = refit_artifact(args.artifact, _loras(args))
    for name, comp in report["components"].items():
        print(f"{name}: {comp['patched']} weights patched, {comp['set']} set from base; engine sha256 {comp['sha256'][:12]}")
    return 0


def _guidance_scale(args, term: str, target: str) -> float:
    """--color-scale / --clip-scale: refused without its term's target (the images would come out unguided with no
    word of why), GenerateRequest's default when not given."""
    from diffrt.generate import GenerateRequest

    scale = getattr(args, f"{term}_scale")
    if scale is not None and getattr(args, "color" if term == "color" else "clip_prompt") is None:
        raise DiffrtError(f"--{term}-scale {scale:g} sets the strength of {term} guidance, and none is asked; give {target}, "
                          f"or leave --{term}-scale out")
    return getattr(GenerateRequest, f"{term}_scale") if scale is None else scale


def _cmd_generate(args) -> int:
    from diffrt.generate import GenerateRequest, generate_to_file, result_summary, result_warnings

    request = GenerateRequest(
        model=args.model, backend=args.backend, seed=args.seed, num_inference_steps=args.steps, out=args.out,
        prompt=args.prompt, negative_prompt=args.negative_prompt, guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale,
        height=args.height, width=args.width, num_images=args.num_images, eta=args.eta, scheduler=args.scheduler, class_label=args.class_label,
        controlnet=args.controlnet, control_image=args.control_image, control_scale=args.control_scale,
        control_guidance_start=args.control_guidance_start, control_guidance_end=args.control_guidance_end, clip_skip=args.clip_skip,
        guess_mode=args.guess_mode,
        image=args.image, strength=args.strength,
        loras=_loras(args), lora_scale=args.lora_scale, color=args.color, color_scale=_guidance_scale(args, "color", "--color HEX"),
        clip_prompt=args.clip_prompt, clip_model=args.clip_model, clip_scale=_guidance_scale(args, "clip", "--clip-prompt TEXT"),
        guidance_mode=args.guidance_mode, device=args.device, strict=args.strict, cuda_graph=args.cuda_graph, progress=True,
    )
    result, path = generate_to_file(request)
    print(result_summary(result, path))
    for warning in result_warnings(result):
        print(f"diffrt: warning: {warning}", file=sys.stderr)
    return 0


def _cmd_demo(args) -> int:
    ui_only = [flag for flag, value, default in (("--host", args.host, "127.0.0.1"), ("--port", args.port, 7860)) if value != default]
    if args.ui and args.out != "demo.png":
        raise DiffrtError("--out is where `diffrt demo` writes its grid; the Gradio demo (--ui) writes no file: leave --out out")
    if not args.ui and ui_only:
        raise DiffrtError(f"{ui_only[0]} sets where the Gradio demo listens; add --ui (`diffrt demo` without it writes a grid to --out)")
    if args.ui:
        from diffrt.runtime.loading import default_backend
        from diffrt.serve.ui import launch_ui

        backend = args.backend or default_backend(args.model, exported=True)
        launch_ui(host=args.host, port=args.port, model=args.model, backend=backend, controlnet=args.controlnet, loras=_loras(args))
        return 0
    if args.model or args.controlnet or args.lora:
        raise DiffrtError("--model, --controlnet and --lora choose the model of the Gradio demo; add --ui "
                          "(`diffrt demo` without it samples the shipped digits model)")
    from diffrt.demo import format_table, run_demo

    path, timings, max_diff = run_demo(args.out, backend=args.backend)
    print(f"wrote {path.resolve()}: one row per digit 0-9, one column per guidance colour")
    print(format_table(timings))
    print(f"max |exported - eager| on the images: {max_diff:.2e}")
    return 0


def _cmd_bench(args) -> int:
    from diffrt.bench import run_bench

    if args.list:
        from diffrt.bench.configs import CONFIGS

        width = max(map(len, CONFIGS))
        for name, config in CONFIGS.items():
            print(f"{name:{width}}  {'GPU  ' if config.gpu_only else 'any  '}{config.description}")
        return 0
    paths = run_bench(out_dir=args.out, backends=args.backend, repeats=args.repeats, configs=args.config)
    for p in paths:
        print(f"wrote {p}")
    return 0


def _cmd_serve(args) -> int:
    from diffrt.serve.app import ServeConfig, serve

    serve(ServeConfig(model=args.model, controlnet=args.controlnet, loras=_loras(args), backend=args.backend, host=args.host, port=args.port,
                      api_key_env=args.api_key_env, max_batch_size=args.max_batch_size,
                      max_queue=args.max_queue, batch_wait_ms=args.batch_wait_ms, timeout_s=args.timeout,
                      max_image_side=args.max_image_side, body_timeout_s=args.body_timeout, max_connections=args.max_connections,
                      allowed_hosts=tuple(args.allowed_host) or None, allowed_origins=tuple(args.allowed_origin),
                      device=args.device, strict=args.strict, cuda_graph=args.cuda_graph, exact_batching=args.exact_batching))
    return 0


def _cmd_triton_repo(args) -> int:
    from diffrt.serve.triton_repo import RepositoryConfig, write_repository

    path = write_repository(args.out, RepositoryConfig(
        model=args.model, backend=args.backend, name=args.name, device=args.device, instances=args.instances,
        max_batch_size=args.max_batch_size, queue_delay_ms=args.queue_delay_ms, max_queue=args.max_queue, timeout_s=args.timeout,
        max_image_side=args.max_image_side, exact_batching=args.exact_batching, strict=args.strict, cuda_graph=args.cuda_graph,
        link=args.link))
    print(f"wrote {path}; serve it with: tritonserver --model-repository {Path(args.out).resolve()}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a malformed command line is one line too, as every user error is
    (README): what is wrong and where the options are listed, instead of the whole usage block."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


class _CommandParser(_Parser):
    """A command's parser (and its subcommands', which argparse makes of the same class): it takes -v too, so that
    `diffrt train class-cond ... -v` works as `diffrt -v train ...` does, and as error lines that end "(-v shows where)"
    suggest. Unset, it leaves the value given before the command as it was (SUPPRESS adds no default)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at debug level")


def _port(text: str) -> int:
    """A TCP port: 0 (any free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0-65535; 0 picks a free one)")
    return port


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help that gives each option's default where its own text does not (the trainers' differ: learning rate,
    steps, batch size); none for a flag, nor for an option left unset by default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and text is not argparse.SUPPRESS and "default" not in text
                and default is not None and default is not False and default is not argparse.SUPPRESS
                and default != [] and not (isinstance(action, argparse._StoreFalseAction) and default is True)):
            text += (" " if text else "") + "(default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffrt", description="Train diffusion models in PyTorch, export them to ONNX/TensorRT, and run a guided DDIM loop.")
    parser.add_argument("--version", action="version", version=f"diffrt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)

    # train
    train = sub.add_parser("train", help="train or fine-tune a model in PyTorch")
    tsub = train.add_subparsers(dest="trainer", metavar="TRAINER")
    cc = tsub.add_parser("class-cond", help="train a class-conditioned pixel UNet (classifier-free guidance ready)",
                          formatter_class=DefaultsHelpFormatter)
    cc.add_argument("--data", default="digits", help="a folder with one sub-folder per class, or 'digits' (bundled)")
    cc.add_argument("--conditioning", choices=["class_embedding", "class_channels"], default="class_embedding",
                    help="label embedding added to the timestep embedding, or fed as extra input channels")
    cc.add_argument("--resolution", type=int, default=16, help="image side in pixels")
    cc.add_argument("--widths", type=int, nargs="+", default=[32, 64, 64], help="UNet block widths")
    cc.add_argument("--label-dropout", type=float, default=0.1, help="probability of the null label (for CFG)")
    cc.add_argument("--num-classes", type=int, default=None, help="expected class count (checked against the data)")
    cc.add_argument("--crop", choices=["center", "random"], default="center", help="class folders: crop after resizing the short side")
    cc.add_argument("--random-flip", action="store_true", help="class folders: flip images horizontally at random")
    cc.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"], default="epsilon",
                    help="what the UNet learns to predict: the noise, v (Salimans & Ho) or the clean image")
    cc.add_argument("--beta-schedule", choices=["linear", "scaled_linear", "squaredcos_cap_v2"], default="linear",
                    help="the noise schedule's betas over 1000 steps (squaredcos_cap_v2: Nichol & Dhariwal's cosine)")
    _add_train_options(cc, "class-cond")
    cc.set_defaults(parser=cc, func=_cmd_train_class_cond)
    ft = tsub.add_parser("finetune", help="fine-tune a pretrained UNet2DModel (diffusers folder) on new images",
                          formatter_class=DefaultsHelpFormatter)
    ft.add_argument("--model", required=True, help="diffusers pipeline folder (unet/ + scheduler/), UNet2DModel folder, or Hub id org/name[@rev]")
    ft.add_argument("--data", required=True, help="a folder of images (any size), or a bundled set: 'digits', 'chelsea' (four crops of scikit-image's cat); "
                    "one sub-folder per class for a class-conditioned model")
    ft.add_argument("--crop", choices=["center", "random"], default="center", help="crop after resizing the short side")
    ft.add_argument("--random-flip", action="store_true", help="flip images horizontally at random")
    ft.add_argument("--label-dropout", type=float, default=0.1, help="class-conditioned models: probability of the null label")
    _add_train_options(ft, "finetune")
    ft.set_defaults(parser=ft, func=_cmd_train_finetune)
    db = tsub.add_parser("dreambooth-lora", help="DreamBooth with LoRA (peft) on a text-to-image pipeline folder",
                          formatter_class=DefaultsHelpFormatter)
    db.add_argument("--model", required=True, help="Stable Diffusion pipeline folder (unet, vae, text_encoder, tokenizer, scheduler) or Hub id")
    db.add_argument("--instance-data", required=True,
                    help="folder with a few images of the subject, or 'chelsea' (bundled: four crops of scikit-image's cat)")
    db.add_argument("--instance-prompt", required=True, help="prompt naming the subject, e.g. 'a photo of sks cat'")
    db.add_argument("--class-prompt", default=None, help="prompt for the subject's class, e.g. 'a photo of a cat'")
    db.add_argument("--with-prior-preservation", action="store_true", help="train on class images too (prior-preservation loss)")
    db.add_argument("--class-data", default=None, help="folder of class images; filled up by the base model (default: OUT/class_images)")
    db.add_argument("--num-class-images", type=int, default=100, help="class images for prior preservation (made by the base model if fewer)")
    db.add_argument("--prior-loss-weight", type=float, default=1.0, help="weight of the class images' loss")
    db.add_argument("--rank", type=int, default=4, help="LoRA rank")
    db.add_argument("--lora-alpha", type=float, default=None,
                    help="LoRA alpha (default: the rank, i.e. scaling 1); another value is in the file's metadata, which "
                         "diffusers' load_lora_weights reads (tools that ignore it apply scaling 1)")
    db.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA layers' input (peft's lora_dropout)")
    db.add_argument("--target-modules", nargs="+", default=["to_q", "to_k", "to_v", "to_out.0"], help="UNet modules to adapt")
    db.add_argument("--train-text-encoder", action="store_true", help="also train a LoRA on the CLIP text encoder")
    db.add_argument("--text-encoder-target-modules", nargs="+", default=None,
                    help="text-encoder modules to adapt with --train-text-encoder (default: q_proj k_proj v_proj out_proj)")
    db.add_argument("--resolution", type=int, default=None, help="training image size in pixels (default: the model's own, 512 for SD-1.5)")
    db.add_argument("--crop", choices=["center", "random"], default="center",
                    help="crop after resizing the short side (diffusers' script crops at random unless --center_crop)")
    db.add_argument("--random-flip", action="store_true", help="flip images horizontally at random")
    db.add_argument("--validation-prompt", default=None, help="prompt for validation images (default: the instance prompt)")
    db.add_argument("--validation-every", type=int, dest="sample_every", default=argparse.SUPPRESS, metavar="N",
                    help="write a grid of validation images every N steps (same as --sample-every)")
    db.add_argument("--num-validation-images", type=int, default=4, help="validation images per grid")
    db.add_argument("--inference-steps", type=int, default=25, help="DDIM steps for validation images")
    db.add_argument("--class-inference-steps", type=int, default=50,
                    help="steps of the model's own scheduler for class images, made at its own size as diffusers' script makes them")
    db.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale for validation and class images")
    db.add_argument("--sample-batch-size", type=int, default=4, help="class images generated per batch")
    # diffusers' DreamBooth-LoRA recipe (its README): learning rate 1e-4, constant, no warm-up.
    _add_train_options(db, "dreambooth-lora")
    db.set_defaults(parser=db, func=_cmd_train_dreambooth_lora)
    train.set_defaults(parser=train, func=lambda a: _missing_sub(train))

    # export
    ex = sub.add_parser("export", help="export a model (+ LoRA) to ONNX / TensorRT with a manifest and parity report",
                        formatter_class=DefaultsHelpFormatter)
    ex.add_argument("--model", default=None, help="diffusers folder or Hub id org/name[@rev] (default: the shipped digits model)")
    ex.add_argument("--out", required=True, help="artifact folder to write")
    ex.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                    help="LoRA at a scale (repeatable): fused into the ONNX weights; with tensorrt, refit into the engines")
    ex.add_argument("--controlnet", action="append", default=[], metavar="DIR",
                    help="ControlNet folder (repeatable: fused with the UNet in the order given, as diffusers' MultiControlNetModel)")
    ex.add_argument("--backend", choices=["onnx", "tensorrt"], default="onnx",
                    help="onnx: ONNX files for ONNX Runtime; tensorrt: those and TensorRT engines")
    ex.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                    help="weights and activations (the VAE stays fp32 where its config asks; bf16: TensorRT only)")
    ex.add_argument("--batch", default="1:8:64", metavar="MIN:OPT:MAX", help="UNet batch range (CFG doubles the image count; the VAE's range starts at half MIN, the text encoder's at 1)")
    ex.add_argument("--height", default=None, metavar="MIN:OPT:MAX",
                    help="image height range in pixels, or one number for a fixed height (default: around the model's own size)")
    ex.add_argument("--width", default=None, metavar="MIN:OPT:MAX", help="image width range in pixels (default: --height's)")
    ex.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17 with torchscript, 18 with dynamo)")
    ex.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                    help="torch.onnx's TorchScript tracer (quick; deprecated by PyTorch) or its torch.export-based exporter")
    ex.add_argument("--vae-encoder", action="store_true",
                    help="text-to-image: also export the VAE encoder, so image-to-image runs on the backend (else it encodes in PyTorch)")
    ex.add_argument("--workspace-gb", type=float, default=None, metavar="GIB",
                    help="tensorrt: cap the builder's scratch memory (default: 3/4 of the GPU memory free at the start)")
    ex.add_argument("--no-verify", action="store_true", help="skip the parity check against PyTorch")
    ex.set_defaults(parser=ex, func=_cmd_export)

    # refit
    rf = sub.add_parser("refit", help="swap LoRA weights into an artifact's TensorRT engines from its base weights (no rebuild)",
                        formatter_class=DefaultsHelpFormatter)
    rf.add_argument("artifact", help="artifact folder from `diffrt export --backend tensorrt`")
    rf.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="repeatable; none restores the base weights")
    rf.set_defaults(parser=rf, func=_cmd_refit)

    # generate
    ge = sub.add_parser("generate", help="generate images with the guided DDIM (or LCM, DPM-Solver++, Euler, Euler Ancestral) loop",
                        formatter_class=DefaultsHelpFormatter)
    ge.add_argument("--model", default=None, help="diffusers or artifact folder, or Hub id org/name[@rev] (default: the shipped digits model)")
    ge.add_argument("--backend", default=None,
                    help="torch, torch-compile, onnxruntime or tensorrt (default: the fastest installed for an artifact, else torch)")
    ge.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available; tensorrt needs cuda)")
    ge.add_argument("--strict", action="store_true",
                    help="make any fallback an error (an ONNX Runtime provider that did not start, PyTorch weights for an artifact)")
    ge.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                    help="tensorrt: launch each step normally instead of replaying a captured CUDA graph")
    ge.add_argument("--seed", type=int, default=0, help="seed of the starting noise (and of eta's noise)")
    ge.add_argument("--steps", type=int, default=25, help="denoising steps (num_inference_steps)")
    ge.add_argument("--scheduler", choices=["ddim", "lcm", "dpm", "euler", "euler_a"], default=None,
                    help="sampler (default: the model's own, the one its scheduler config names: LCMScheduler, "
                         "DPMSolverMultistepScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler); dpm: "
                         "DPM-Solver++(2M), 20-25 steps; euler / euler_a: Euler / Euler Ancestral (A1111's 'Euler a'), 20-30 steps; "
                         "LCM-LoRA: --lora LCM_LORA --scheduler lcm --steps 4 (guidance scale 1 by default with LCM)")
    ge.add_argument("--out", default="out.png", help="PNG grid, or .npy (float32 N x H x W x C in [0, 1])")
    ge.add_argument("--prompt", default=None, help="text-to-image models: what to draw")
    ge.add_argument("--negative-prompt", default=None, help="text-to-image models: what to steer away from")
    ge.add_argument("--guidance-scale", type=float, default=None,
                    help="classifier-free guidance scale (default: 2.0 on class-conditioned pixel models, 7.5 on "
                         "text-to-image ones as diffusers, 1 with LCM on a plain UNet)")
    ge.add_argument("--guidance-rescale", type=float, default=0.0,
                    help="text-to-image: diffusers' guidance_rescale in [0, 1] (0.7 tames over-exposure at high CFG)")
    ge.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's own size)")
    ge.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's own size)")
    ge.add_argument("--num-images", type=int, default=None,
                    help="images to draw (default: 1, or one per class on a class-conditioned model without --class-label)")
    ge.add_argument("--eta", type=float, default=0.0, help="DDIM's eta: 0 is deterministic, 1 is DDPM's noise")
    ge.add_argument("--class-label", default=None,
                    help="class-conditioned models: the class's number, or its name (a class folder's name)")
    ge.add_argument("--controlnet", action="append", default=[], metavar="DIR",
                    help="ControlNet folder (repeatable: several run together, as diffusers' MultiControlNetModel)")
    ge.add_argument("--control-image", action="append", default=[], metavar="FILE",
                    help="conditioning image (repeatable: one per ControlNet, in the same order)")
    ge.add_argument("--control-scale", action="append", type=float, default=[], metavar="F",
                    help="ControlNet conditioning scale (repeatable: one per ControlNet, or one for all; default 1.0, 0.8 with --image as diffusers)")
    ge.add_argument("--control-guidance-start", action="append", type=float, default=[], metavar="F",
                    help="fraction of the steps at which a ControlNet starts (repeatable: one per ControlNet, or one for all; default 0)")
    ge.add_argument("--control-guidance-end", action="append", type=float, default=[], metavar="F",
                    help="fraction of the steps at which a ControlNet stops (repeatable as --control-guidance-start; default 1)")
    ge.add_argument("--guess-mode", action="store_true",
                    help="diffusers' ControlNet guess mode: the ControlNets see the prompt's half of the CFG batch only, "
                         "their residuals weighted from 0.1 (shallowest) to 1 (mid block)")
    ge.add_argument("--clip-skip", type=int, default=None, metavar="N",
                    help="encode the prompt with the text encoder's layer N before the last, as diffusers' clip_skip (default 0)")
    ge.add_argument("--image", default=None, metavar="FILE", help="image-to-image: start from this image (text-to-image models)")
    ge.add_argument("--strength", type=float, help="image-to-image (with --image): share of the schedule that runs (default 0.8)")
    ge.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                    help="LoRA fused at open, at a scale (repeatable; default scale 1)")
    ge.add_argument("--lora-scale", type=float, default=1.0, metavar="F",
                    help="run the LoRA (--lora, or the artifact's) at F times its scale: 0 is the base model; "
                         "TensorRT engines are refit in memory, ONNX graphs with LoRA baked in take 1.0 only")
    ge.add_argument("--color", default=None, metavar="HEX", help="colour guidance target, e.g. #ff8800")
    ge.add_argument("--color-scale", type=float, default=None, metavar="F", help="strength of the colour guidance (default: 3.0)")
    ge.add_argument("--clip-prompt", default=None, help="CLIP guidance toward this text")
    ge.add_argument("--clip-model", default=None, metavar="DIR", help="local CLIPModel folder for CLIP guidance")
    ge.add_argument("--clip-scale", type=float, default=None, metavar="F", help="strength of the CLIP guidance (default: 10.0)")
    ge.add_argument("--guidance-mode", choices=["x0", "through_unet"], default="x0",
                    help="gradient guidance from the predicted x0 alone (cheap), or back through the UNet in PyTorch")
    ge.set_defaults(parser=ge, func=_cmd_generate)

    # bench
    be = sub.add_parser("bench", help="latency per component and end to end, per backend, vs eager PyTorch",
                        formatter_class=DefaultsHelpFormatter)
    be.add_argument("--out", default="benchmarks/results", help="folder for the JSON, markdown table and PNG chart, relative to the current folder: bench_<machine>.*, "
                    "and for a run of chosen --config/--backend names, bench_<machine>_<names>.*")
    be.add_argument("--backend", action="append", default=None, help="backends to measure (default: all present)")
    be.add_argument("--config", action="append", default=None, help="configurations, repeatable (--list names them; default: those for this machine)")
    be.add_argument("--list", action="store_true", help="list the configurations and exit")
    be.add_argument("--repeats", type=int, default=None,
                    help="timed rounds per cell, every one run (default 5, or 3 for a cell past 20 s on a CPU, 60 s on "
                         "CUDA); a cell whose runs take under 3 s in all runs more rounds, up to 30, so that a short run "
                         "is not judged on a few samples")
    be.set_defaults(parser=be, func=_cmd_bench)

    # serve
    se = sub.add_parser("serve", help="HTTP service over the runtime (FastAPI)",
                        formatter_class=DefaultsHelpFormatter)
    se.add_argument("--model", default=None, help="diffusers or artifact folder, or Hub id org/name[@rev] (default: the shipped digits model)")
    se.add_argument("--controlnet", action="append", default=None, metavar="DIR",
                    help="ControlNet folder for a text-to-image diffusers folder, repeatable for several "
                         "(an exported artifact carries its own)")
    se.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                    help="LoRA to run (repeatable); a request's lora_scale multiplies its scale (torch, refittable TensorRT)")
    se.add_argument("--backend", default="onnxruntime", help="torch, torch-compile, onnxruntime or tensorrt")
    se.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available; tensorrt needs cuda)")
    se.add_argument("--strict", action="store_true",
                    help="refuse to start on any fallback (an ONNX Runtime provider that did not start, PyTorch weights for an artifact)")
    se.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                    help="tensorrt: launch each step normally instead of replaying captured CUDA graphs")
    se.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told otherwise)")
    se.add_argument("--port", type=_port, default=8000, help="TCP port (0: a free one)")
    se.add_argument("--api-key-env", default="DIFFRT_API_KEY", help="environment variable holding the API key (unset: no key)")
    se.add_argument("--max-batch-size", type=int, default=8, help="images per UNet batch (the engine's profile may allow fewer)")
    se.add_argument("--allow-inexact-batching", dest="exact_batching", action="store_false",
                    help="batch requests even on a backend whose batched images differ from solo ones in the last bit "
                         "(measured at start-up; by default such a backend runs requests one at a time)")
    se.add_argument("--max-queue", type=int, default=64, help="requests waiting at most (more are a 429)")
    se.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    se.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds")
    se.add_argument("--max-image-side", type=int, default=0, help="largest height or width a request may ask for, in pixels "
                    "(default: twice the model's own on eager PyTorch, 4096 on engines, whose built ranges bound them)")
    se.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request body has to arrive (408 after)")
    se.add_argument("--max-connections", type=int, default=None,
                    help="/v1 requests in flight at once, reading, queued or running (default: twice the queue's room)")
    se.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                    help="a Host name the service answers (repeatable; default: loopback's names when bound to loopback, "
                         "else any); behind a proxy that passes the public Host, name it here")
    se.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                    help="a web origin (https://app.example) whose pages may call the service (repeatable)")
    se.set_defaults(parser=se, func=_cmd_serve)

    # triton-repo
    tr = sub.add_parser("triton-repo", help="write a Triton Inference Server model repository that serves the model (KServe v2)",
                        formatter_class=DefaultsHelpFormatter)
    tr.add_argument("--model", default=None, help="artifact or diffusers folder, or Hub id (default: the shipped digits model)")
    tr.add_argument("--out", required=True, help="the model repository (created if missing; other models in it are left alone)")
    tr.add_argument("--name", default="diffrt", help="the model's name in the repository")
    tr.add_argument("--backend", default="onnxruntime", help="torch, torch-compile, onnxruntime or tensorrt")
    tr.add_argument("--device", default=None, choices=["cpu", "cuda"],
                    help="where the instances run: cuda (on each GPU of the serving machine) or cpu "
                         "(default: cuda for tensorrt or when this machine has a GPU)")
    tr.add_argument("--instances", type=int, default=1, help="model instances (per GPU with cuda), each with its own pipeline")
    tr.add_argument("--max-batch-size", type=int, default=8, help="requests Triton batches into one call, and images per UNet batch")
    tr.add_argument("--queue-delay-ms", type=float, default=10.0, help="how long Triton's dynamic batcher waits to fill a batch")
    tr.add_argument("--max-queue", type=int, default=64, help="requests waiting at most")
    tr.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds")
    tr.add_argument("--max-image-side", type=int, default=0, help="as diffrt serve's (0: its default)")
    tr.add_argument("--allow-inexact-batching", dest="exact_batching", action="store_false", help="as diffrt serve's")
    tr.add_argument("--strict", action="store_true", help="refuse to load on any fallback")
    tr.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", help="as diffrt serve's")
    tr.add_argument("--link", action="store_true",
                    help="name the model folder by its absolute path instead of placing it (hard links or a copy) in the repository")
    tr.set_defaults(parser=tr, func=_cmd_triton_repo)

    # demo
    de = sub.add_parser("demo", help="export the shipped digits model and sample a colour-guided grid (no download)",
                        formatter_class=DefaultsHelpFormatter)
    de.add_argument("--out", default="demo.png", help="the grid, a PNG")
    de.add_argument("--backend", default=None, help="exported backend (default: tensorrt with a GPU, else onnxruntime)")
    de.add_argument("--ui", action="store_true", help="start the Gradio demo instead")
    de.add_argument("--model", default=None, help="--ui: diffusers or artifact folder, or Hub id (default: the shipped digits model)")
    de.add_argument("--controlnet", action="append", default=None, metavar="DIR", help="--ui: ControlNet folder for a text-to-image model")
    de.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="--ui: LoRA to run; a LoRA scale slider with --backend torch (ONNX bakes it in)")
    de.add_argument("--host", default="127.0.0.1", help="--ui: bind address")
    de.add_argument("--port", type=_port, default=7860, help="--ui: TCP port")
    de.set_defaults(parser=de, func=_cmd_demo)
    return parser


def _missing_sub(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return EXIT_USAGE


def _resolve_hub_ids(args) -> None:
    """--model, --controlnet and --clip-model may name a Hub repository (org/name[@revision]): each
    becomes its snapshot folder in the Hugging Face cache, fetched if needed (hub.py)."""
    from diffrt.hub import resolve_model

    for name in ("model", "clip_model"):
        if getattr(args, name, None):
            setattr(args, name, str(resolve_model(getattr(args, name))))
    if getattr(args, "controlnet", None):
        args.controlnet = [str(resolve_model(c)) for c in args.controlnet]


class _AboveProgressBars(logging.StreamHandler):
    """The command's log lines, written above a progress bar (tqdm's `write`) rather than onto the end of its line.
    The command's own: a library user's logging stays as they set it up."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


PATH_ARGS = ("out", "model", "data", "instance_data", "class_data", "artifact", "controlnet", "image", "control_image", "lora")


def _empty_path(args: argparse.Namespace) -> str | None:
    """The first path argument given as an empty string, as its flag; else None."""
    for dest in PATH_ARGS:
        value = getattr(args, dest, None)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and not v.strip() for v in values):
            return dest if dest == "artifact" else f"--{dest.replace('_', '-')}"
    return None


def main(argv: list[str] | None = None) -> int:
    from safetensors import SafetensorError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command's own parser, whose --help lists its options (the top one's lists commands)
        (getattr(args, "parser", None) or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        handlers=[_AboveProgressBars(sys.stderr)])
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    empty = _empty_path(args)
    if empty:  # Path("") is the current folder: an unset `--out "$OUT"` would write (or read) the run where it stands
        (getattr(args, "parser", None) or parser).error(f"{empty} is empty (an unset shell variable?); give a path")
    try:
        _resolve_hub_ids(args)
        return int(args.func(args) or 0)
    except DiffrtError as exc:
        print(f"diffrt: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingInterrupted as exc:  # a clean stop, its checkpoint saved: 128 + the signal, as shells count it
        if not exc.quiet:  # a data-parallel run's other processes: the main one says it
            print(f"diffrt: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("diffrt: interrupted", file=sys.stderr)
        return 130
    except (OSError, SafetensorError) as exc:  # the machine's answer to a read or write (permission, disk full, a
        # read-only mount); safetensors reports a failed write (diffusers' save_pretrained) as its own error type
        if args.verbose:
            raise
        print(f"diffrt: error: {exc} (-v shows where)", file=sys.stderr)
        return EXIT_FAILURE


def entry() -> None:
    """The `diffrt` command: main's exit status, except that a run stopped by SIGINT or SIGTERM ends by that
    signal, once its line is printed. A shell tells a child that died of SIGINT from one that exited 130, and
    only the first ends the script or loop that ran it (bash's "wait and cooperative exit"): Ctrl-C on a script
    of several `diffrt train` runs stops the script, not just the run under way."""
    import signal

    status = main()
    if status - 128 in (signal.SIGINT, signal.SIGTERM):
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(status - 128, signal.SIG_DFL)
        os.kill(os.getpid(), status - 128)
    sys.exit(status)


if __name__ == "__main__":
    entry()
