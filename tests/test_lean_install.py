"""The core install (``pip install detr_irpe`` without extras): train, eval, predict and check-data work
with the optional libraries unimportable, importing the package loads none of them, and each
feature that needs one is one ``error:`` line naming the extra to install."""
import json

from helpers import COCO, REPO, run_python

OPTIONAL = ("onnx", "onnxruntime", "onnxscript", "transformers", "timm", "huggingface_hub", "tensorboard",
            "ultrafast_pycocotools", "faster_coco_eval", "av")

DRIVER = r"""
import json, sys
for name in %(optional)r:
    sys.modules[name] = None  # `import name` now raises ImportError, as without the extra
sys.path.insert(0, sys.argv[1])
from helpers import save_tiny_checkpoint, tiny_overrides, tool
import detr_irpe.apps.cli, detr_irpe.apps.predict, detr_irpe.engine.train, detr_irpe.export, detr_irpe.interop
tmp, coco, image = sys.argv[2:5]
checkpoint = save_tiny_checkpoint(tmp + "/tiny.pth")
quick = {"train.epochs": 1, "train.max_iters_per_epoch": 1, "train.deterministic": "false"}
cases = {
    "check-data": ("check_data", ["--config", "demo", "--split", "val", "--no-images", "data.root=" + coco,
                                  "data.val_images=val2017", "data.val_annotations=annotations/instances_val2017.json"]),
    "train": ("train", tiny_overrides(tmp + "/run", **quick)),
    "eval": ("eval", ["--checkpoint", tmp + "/run/checkpoint.pth", "--output-dir", tmp + "/eval"]),
    "predict": ("predict", ["--checkpoint", checkpoint, image, "--out", tmp + "/pred"]),
    "export": ("export", ["--checkpoint", checkpoint, "--out", tmp + "/m.onnx"]),
    "predict --onnx": ("predict", ["--onnx", tmp + "/m.onnx", image, "--out", tmp + "/pred_onnx"]),
    "convert --to hf": ("convert_checkpoint", ["--to", "hf", checkpoint, tmp + "/hf"]),
    "hub id": ("eval", ["--checkpoint", "facebook/detr-resnet-50", "--output-dir", tmp + "/hub"]),
    "tensorboard": ("train", tiny_overrides(tmp + "/tb", **quick, **{"train.tensorboard": "true"})),
    "predict a video": ("predict", ["--checkpoint", checkpoint, tmp + "/clip.mp4", "--out", tmp + "/video"]),
    "eval --backend ultrafast": ("eval", ["--checkpoint", tmp + "/run/checkpoint.pth", "--backend", "ultrafast",
                                          "--output-dir", tmp + "/fast"]),
}
open(tmp + "/clip.mp4", "wb").close()
codes = {name: tool(script).main(argv) for name, (script, argv) in cases.items()}
loaded = [m for m in %(optional)r if sys.modules.get(m) is not None]
print(json.dumps({"codes": codes, "loaded": loaded}))
"""


def test_the_core_works_without_any_extra_and_names_the_missing_one(tmp_path):
    proc = run_python(DRIVER % {"optional": OPTIONAL}, REPO / "tests", tmp_path, COCO,
                      COCO / "val2017" / "000000223747.jpg", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["loaded"] == []
    codes = result["codes"]
    assert {k: codes[k] for k in ("check-data", "train", "eval", "predict")} == dict.fromkeys(
        ("check-data", "train", "eval", "predict"), 0)
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    wanted = {"export": "[export]", "predict --onnx": "[export]", "convert --to hf": "[hf]", "hub id": "[hf]",
              "tensorboard": "[tensorboard]", "predict a video": "[video]", "eval --backend ultrafast": "[fast-eval]"}
    assert len(errors) == len(wanted), proc.stderr[-4000:]
    for (name, extra), line in zip(wanted.items(), errors):
        assert codes[name] == 1, name
        assert f'pip install "detr_irpe{extra}"' in line, (name, line)
