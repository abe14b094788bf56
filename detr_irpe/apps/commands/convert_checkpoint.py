"""detr-irpe convert-checkpoint: ours (.pth), .safetensors, or a Hugging Face DETR folder."""
from __future__ import annotations

from ...engine.convert import FORMATS, convert_checkpoint
from . import options


def add_arguments(p) -> None:
    p.add_argument("--to", required=True, choices=FORMATS,
                   help="hf: folder for transformers' from_pretrained; ours: .pth; safetensors: .safetensors")
    p.add_argument("--hf-backbone", choices=("native", "timm"),
                   help="--to hf: transformers' own ResNet (default; loads without timm) or timm's "
                        "(the default for DC5, which transformers dilates only with timm)")
    p.add_argument("src", help="checkpoint: .pth or .safetensors file, Hugging Face folder or hub id, or http(s) URL")
    p.add_argument("out", help="output file (ours, safetensors) or folder (hf)")
    options.overwrite(p, "an existing output")


def run(args) -> int:
    print(f"wrote {convert_checkpoint(args.src, args.out, args.to, args.hf_backbone, overwrite=args.overwrite)}")
    return 0
