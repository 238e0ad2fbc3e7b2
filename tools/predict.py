#!/usr/bin/env python
"""
Run a trained model on an image or a folder of images: one PNG per image with the predictions
drawn (detectron2's Visualizer) and one COCO-format results json.

Usage:
  python tools/predict.py --config-file output/run/config.yaml \\
      --weights output/run/model_final.pth --input path/to/images --output output/predictions \\
      [--coco-json annotations.json] [--confidence-threshold 0.5] [KEY VALUE ...]
  python tools/predict.py --config-file output/run/config.yaml --exported output/export/model.onnx \\
      --input path/to/images --output output/predictions_onnx      # or model.ts (TorchScript)

With --exported, the file made by tools/export_model.py runs (TorchScript, or ONNX through
onnxruntime) with the config's test-time resize and detectron2's postprocessing, and gives the
same outputs; the config's SCORE_THRESH_TEST was fixed at export time (--confidence-threshold
then filters what the file returns).

Writes into --output:
  coco_instances_results.json  [{image_id, category_id, bbox [x, y, w, h], score,
                                 segmentation (RLE)}], loadable with pycocotools' COCO.loadRes
  image_ids.json               without --coco-json: the sequential image ids given to the inputs
                               ({"images": [{id, file_name, height, width}]})
  vis/<image name>.png         the drawn predictions

Category ids are those of the dataset the model was trained on (the metadata's
thing_dataset_id_to_contiguous_id, e.g. the ids of your COCO json); image ids come from
--coco-json, matched by file_name, when given. Trailing KEY VALUE pairs override the config.
"""
import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, Metadata, MetadataCatalog
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer
from training_harness import register_datasets_from_config
from training_harness.config import load_project_config
from training_harness.config_checks import check_config_choices
from training_harness.deploy import (ExportedPredictor, build_predictor, readable_images,
                                  skipped_images_line)
from training_harness.errors import CheckpointError, CheckpointMismatchError
from training_harness.reliability.checkpoint_fit import check_checkpoint_fits
from training_harness.reliability.tool_outputs import prepare_output_folder

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Small images are drawn enlarged so that labels stay legible.
_MIN_DRAWN_SIDE = 480

logger = logging.getLogger("predict")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, type=Path,
                        help="the config the model was trained with (e.g. OUTPUT_DIR/config.yaml)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="checkpoint to load (default: the config's MODEL.WEIGHTS)")
    parser.add_argument("--input", required=True, type=Path, help="an image file or a folder")
    parser.add_argument("--output", required=True, type=Path, help="folder for the results")
    parser.add_argument("--coco-json", type=Path, default=None,
                        help="COCO json whose image ids the results use (matched by file_name)")
    parser.add_argument("--dataset", default=None,
                        help="registered dataset whose class names and ids to use (default: the "
                             "config's first DATASETS.TEST, else DATASETS.TRAIN)")
    parser.add_argument("--confidence-threshold", type=float, default=None,
                        help="minimum score kept (default: the config's SCORE_THRESH_TEST)")
    parser.add_argument("--exported", type=Path, default=None,
                        help="run this model.ts / model.onnx of tools/export_model.py instead of "
                             "the checkpoint")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides as KEY VALUE pairs")
    return parser.parse_args(argv)


def setup_cfg(args: argparse.Namespace) -> CfgNode:
    cfg = load_project_config(str(args.config_file), args.opts, args.weights)
    weights = cfg.MODEL.WEIGHTS
    if args.exported is not None:
        if args.weights is not None:
            raise ValueError("--weights and --exported exclude each other: the exported file "
                             "holds its weights")
        if not args.exported.is_file():
            raise FileNotFoundError(f"exported model not found: {args.exported} (--exported)")
        if args.exported.suffix not in (".ts", ".onnx"):
            raise ValueError(f"--exported {args.exported}: expected a .ts (TorchScript) or .onnx "
                             "file from tools/export_model.py")
    # DetectionCheckpointer silently keeps a random init when the file is missing: check first.
    elif not weights:
        raise ValueError("no checkpoint given: pass --weights or set MODEL.WEIGHTS")
    elif "://" not in weights and not Path(weights).is_file():
        source = "--weights" if args.weights is not None else "MODEL.WEIGHTS"
        raise FileNotFoundError(f"checkpoint not found: {weights} ({source})")
    if args.confidence_threshold is not None:
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: running on the CPU")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    check_config_choices(cfg)
    return cfg


def list_images(path: Path, output: Optional[Path] = None) -> List[Tuple[Path, str]]:
    """(file, name relative to the input folder) of every image, sorted; symlinked folders are
    followed (each real folder once), the ``output`` folder is left out when it is inside."""
    if path.is_file():
        return [(path, path.name)]
    if not path.is_dir():
        raise FileNotFoundError(f"input not found: {path} (--input)")
    skip = {os.path.realpath(output)} if output is not None else set()
    seen, files = set(), []
    for folder, subfolders, names in os.walk(path, followlinks=True):
        real = os.path.realpath(folder)
        if real in skip:
            logger.info(f"Leaving out {folder}: it is the --output folder (its drawings are no "
                        "input)")
            subfolders[:] = []
            continue
        if real in seen:  # a symlink back to a folder already listed
            subfolders[:] = []
            continue
        seen.add(real)
        files += [Path(folder) / n for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    files.sort()
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path} "
                                "(--input)")
    return [(p, p.relative_to(path).as_posix()) for p in files]


