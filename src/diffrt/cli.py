"""The `diffrt` command. Thin: parse arguments, call one library function, report.

A user error (`DiffrtError`: missing file, bad value, unavailable backend) prints one line
saying what is wrong and how to fix it and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from diffrt import __version__
from diffrt.errors import DiffrtError

EXIT_USAGE = 2


def _add_train_options(p: argparse.ArgumentParser, out_default: str, steps: int, batch: int, lr: float) -> None:
    p.add_argument("--out", default=out_default, help="output folder (model, checkpoints, samples, logs)")
    p.add_argument("--max-steps", type=int, default=steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=batch)
    p.add_argument("--learning-rate", type=float, default=lr)
    p.add_argument("--lr-warmup-steps", type=int, default=100)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the weights (0 disables)")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--sample-every", type=int, default=0, help="write a sample grid every N steps (0: at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")


def _train_config(args):
    from diffrt.train.loop import TrainConfig

    return TrainConfig(
        out=args.out, max_steps=args.max_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        lr_warmup_steps=args.lr_warmup_steps, lr_schedule=args.lr_schedule,
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, ema_decay=args.ema_decay,
        checkpoint_every=args.checkpoint_every, sample_every=args.sample_every, seed=args.seed, resume=args.resume,
    )


def _cmd_train_class_cond(args) -> int:
    from diffrt.train.classcond import ClassCondConfig, train_class_conditioned

    cfg = ClassCondConfig(data=args.data, conditioning=args.conditioning, sample_size=args.resolution,
                          widths=tuple(args.widths), label_dropout=args.label_dropout, num_classes=args.num_classes,
                          train=_train_config(args))
    result = train_class_conditioned(cfg)
    print(f"trained {result.steps} steps ({result.samples_per_second:.1f} samples/s); model: {Path(args.out) / 'model'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffrt", description="Train diffusion models in PyTorch, export them to ONNX/TensorRT, and run a guided DDIM loop.")
    parser.add_argument("--version", action="version", version=f"diffrt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # train
    train = sub.add_parser("train", help="train or fine-tune a model in PyTorch")
    tsub = train.add_subparsers(dest="trainer", metavar="TRAINER")
    cc = tsub.add_parser("class-cond", help="train a class-conditioned pixel UNet (classifier-free guidance ready)")
    cc.add_argument("--data", default="digits", help="a folder with one sub-folder per class, or 'digits' (bundled)")
    cc.add_argument("--conditioning", choices=["class_embedding", "class_channels"], default="class_embedding",
                    help="label embedding added to the timestep embedding, or fed as extra input channels")
    cc.add_argument("--resolution", type=int, default=16)
    cc.add_argument("--widths", type=int, nargs="+", default=[32, 64, 64], help="UNet block widths")
    cc.add_argument("--label-dropout", type=float, default=0.1, help="probability of the null label (for CFG)")
    cc.add_argument("--num-classes", type=int, default=None, help="expected class count (checked against the data)")
    _add_train_options(cc, "runs/class-cond", steps=2000, batch=64, lr=1e-3)
    cc.set_defaults(func=_cmd_train_class_cond)
    train.set_defaults(func=lambda a: _missing_sub(train))
    return parser


def _missing_sub(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except DiffrtError as exc:
        print(f"diffrt: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("diffrt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
