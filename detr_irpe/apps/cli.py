"""The ``detr-irpe`` console script: one subcommand per tool, one way to fail.

    detr-irpe train --config detr_r50_irpe_product_ctx_k_9x9 data.root=/data/coco
    detr-irpe eval --checkpoint outputs/run/checkpoint.pth --data-root /data/coco
    detr-irpe predict --checkpoint CKPT photos/ --out outputs/pred
    detr-irpe visualize boxes --checkpoint CKPT --val 4 --out outputs/viz
    detr-irpe check-data --config detr_r50 data.root=/data/coco
    detr-irpe export --checkpoint CKPT --out model.onnx
    detr-irpe demo

``tools/<name>.py`` are the same commands (``main(command=...)``). A documented error
(:class:`detr_irpe.errors.DetrIrpeError`) is printed as ``error: <message>`` on stderr with a
non-zero exit and no traceback, unless ``--debug`` is given or ``DETR_IRPE_DEBUG=1`` is set.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from typing import Callable, Dict, List, Optional, Sequence

from tqdm import tqdm

from ..config import load_config, validate
from ..data.check import check_config_data, check_config_splits, check_dataset, report_and_exit_code
from ..engine.convert import FORMATS, convert_checkpoint
from ..engine.evaluate import evaluate_checkpoint
from ..engine.pretrain import pretrain_backbone
from ..engine.train import TrainingStopped, resume_training, train
from ..errors import DetrIrpeError, UsageError
from ..export import DEFAULT_OPSET, FORMATS as EXPORT_FORMATS, ONNX_OPSETS, export_checkpoint
from . import pictures
from .demo import DemoSettings, run_demo
from .predict import predict_onnx, predict_path

DEBUG_ENV = "DETR_IRPE_DEBUG"


def _overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.lr=2e-4 model.rpe=null")


def _overwrite(parser: argparse.ArgumentParser, what: str = "files of an earlier run") -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} (never this command's inputs); without it they are never replaced")


def _checkpoint_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint file, http(s) URL")
    parser.add_argument("--config", help="YAML config (a path or a shipped name); default: the checkpoint's")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")


# -- train, eval, check-data, pretrain-backbone ------------------------------------------------

def _train_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config: a path or a shipped name such as detr_r50 (see configs/)")
    p.add_argument("--resume", help="checkpoint.pth of a run to continue, in its folder, with its config "
                                    "(and --config / overrides on top)")
    p.add_argument("--check-data", action="store_true",
                   help="check the train and val datasets (like check-data) and stop without training")
    _overrides(p)


def _train(args) -> int:
    if args.resume and not args.check_data:
        resume_training(args.resume, args.config, args.overrides)
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.check_data:
        return check_config_data(cfg.data, progress=sys.stderr.isatty())
    train(cfg)
    return 0


def _eval_parser(p: argparse.ArgumentParser) -> None:
    _checkpoint_options(p)
    p.add_argument("--data-root", help="dataset root (data.root)")
    p.add_argument("--output-dir", help="where detections.json and metrics.json go (default: eval_<name> "
                                        "beside the checkpoint, numbered if taken)")
    p.add_argument("--batch-size", type=int, help="images per batch (default: the config's train.batch_size)")
    p.add_argument("--batched-backbone", action="store_true",
                   help="run the CNN on padded batches (faster on a GPU; detections then depend on the batch)")
    p.add_argument("--strict", action="store_true",
                   help="fail when the model's classes are not the annotations' categories (default: a warning)")
    _overwrite(p, "metrics.json / detections.json in --output-dir")
    _overrides(p)


def _eval(args) -> int:
    overrides = list(args.overrides) + ([f"data.root={args.data_root}"] if args.data_root else [])
    metrics = evaluate_checkpoint(args.checkpoint, args.config, overrides, args.output_dir, args.device,
                                  args.batch_size, batched_backbone=args.batched_backbone, overwrite=args.overwrite,
                                  strict=args.strict)
    print(f"metrics.json and detections.json written to {metrics['output_dir']}")
    return 0


def _check_data_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--annotations", help="COCO annotation json (instead of --config)")
    p.add_argument("--images", help="image folder of --annotations")
    p.add_argument("--config", help="YAML config whose data.* keys name the dataset")
    p.add_argument("--split", choices=["train", "val", "both"], default="both", help="with --config")
    p.add_argument("--no-images", action="store_true", help="do not decode images (only check they exist)")
    p.add_argument("--workers", type=int, default=None, help="threads decoding images (default: up to 8)")
    p.add_argument("--examples", type=int, default=3, help="examples shown per kind of problem")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    _overrides(p)


def _check_data(args) -> int:
    options = dict(decode=not args.no_images, workers=args.workers, progress=sys.stderr.isatty(),
                   max_examples=max(args.examples, 1))
    if args.annotations:
        if args.config or args.overrides:
            raise UsageError("give either --annotations (with --images) or --config [overrides], not both")
        reports = {"dataset": check_dataset(args.annotations, args.images, **options)}
    else:
        cfg = load_config(args.config, args.overrides)
        splits = ("train", "val") if args.split == "both" else (args.split,)
        reports = check_config_splits(cfg.data, splits, **options)
    return report_and_exit_code(reports, strict=args.strict, max_examples=args.examples)


def _pretrain_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config with model.backbone=tiny and the data.* keys")
    p.add_argument("--out", required=True, help="where the backbone state dict is written")
    p.add_argument("--iterations", type=int, help="train.pretrain_iterations (default: the config's, else 1000)")
    p.add_argument("--minutes", type=float, help="stop earlier once this much wall time has passed")
    p.add_argument("--batch-size", type=int, help="train.pretrain_batch_size (default: the config's)")
    p.add_argument("--lr", type=float, help="train.pretrain_lr, AdamW (default: the config's)")
    _overwrite(p, "an existing --out file")
    _overrides(p)


def _pretrain(args) -> int:
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


# -- predict, visualize -------------------------------------------------------------------------

def _predict_parser(p: argparse.ArgumentParser) -> None:
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="checkpoint file, http(s) URL")
    model.add_argument("--onnx", help="a model.onnx written by `detr-irpe export` (its .json beside it), "
                                      "run with ONNX Runtime")
    p.add_argument("--config", help="YAML config (a path or a shipped name); default: the checkpoint's")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder for PNGs and detections.json (not the inputs' folder)")
    p.add_argument("--threshold", type=float, default=0.7, help="minimum score to keep a box (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="images per batch (default %(default)s)")
    p.add_argument("--batched-backbone", action="store_true",
                   help="run the CNN on padded batches (faster on a GPU; detections then depend on the batch)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    _overwrite(p, "pictures and detections.json of an earlier run in --out")


def _predict(args) -> int:
    if args.onnx:
        if args.config or args.set or args.batched_backbone:
            raise UsageError("--config, --set and --batched-backbone apply to --checkpoint; an ONNX model "
                             "carries its preprocessing in its .json")
        results = predict_onnx(args.onnx, args.inputs, args.out, args.threshold, batch_size=args.batch_size,
                               overwrite=args.overwrite)
    else:
        results = predict_path(args.checkpoint, args.inputs, args.out, args.threshold, args.config, args.set,
                               args.device, batch_size=args.batch_size, batched_backbone=args.batched_backbone,
                               overwrite=args.overwrite)
    total = sum(len(r["detections"]) for r in results)
    skipped = sum("error" in r for r in results)
    note = f" ({skipped} unreadable, skipped)" if skipped else ""
    print(f"{len(results) - skipped} images{note}, {total} detections >= {args.threshold}: "
          f"pictures and detections.json in {args.out}")
    return 0


def _layer(text: str):
    return text if text == "all" else int(text)


def _picture_options(p: argparse.ArgumentParser) -> None:
    _checkpoint_options(p)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--out", required=True, help="output folder for the PNGs")
    p.add_argument("images", nargs="*", help="image files or folders")
    p.add_argument("--val", type=int, metavar="N",
                   help="also the first N validation images of the config's dataset, with ground truth")
    _overwrite(p, "pictures of an earlier run in --out")


def _visualize_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="picture", required=True, metavar="{boxes,attention,rpe,curves}")
    q = sub.add_parser("boxes", help="predicted boxes (with names and scores) beside the ground truth")
    _picture_options(q)
    q.add_argument("--threshold", type=float, default=0.7, help="minimum score to draw a box")
    q.add_argument("--min-size", type=int, default=256,
                   help="draw images whose shorter side is smaller enlarged to this size (0: never)")

    q = sub.add_parser("attention", help="encoder attention of a pixel, decoder attention per detection")
    _picture_options(q)
    q.add_argument("--pixel", type=float, nargs=2, metavar=("X", "Y"),
                   help="query pixel of the encoder attention, in the image's pixels (default: its centre)")
    q.add_argument("--layer", type=_layer, default=-1, help="encoder layer (negative from the end, or 'all')")
    q.add_argument("--decoder-layer", type=int, default=-1, help="decoder layer (negative from the end)")
    q.add_argument("--threshold", type=float, default=0.7, help="minimum score of a detection to show")
    q.add_argument("--max-objects", type=int, default=6, help="at most this many detection panels")
    q.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity")
    q.add_argument("--interpolation", choices=("bilinear", "nearest"), default="bilinear",
                   help="how the feature-grid attention is upsampled to the image")
    q.add_argument("--min-size", type=int, default=256,
                   help="draw images whose shorter side is smaller enlarged to this size (0: never)")

    q = sub.add_parser("rpe", help="the learned iRPE lookup tables of the encoder")
    _picture_options(q)
    q.add_argument("--layer", type=int, nargs="*", help="encoder layers to show (default: all)")
    q.add_argument("--pixel", type=float, nargs=2, metavar=("X", "Y"),
                   help="also plot the contribution q.r of the token at this pixel of the first image")

    q = sub.add_parser("curves", help="training curves of log.jsonl files")
    _curves_parser(q)


def _curves_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("logs", nargs="+", help="log.jsonl files, one per run")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--names", nargs="*", help="legend names (default: each log's folder name)")
    p.add_argument("--title")
    _overwrite(p, "an existing --out file")


def _visualize(args) -> int:
    if args.picture == "curves":
        written = [pictures.plot_logs(args.logs, args.out, args.names, args.title, overwrite=args.overwrite)]
    else:
        common = dict(config=args.config, overrides=args.set, device=args.device, overwrite=args.overwrite)
        if args.picture == "boxes":
            written = pictures.draw_boxes(args.checkpoint, args.out, args.images, args.val, args.threshold,
                                          args.min_size, **common)
        elif args.picture == "attention":
            written = pictures.draw_attention(args.checkpoint, args.out, args.images, args.val, args.pixel,
                                              args.layer, args.decoder_layer, args.threshold, args.max_objects,
                                              args.alpha, args.interpolation, args.min_size, **common)
        else:
            written = pictures.draw_rpe_tables(args.checkpoint, args.out, args.layer or None, args.images,
                                               args.val, args.pixel, **common)
    for path in written:
        print(path)
    return 0


def _plot_logs(args) -> int:
    print(pictures.plot_logs(args.logs, args.out, args.names, args.title, overwrite=args.overwrite))
    return 0


# -- demo -------------------------------------------------------------------------------------

def _demo_parser(p: argparse.ArgumentParser) -> None:
    d = DemoSettings()
    p.add_argument("--config", help="YAML config (default: the shipped demo.yaml)")
    p.add_argument("--budget-minutes", type=float,
                   help="optional cap on pretraining + training wall time; a run it cuts short says so "
                        "(its AP is then not the demo's)")
    p.add_argument("--output-dir", default=d.output_dir, help="where the run goes (default %(default)s)")
    p.add_argument("--data-root", default=d.data_root,
                   help="where the synthetic data is generated / reused (default %(default)s)")
    rpe = p.add_mutually_exclusive_group()
    rpe.add_argument("--rpe", help="iRPE spec of the encoder, e.g. rpe-2.0-product-ctx-1-k (default: the config's)")
    rpe.add_argument("--no-rpe", action="store_true", help="plain DETR encoder (same as model.rpe=null)")
    p.add_argument("--num-train", type=int, default=d.num_train, help="training images (default %(default)s)")
    p.add_argument("--num-val", type=int, default=d.num_val, help="validation images (default %(default)s)")
    p.add_argument("--image-size", type=int, default=d.image_size, help="image side in pixels (default %(default)s)")
    p.add_argument("--num-pictures", type=int, default=d.num_pictures,
                   help="validation images drawn with predictions vs ground truth (default %(default)s)")
    p.add_argument("--no-pictures", action="store_true", help="skip the pictures")
    p.add_argument("--max-iterations", type=int, help="stop training after this many iterations (a quick look)")
    _overrides(p)


def _demo(args) -> int:
    overrides = list(args.overrides)
    if args.no_rpe:
        overrides.append("model.rpe=null")
    elif args.rpe:
        overrides.append(f"model.rpe={args.rpe}")
    run_demo(DemoSettings(config=args.config, overrides=overrides, output_dir=args.output_dir,
                          data_root=args.data_root, budget_minutes=args.budget_minutes, num_train=args.num_train,
                          num_val=args.num_val, image_size=args.image_size, num_pictures=args.num_pictures,
                          pictures=not args.no_pictures, max_iterations=args.max_iterations))
    return 0


# -- convert ------------------------------------------------------------------------------------

def _convert_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", required=True, choices=FORMATS,
                   help="hf: folder for transformers' from_pretrained; ours: .pth; safetensors: .safetensors")
    p.add_argument("--hf-backbone", choices=("native", "timm"),
                   help="--to hf: transformers' own ResNet (default; loads without timm) or timm's "
                        "(the default for DC5, which transformers dilates only with timm)")
    p.add_argument("src", help="checkpoint: .pth or .safetensors file, Hugging Face folder or hub id, or http(s) URL")
    p.add_argument("out", help="output file (ours, safetensors) or folder (hf)")
    _overwrite(p, "an existing output")


def _convert(args) -> int:
    print(f"wrote {convert_checkpoint(args.src, args.out, args.to, args.hf_backbone, overwrite=args.overwrite)}")
    return 0


# -- export -------------------------------------------------------------------------------------

def _export_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint file or http(s) URL (any `eval` takes)")
    p.add_argument("--out", required=True, help="model file to write (.onnx / .pt2); its .json goes beside it")
    p.add_argument("--format", default="onnx", choices=list(EXPORT_FORMATS),
                   help="onnx, or a torch.export program (default %(default)s)")
    p.add_argument("--opset", type=int,
                   help=f"ONNX opset, {ONNX_OPSETS.start}-{ONNX_OPSETS.stop - 1} (default {DEFAULT_OPSET})")
    p.add_argument("--config", help="YAML config (a path or a shipped name); default: the checkpoint's")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    _overwrite(p, "an existing model file and its .json")


def _export(args) -> int:
    result = export_checkpoint(args.checkpoint, args.out, args.format, args.opset, args.config, args.set,
                               overwrite=args.overwrite)
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in result.max_abs_diff.items())
    print(f"wrote {result.model_path} and {result.sidecar_path} in {result.seconds:.1f} s; "
          f"max |difference| to PyTorch on a padded batch of a new size: {diffs}")
    return 0


# -- the console script -------------------------------------------------------------------------

# name -> (help, add arguments, run)
COMMANDS: Dict[str, tuple] = {
    "train": ("train DETR(-iRPE); --resume continues a run", _train_parser, _train),
    "eval": ("COCO mAP of a checkpoint (ours, official DETR, iRPE model zoo; path or URL)", _eval_parser, _eval),
    "predict": ("draw a checkpoint's detections on images; writes PNGs and detections.json", _predict_parser,
                _predict),
    "visualize": ("pictures of a checkpoint: boxes, attention maps, iRPE tables, training curves",
                  _visualize_parser, _visualize),
    "check-data": ("check a COCO-format dataset: every problem, grouped, with examples", _check_data_parser,
                   _check_data),
    "export": ("export a checkpoint to ONNX or torch.export (dynamic batch and image size) with a JSON of "
               "its preprocessing and class names", _export_parser, _export),
    "demo": ("the CPU demo: synthetic shapes, training, COCO mAP, pictures", _demo_parser, _demo),
    "pretrain-backbone": ("pretrain the tiny backbone on image-level labels", _pretrain_parser, _pretrain),
    "plot-logs": ("training curves of log.jsonl files in one PNG", _curves_parser, _plot_logs),
    "convert-checkpoint": ("convert a checkpoint: ours (.pth), .safetensors, or a Hugging Face DETR folder",
                           _convert_parser, _convert),
}


def build_parser(commands: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The ``detr-irpe`` parser with the given subcommands (all by default)."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true",
                       help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")
    parser = argparse.ArgumentParser(prog="detr-irpe", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, parents=[debug])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name in commands or COMMANDS:
        help_text, add_arguments, run = COMMANDS[name]
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[debug])
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def _end_progress_bars() -> None:
    """Close the progress bars still drawing, so that a message starts on a line of its own."""
    bars = [bar for bar in list(getattr(tqdm, "_instances", ())) if not bar.disable]
    for bar in bars:
        bar.close()
    if bars and not sys.stderr.isatty():  # a log file keeps the bar's text: end its line
        sys.stderr.write("\n")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one ``warning: <message>`` line, above any progress bar."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def _one_line_warnings(debug: bool):
    if debug:
        yield
        return
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        yield
    finally:
        warnings.showwarning = previous


def _os_error_line(error: OSError) -> str:
    where = f": {error.filename}" if error.filename else ""
    return f"{error.strerror or error}{where}"


def run_guarded(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)``, with a documented error printed as one ``error:`` line (exit code 1), a
    training stopped by a signal as its message (exit code 128 + the signal), an operating-system
    error on a named file (no permission, a full disk) as one line, Ctrl-C as ``interrupted``
    (130) and warnings as ``warning:`` lines, unless debugging is asked for."""
    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    try:
        with _one_line_warnings(debug):
            return int(run(args) or 0)
    except TrainingStopped as e:
        _end_progress_bars()
        print(str(e), file=sys.stderr, flush=True)
        return e.exit_code
    except DetrIrpeError as e:
        if debug:
            raise
        _end_progress_bars()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except OSError as e:
        if debug or not e.filename:
            raise
        _end_progress_bars()
        print(f"error: {_os_error_line(e)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        _end_progress_bars()
        print("interrupted", file=sys.stderr, flush=True)
        return 130


def main(argv: Optional[List[str]] = None, command: Optional[str] = None) -> int:
    """Run ``detr-irpe [command] ARGS``; returns the exit code. ``command`` fixes the subcommand
    (what ``tools/<name>.py`` does), so ``argv`` holds only its arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if command is not None:
        argv = [command] + argv
    args = build_parser().parse_args(argv)
    return run_guarded(args.run, args)
