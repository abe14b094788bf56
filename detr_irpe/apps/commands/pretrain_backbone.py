"""detr-irpe pretrain-backbone: pretrain the tiny backbone on the training split's labels."""
from __future__ import annotations

from ...config import load_config, validate
from ...engine.pretrain import pretrain_backbone
from . import options


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="YAML config with model.backbone=tiny and the data.* keys")
    p.add_argument("--out", required=True, help="where the backbone state dict is written")
    p.add_argument("--iterations", type=int, help="train.pretrain_iterations (default: the config's, else 1000)")
    p.add_argument("--minutes", type=float, help="stop earlier once this much wall time has passed")
    p.add_argument("--batch-size", type=int, help="train.pretrain_batch_size (default: the config's)")
    p.add_argument("--lr", type=float, help="train.pretrain_lr, AdamW (default: the config's)")
    options.overwrite(p, "an existing --out file")
    options.overrides(p)


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    for key, value in (("iterations", args.iterations), ("batch_size", args.batch_size), ("lr", args.lr)):
        if value is not None:
            setattr(cfg.train, f"pretrain_{key}", value)
    cfg.train.pretrain_iterations = cfg.train.pretrain_iterations or 1000
    validate(cfg)
    result = pretrain_backbone(cfg, args.out, seconds=None if args.minutes is None else 60.0 * args.minutes,
                               overwrite=args.overwrite)
    print(f"{result.iterations} iterations in {result.seconds:.0f}s, loss {result.first_loss:.4f} -> "
          f"{result.last_loss:.4f}; backbone written to {result.path}\n"
          f"train with: model.backbone_weights={result.path}")
    return 0
