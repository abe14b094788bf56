"""detr-irpe export: a checkpoint as ONNX or a torch.export program, checked against PyTorch."""
from __future__ import annotations

from ...export import DEFAULT_OPSET, FORMATS, ONNX_OPSETS, export_checkpoint
from . import options


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint file or http(s) URL (anything eval takes)")
    p.add_argument("--out", required=True, help="model file to write (.onnx / .pt2); its JSON goes beside it (model.onnx.json)")
    p.add_argument("--format", default="onnx", choices=list(FORMATS),
                   help="onnx, or a torch.export program (default %(default)s)")
    p.add_argument("--opset", type=int,
                   help=f"ONNX opset, {ONNX_OPSETS.start}-{ONNX_OPSETS.stop - 1} (default {DEFAULT_OPSET})")
    p.add_argument("--config", help="YAML config (a path or a shipped name); default: the checkpoint's")
    options.overwrite(p, "an existing model file and its .json")
    options.overrides(p)


def run(args) -> int:
    result = export_checkpoint(args.checkpoint, args.out, args.format, args.opset, args.config, args.overrides,
                               overwrite=args.overwrite)
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in result.max_abs_diff.items())
    print(f"wrote {result.model_path} and {result.sidecar_path} in {result.seconds:.1f} s; "
          f"max |difference| to PyTorch on a padded batch of a new size: {diffs}")
    return 0
