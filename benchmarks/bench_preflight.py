#!/usr/bin/env python
"""
The pre-flight report's cost on a COCO-train-sized dataset: a generated COCO json of 118,287
images and 860,001 boxes (80 classes with Zipf frequencies, boxes of 4-400 px, 1% crowd, 5% of
the images empty; seeded), registered through DATASETS.REGISTER_COCO as a user's would be.
Times ``tools/analyze_data.py`` end to end (a new process: imports, registration with its checks,
the report, the JSON and the figure) on the Swin-T COCO config, and the one-line summary
train_net.py logs at set-up (preflight_summary) on the first 100,000 training records, in process.

    python benchmarks/bench_preflight.py --update-md
    python benchmarks/bench_preflight.py --tiny   # what the tests run
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file
import common  # noqa: E402

NAME = "bench_preflight"


def write_coco(path: Path, images: int, boxes: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    image_ids = np.arange(1, images + 1)
    holding = rng.choice(image_ids, size=int(0.95 * images), replace=False)
    owner = rng.choice(holding, size=boxes)
    owner[: len(holding)] = holding  # every non-empty image holds a box
    classes = rng.choice(80, size=boxes, p=(w := 1.0 / np.arange(1, 81)) / w.sum()) + 1
    side = np.exp(rng.uniform(np.log(4), np.log(400), size=boxes))
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2), size=boxes))
    w, h = np.minimum(side * aspect, 639), np.minimum(side / aspect, 479)
    x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
    crowd = rng.random(boxes) < 0.01
    coco = {
        "images": [{"id": int(i), "file_name": f"{i:012d}.jpg", "height": 480, "width": 640}
                   for i in image_ids],
        "annotations": [{"id": k + 1, "image_id": int(owner[k]), "category_id": int(classes[k]),
                         "bbox": [round(float(x[k]), 1), round(float(y[k]), 1),
                                  round(float(w[k]), 1), round(float(h[k]), 1)],
                         "area": float(w[k] * h[k]), "iscrowd": int(crowd[k])}
                        for k in range(boxes)],
        "categories": [{"id": c, "name": f"class_{c}"} for c in range(1, 81)],
    }
    path.write_text(json.dumps(coco))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=118287)
    parser.add_argument("--boxes", type=int, default=860001)
    parser.add_argument("--summary-images", type=int, default=100000)
    parser.add_argument("--tiny", action="store_true", help="2,000 images, 14,000 boxes")
    common.add_output_arguments(parser, NAME)
    args = parser.parse_args(argv)
    if args.tiny:
        args.images, args.boxes, args.summary_images = 2000, 14000, 1000
    folder = common.REPO / "output" / "benchmarks" / (NAME + ("_tiny" if args.tiny else ""))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    json_file = folder / "train.json"
    start = time.perf_counter()
    write_coco(json_file, args.images, args.boxes)
    generate_s = time.perf_counter() - start
    entry = [["bench_train", str(json_file), str(folder / "images")]]
    opts = ["DATASETS.REGISTER_COCO", str(entry),
            "DATASETS.TRAIN", "('bench_train',)", "DATASETS.TEST", "()",
            "MODEL.ROI_HEADS.NUM_CLASSES", "80", "MODEL.MASK_ON", "False", "MODEL.WEIGHTS", "",
            "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False", "OUTPUT_DIR", str(folder)]
    command = [sys.executable, str(common.REPO / "tools" / "analyze_data.py"), "--config-file",
               str(common.REPO / "configs" / "swin_balanced.yaml"), *opts]
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, cwd=common.REPO)
    report_s = time.perf_counter() - start
    if run.returncode:
        raise RuntimeError(f"analyze_data.py failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")

    from detectron2.data import DatasetCatalog
    from training_harness.config import load_project_config
    from training_harness.data import register_datasets_from_config
    from training_harness.preflight import preflight_summary

    cfg = load_project_config(str(common.REPO / "configs" / "swin_balanced.yaml"), opts)
    register_datasets_from_config(cfg)
    records = DatasetCatalog.get("bench_train")[: args.summary_images]
    start = time.perf_counter()
    line = preflight_summary(cfg, records)
    summary_s = time.perf_counter() - start
    result = {"images": args.images, "boxes": args.boxes, "generate_s": generate_s,
              "report_s": report_s, "summary_images": len(records), "summary_s": summary_s,
              "summary": line}
    body = common.markdown_table(
        ["what", "images", "boxes", "seconds"],
        [["`tools/analyze_data.py`, end to end (new process)", args.images, args.boxes,
          f"{report_s:.1f}"],
         ["`preflight_summary` (train_net.py's set-up line), in process", len(records), "-",
          f"{summary_s:.2f}"]])
    print(body + "\n\n" + line)
    common.publish(args, NAME, "The pre-flight report on a COCO-sized json (bench_preflight.py)",
                   body, result, __file__, argv,
                   ["The json is generated (seeded, "
                    f"{generate_s:.0f} s; not timed); the image files do not exist (nothing "
                    "reads them). The end-to-end time includes Python's start, the imports, "
                    "loading and checking the json at registration, and writing the JSON and "
                    "the figure; the anchor analysis samples 200 object images (the tool's "
                    "default), the summary 20."], tiny=args.tiny)
    return result


if __name__ == "__main__":
    main()