def image_ids_from_coco(images: List[Tuple[Path, str]], coco_json: Path) -> List[int]:
    """The id of each image in ``coco_json``, matched by file_name (or by a unique basename)."""
    if not coco_json.is_file():
        raise FileNotFoundError(f"COCO json not found: {coco_json} (--coco-json)")
    entries = json.loads(coco_json.read_text()).get("images")
    if not isinstance(entries, list):
        raise ValueError(f"'{coco_json}' is not a COCO json: it has no 'images' list "
                         "(--coco-json)")
    by_name = {e["file_name"]: e["id"] for e in entries}
    by_base: Dict[str, List[int]] = {}
    for e in entries:
        by_base.setdefault(Path(e["file_name"]).name, []).append(e["id"])
    ids = []
    for path, name in images:
        if name in by_name:
            ids.append(by_name[name])
        elif len(by_base.get(path.name, [])) == 1:
            ids.append(by_base[path.name][0])
        else:
            raise ValueError(f"image '{name}' is not in '{coco_json}' (no unique 'file_name' "
                             "match); pass the folder the json's file_names are relative to")
    return ids


def to_dataset_category_ids(results: List[Dict], metadata: Metadata) -> List[Dict]:
    """Contiguous class indices -> the dataset's category ids, when the metadata maps them."""
    id_map = metadata.get("thing_dataset_id_to_contiguous_id")
    if id_map is None:
        logger.warning("the metadata has no thing_dataset_id_to_contiguous_id: category_id is "
                       "the model's class index (0-based)")
        return results
    reverse = {contiguous: dataset_id for dataset_id, contiguous in id_map.items()}
    for r in results:
        r["category_id"] = reverse[r["category_id"]]
    return results


def _metadata(cfg: CfgNode, dataset: Optional[str]) -> Metadata:
    if dataset is None:
        names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
        dataset = names[0] if names else None
    if dataset is None:
        return Metadata()  # class indices are drawn instead of names
    if dataset not in DatasetCatalog:
        raise ValueError(f"unknown dataset '{dataset}' (--dataset)")
    metadata = MetadataCatalog.get(dataset)
    classes = metadata.get("thing_classes")
    if classes is not None and len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ValueError(
            f"dataset '{dataset}' has {len(classes)} classes ({', '.join(classes[:10])}) but the "
            f"model predicts {cfg.MODEL.ROI_HEADS.NUM_CLASSES} (MODEL.ROI_HEADS.NUM_CLASSES): "
            "its names and ids would be wrong. Pass the --dataset the model was trained on")
    return metadata


def _vis_name(name: str, taken: set) -> str:
    stem = str(Path(name).with_suffix(""))
    out = f"{stem}.png" if stem not in taken else f"{name.replace('.', '_')}.png"
    taken.add(stem)
    return out


def predict(cfg: CfgNode, images: List[Tuple[Path, str]], image_ids: List[int],
            metadata: Metadata, output: Path, exported: Optional[Path] = None,
            threshold: Optional[float] = None) -> Tuple[List[Dict], List[Dict]]:
    """Run the model (or the ``exported`` file) on every image and draw it; return the COCO
    results and image entries."""
    predictor = build_predictor(cfg) if exported is None else ExportedPredictor(cfg, exported)
    results: List[Dict] = []
    entries: List[Dict] = []
    skipped: List[int] = []
    taken: set = set()
    # DefaultPredictor takes BGR.
    for i, image in readable_images([path for path, _ in images], "BGR", skipped):
        name, image_id = images[i][1], image_ids[i]
        h, w = image.shape[:2]
        entries.append({"id": image_id, "file_name": name, "height": h, "width": w})
        instances = predictor(image)["instances"].to("cpu")
        if exported is not None and threshold is not None:
            instances = instances[instances.scores >= threshold]
        results.extend(instances_to_coco_json(instances, image_id))
        scale = max(1.0, _MIN_DRAWN_SIDE / max(h, w))
        vis = Visualizer(image[:, :, ::-1], metadata, scale=scale, instance_mode=ColorMode.IMAGE)
        drawn = vis.draw_instance_predictions(instances).get_image()  # RGB
        out = output / "vis" / _vis_name(name, taken)
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), drawn[:, :, ::-1])
        logger.info(f"{name}: {len(instances)} detections -> {out}")
    if skipped:
        logger.warning(skipped_images_line([images[i][1] for i in skipped], len(images)))
        if not entries:
            raise ValueError(f"none of the {len(images)} images could be read (--input)")
    return to_dataset_category_ids(results, metadata), entries


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = parse_args(argv)
    setup_logger(name="predict")
    try:
        cfg = setup_cfg(args)
        writes = ["coco_instances_results.json"] + ([] if args.coco_json else ["image_ids.json"])
        prepare_output_folder(
            args.output, "--output", writes,
            {"--config-file": args.config_file, "--weights": args.weights,
             "--exported": args.exported, "--coco-json": args.coco_json, "--input": args.input})
        images = list_images(args.input, args.output)
        register_datasets_from_config(cfg)
        if args.exported is None:
            # Refuse, before any image is read, a checkpoint that does not hold the whole model.
            check_checkpoint_fits(cfg, resume=False, full_model=True)
        metadata = _metadata(cfg, args.dataset)
        if args.coco_json is not None:
            image_ids = image_ids_from_coco(images, args.coco_json)
        else:
            image_ids = list(range(1, len(images) + 1))
        results, entries = predict(cfg, images, image_ids, metadata, args.output, args.exported,
                                   args.confidence_threshold)
    except (FileNotFoundError, ValueError, CheckpointError, CheckpointMismatchError) as e:
        sys.exit(f"predict: error: {e}")
    if args.coco_json is None:
        (args.output / "image_ids.json").write_text(json.dumps({"images": entries}, indent=1))
    results_path = args.output / "coco_instances_results.json"
    results_path.write_text(json.dumps(results))
    print(f"{len(entries)} images, {len(results)} detections: {results_path} and "
          f"{args.output / 'vis'}/")
    return results_path


if __name__ == "__main__":
    main()
