"""`vdvae-dist` command line: train, config, params."""
from __future__ import annotations

import argparse
import json
import sys


def _config_args(p: argparse.ArgumentParser, default_preset: str | None) -> None:
    p.add_argument("--preset", default=default_preset, help="named preset (see `vdvae-dist params`)")
    p.add_argument("--config", help="TOML/YAML file applied after the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set optim.lr=2e-4 (repeatable)")


def _load(args):
    from .config import load

    return load(args.preset, args.config, args.overrides)


def cmd_train(args) -> int:
    from .train.local import train_local

    cfg = _load(args)
    summary = train_local(cfg, resume=not args.no_resume)
    print(f"test bits/dim: {summary['test_bits_per_dim']:.4f} "
          f"({summary['test_nats_per_image']:.2f} nats/image) after {summary['step']} steps, "
          f"{summary['skipped']} skipped")
    print(f"sample grid:   {summary['samples']}")
    print(f"checkpoint:    {summary['checkpoint']}")
    return 0


def cmd_config(args) -> int:
    from .config import dumps

    print(dumps(_load(args)))
    return 0


def cmd_params(args) -> int:
    import torch

    from .config import available_presets, load
    from .model import build_model, count_parameters

    for name in available_presets():
        with torch.device("meta"):  # shapes only: no memory, no init cost
            n = count_parameters(build_model(load(name).model))
        print(f"{name:14s} {n:>13,}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vdvae-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train on one device (CPU or one GPU)")
    _config_args(p, "mnist-small")
    p.add_argument("--no-resume", action="store_true", help="start over even if train.output has checkpoints")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("config", help="print the resolved config as JSON")
    _config_args(p, None)
    p.set_defaults(fn=cmd_config)
    p = sub.add_parser("params", help="parameter count of every preset")
    p.set_defaults(fn=cmd_params)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as e:  # bad user input: one clear line, no traceback
        print(f"vdvae-dist: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
