#!/usr/bin/env python
"""
Export a trained model to TorchScript or ONNX, run the exported file on a few images and compare
its detections with the eager model's (as detectron2's tools/deploy/export_model.py).

Usage:
  python tools/export_model.py --config-file output/run/config.yaml \\
      --weights output/run/model_final.pth --format torchscript|onnx \\
      [--export-method tracing|scripting] [--sample-image IMG] [--num-check-images 3] \\
      --output output/export [KEY VALUE ...]

Writes into --output: model.ts (TorchScript) or model.onnx (ONNX opset 17, checked with
onnx.checker, run with onnxruntime on the CPU), and report.json: the input and output names and
shapes on the sample image, the export time, and per check image the largest difference of
boxes, scores and masks between the exported and the eager model, whether the classes agree and
the smallest mask IoU. The sample image is --sample-image, else the first image of the config's
DATASETS.TEST[0]; the check images are the next ones of that dataset (or the sample alone). The
exported model's inputs and outputs (training_harness/deploy.py): one (3, H, W) float32 image
resized as the config's test transform does, in INPUT.FORMAT channel order; boxes (D, 4),
scores (D,), classes (D,), masks (D, 1, 28, 28) probabilities in that resized image. Turn them
into detections of the original image with detectron2's detector_postprocess, as
``tools/predict.py --exported`` does. Export runs on the CPU.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.utils.logger import setup_logger
from training_harness import GuardedTrainer, register_datasets_from_config
from training_harness.config import load_project_config
from training_harness.deploy import (
    EXPORT_METHODS,
    FORMATS,
    ONNX_OPSET,
    OUTPUT_NAMES,
    DetectionOutputs,
    ExportedPredictor,
    compare_outputs,
    export,
    preprocess,
    readable_images,
    skipped_images_line,
)
from training_harness.errors import (CheckpointError, CheckpointMismatchError, ExportError,
                                  UnsafeFileError)
from training_harness.reliability.checkpoint import AtomicCheckpointer
from training_harness.reliability.checkpoint_fit import check_checkpoint_fits
from training_harness.reliability.tool_outputs import prepare_output_folder

logger = logging.getLogger("export_model")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, type=Path,
                        help="the config the model was trained with (e.g. OUTPUT_DIR/config.yaml)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="checkpoint to export (default: the config's MODEL.WEIGHTS)")
    parser.add_argument("--format", choices=FORMATS, default="torchscript")
    parser.add_argument("--export-method", choices=EXPORT_METHODS, default="tracing")
    parser.add_argument("--sample-image", type=Path, default=None,
                        help="the image to trace with (default: the first test image)")
    parser.add_argument("--num-check-images", type=int, default=3,
                        help="images the exported model is compared on (default 3)")
    parser.add_argument("--output", required=True, type=Path, help="folder for the results")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides as KEY VALUE pairs")
    return parser.parse_args(argv)


def setup_cfg(args: argparse.Namespace) -> CfgNode:
    try:
        cfg = load_project_config(str(args.config_file), args.opts, args.weights)
    except (FileNotFoundError, UnsafeFileError) as e:
        raise ExportError(str(e)) from None
    source = "--weights" if args.weights is not None else "MODEL.WEIGHTS"
    if not cfg.MODEL.WEIGHTS:
        raise ExportError("no checkpoint given: pass --weights or set MODEL.WEIGHTS")
    if not Path(cfg.MODEL.WEIGHTS).is_file():
        raise ExportError(f"checkpoint not found: {cfg.MODEL.WEIGHTS} ({source})")
    cfg.MODEL.DEVICE = "cpu"  # the exported files run on the CPU (onnxruntime's CPU provider)
    cfg.freeze()
    return cfg


def load_model(cfg: CfgNode) -> torch.nn.Module:
    """The model with every parameter and buffer from the checkpoint, or an error listing what
    the checkpoint lacks or has in another shape (an export of random weights is no export)."""
    try:
        check_checkpoint_fits(cfg, resume=False, full_model=True)
    except (CheckpointError, CheckpointMismatchError, UnsafeFileError) as e:
        raise ExportError(str(e)) from None
    model = GuardedTrainer.build_model(cfg).eval()
    AtomicCheckpointer(model, require_full_model=True).load(cfg.MODEL.WEIGHTS)
    return model


def check_images(cfg: CfgNode, args: argparse.Namespace) -> List[Path]:
    """The sample image first, then the images the export is compared on."""
    if args.sample_image is not None:
        if not args.sample_image.is_file():
            raise ExportError(f"image not found: {args.sample_image} (--sample-image)")
        return [args.sample_image]
    if not cfg.DATASETS.TEST:
        raise ExportError("no sample image: pass --sample-image or set DATASETS.TEST")
    register_datasets_from_config(cfg)
    records = DatasetCatalog.get(cfg.DATASETS.TEST[0])
    return [Path(r["file_name"]) for r in records[: max(1, args.num_check_images)]]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    setup_logger(name="export_model")
    try:
        cfg = setup_cfg(args)
        path = args.output / ("model.ts" if args.format == "torchscript" else "model.onnx")
        try:
            prepare_output_folder(args.output, "--output", [path.name, "report.json"],
                                  {"--config-file": args.config_file, "--weights":
                                   cfg.MODEL.WEIGHTS, "--sample-image": args.sample_image})
        except ValueError as e:
            raise ExportError(str(e)) from None
        images = check_images(cfg, args)
        model = load_model(cfg)
        skipped: List[int] = []
        read = list(readable_images(images, "BGR", skipped))
        if skipped:
            logger.warning(skipped_images_line([str(images[i]) for i in skipped], len(images)))
        if not read:
            raise ExportError(f"none of the {len(images)} sample and check images could be read")
        images = [images[i] for i, _ in read]
        tensors = [preprocess(cfg, image) for _, image in read]
        start = time.perf_counter()
        export(model, tensors[0], args.format, args.export_method, path)
        seconds = time.perf_counter() - start
    except ExportError as e:
        print(f"export_model: {e}", file=sys.stderr)
        sys.exit(2)
    exported = ExportedPredictor(cfg, path)
    eager = DetectionOutputs(model)
    checks = []
    with torch.no_grad():
        for image_path, tensor in zip(images, tensors):
            ours = list(exported.run(tensor))
            reference = list(eager(tensor))
            checks.append({"image": str(image_path), "input_shape": list(tensor.shape),
                           **compare_outputs(ours, reference)})
        sample_outputs = exported.run(tensors[0])
    report = {
        "format": args.format,
        "export_method": args.export_method,
        "file": str(path),
        "onnx_opset": ONNX_OPSET if args.format == "onnx" else None,
        "export_seconds": seconds,
        "inputs": {"image": list(tensors[0].shape)},
        "outputs": {n: list(o.shape) for n, o in zip(OUTPUT_NAMES, sample_outputs)},
        "checks": checks,
    }
    (args.output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info(f"Exported {path} in {seconds:.1f} s; outputs {report['outputs']}")
    for check in checks:
        logger.info(f"  {Path(check['image']).name} {check['input_shape']}: "
                    + ", ".join(f"{k} {v:g}" for k, v in check.items()
                                if k not in ("image", "input_shape")))
    return report


if __name__ == "__main__":
    main()
