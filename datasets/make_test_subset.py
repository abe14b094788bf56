"""Copy a handful of COCO 2017 images and their annotations into tests/data/coco.

    python datasets/make_test_subset.py --source /path/to/coco --dest tests/data/coco

``--source`` has the standard layout (annotations/instances_{train,val}2017.json, train2017/,
val2017/). Images are copied byte for byte; the annotation files keep only the chosen images,
with every category. The images in EMPTY keep their entry but lose their annotations, so the
tests have an image without objects (see tests/data/README.md).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

# Small files, with a crowd annotation in each split (204805 train, 338304 val).
IMAGES = {
    "train": [425989, 188421, 483330, 139270, 204805, 188416],
    "val": [223747, 521601, 404484, 555009, 343937, 338304],
}
EMPTY = {188416}

INFO = {
    "description": "detr_irpe test subset of COCO 2017 (https://cocodataset.org)",
    "contributor": "COCO Consortium",
    "url": "https://cocodataset.org",
    "version": "1.0",
    "year": 2017,
}
# COCO 2017's license table; each image's "license" field refers to it.
LICENSES = [
    {"id": i, "name": name, "url": url} for i, (name, url) in enumerate([
        ("Attribution-NonCommercial-ShareAlike License", "http://creativecommons.org/licenses/by-nc-sa/2.0/"),
        ("Attribution-NonCommercial License", "http://creativecommons.org/licenses/by-nc/2.0/"),
        ("Attribution-NonCommercial-NoDerivs License", "http://creativecommons.org/licenses/by-nc-nd/2.0/"),
        ("Attribution License", "http://creativecommons.org/licenses/by/2.0/"),
        ("Attribution-ShareAlike License", "http://creativecommons.org/licenses/by-sa/2.0/"),
        ("Attribution-NoDerivs License", "http://creativecommons.org/licenses/by-nd/2.0/"),
        ("No known copyright restrictions", "http://flickr.com/commons/usage/"),
        ("United States Government Work", "http://www.usa.gov/copyright.shtml"),
    ], start=1)
]


def make_subset(source: Path, dest: Path) -> None:
    for split, ids in IMAGES.items():
        data = json.loads((source / "annotations" / f"instances_{split}2017.json").read_text())
        wanted = set(ids)
        images = [im for im in data["images"] if im["id"] in wanted]
        missing = wanted - {im["id"] for im in images}
        if missing:
            raise SystemExit(f"{source}: image ids {sorted(missing)} not in instances_{split}2017.json")
        subset = {
            "info": data.get("info", INFO),
            "licenses": data.get("licenses", LICENSES),
            "images": sorted(images, key=lambda im: im["id"]),
            "annotations": [a for a in data["annotations"] if a["image_id"] in wanted - EMPTY],
            "categories": data["categories"],
        }
        (dest / "annotations").mkdir(parents=True, exist_ok=True)
        (dest / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(subset))
        (dest / f"{split}2017").mkdir(parents=True, exist_ok=True)
        for im in images:
            shutil.copyfile(source / f"{split}2017" / im["file_name"], dest / f"{split}2017" / im["file_name"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="COCO 2017 root (or a subset with its layout)")
    parser.add_argument("--dest", type=Path, default=Path("tests/data/coco"))
    args = parser.parse_args()
    make_subset(args.source, args.dest)


if __name__ == "__main__":
    main()
