"""The subcommands of ``detr-irpe``, one module each with ``add_arguments(parser)`` and ``run(args)``.

A module is imported only when its command runs (or prints its ``--help``), so that ``detr-irpe
train`` never loads what ``export`` needs.
"""

# name -> (one-line help, module under detr_irpe.apps.commands)
COMMANDS = {
    "train": ("train DETR(-iRPE); --resume continues a run", "train"),
    "eval": ("COCO mAP of a checkpoint (ours, official DETR, iRPE model zoo; path or URL)", "evaluate"),
    "predict": ("draw a checkpoint's detections on images; writes PNGs and detections.json", "predict"),
    "visualize": ("pictures of a checkpoint: boxes, attention maps, iRPE tables, training curves", "visualize"),
    "check-data": ("check a COCO-format dataset: every problem, grouped, with examples", "check_data"),
    "export": ("export a checkpoint to ONNX or torch.export (dynamic batch and image size) with a JSON of "
               "its preprocessing and class names", "export"),
    "demo": ("the CPU demo: synthetic shapes, training, COCO mAP, pictures", "demo"),
    "pretrain-backbone": ("pretrain the tiny backbone on image-level labels", "pretrain_backbone"),
    "plot-logs": ("training curves of runs in one PNG (the same as visualize curves)", "curves"),
    "convert-checkpoint": ("convert a checkpoint: ours (.pth), .safetensors, or a Hugging Face DETR folder",
                           "convert_checkpoint"),
}
