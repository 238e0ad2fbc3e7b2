"""
Export a trained model to TorchScript or ONNX, and run an exported model as detectron2's
DefaultPredictor runs the eager one (tools/export_model.py, tools/predict.py --exported).

What is exported is :class:`DetectionOutputs`: one image tensor in, four tensors out, so that the
exported file needs neither detectron2's structures nor Python to be run:

    image    (3, H, W) float32, the model's INPUT.FORMAT channels, resized as the config's test
             transform does (shortest edge INPUT.MIN_SIZE_TEST, longest at most MAX_SIZE_TEST)
    boxes    (D, 4) float32, XYXY in the coordinates of that resized image
    scores   (D,) float32
    classes  (D,) int64, contiguous class indices
    masks    (D, 1, M, M) float32 mask probabilities inside each box (M = 28), not yet pasted

A user turns them into detections of the original image with detectron2's detector_postprocess
(rescale the boxes, paste the masks at threshold 0.5), as :class:`ExportedPredictor` does.
Tracing and ONNX follow the sample image's code path (detectron2's caveat for tracing): the
exported models were checked on images of other sizes than the sample (tests/test_export.py).
"""

import logging
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.export import scripting_with_instances
from detectron2.export.torchscript_patch import patch_builtin_len
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from torch import nn

from .errors import ExportError
from .reliability.checkpoint import AtomicCheckpointer

__all__ = [
    "EXPORT_METHODS",
    "FORMATS",
    "OUTPUT_NAMES",
    "SCRIPT_FIELDS",
    "DetectionOutputs",
    "ExportedPredictor",
    "build_predictor",
    "compare_outputs",
    "export",
    "load_exported",
    "preprocess",
    "readable_images",
    "skipped_images_line",
]

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
EXPORT_METHODS = ("tracing", "scripting")
OUTPUT_NAMES = ("boxes", "scores", "classes", "masks")
ONNX_OPSET = 17
# Instances fields a scripted model may carry (scripting_with_instances needs their types).
SCRIPT_FIELDS = {
    "proposal_boxes": Boxes,
    "objectness_logits": torch.Tensor,
    "pred_boxes": Boxes,
    "scores": torch.Tensor,
    "pred_classes": torch.Tensor,
    "pred_masks": torch.Tensor,
}


class DetectionOutputs(nn.Module):
    """A GeneralizedRCNN's inference as ``image -> (boxes, scores, classes, masks)`` (module
    docstring), without postprocessing to the original image size."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                    torch.Tensor]:
        instances = self.model.inference([{"image": image}], do_postprocess=False)[0]
        return (instances.pred_boxes.tensor, instances.scores, instances.pred_classes,
                instances.pred_masks)


def _is_swin(model: nn.Module) -> bool:
    from detectron2.modeling.backbone.swin import SwinTransformer

    return any(isinstance(m, SwinTransformer) for m in model.modules())


@torch.no_grad()
def export(model: nn.Module, sample: torch.Tensor, fmt: str, method: str, path: Path) -> Path:
    """
    Export ``model`` (a GeneralizedRCNN in eval mode, on the CPU) as :class:`DetectionOutputs`
    to ``path``, tracing it on ``sample`` (a (3, H, W) image tensor) or scripting it.

    Raises:
        ExportError: a format / method this model cannot be exported with.
    """
    if fmt not in FORMATS or method not in EXPORT_METHODS:
        raise ExportError(f"--format must be one of {FORMATS} and --export-method one of "
                          f"{EXPORT_METHODS}, got {fmt!r} and {method!r}")
    if fmt == "onnx" and method == "scripting":
        raise ExportError("ONNX export goes through tracing here: use --export-method tracing")
    if method == "scripting" and _is_swin(model):
        raise ExportError(
            "this model cannot be scripted: detectron2's SwinTransformer backbone is not "
            "TorchScript-compatible (it fails as detectron2's own does); use --export-method "
            "tracing")
    wrapped = DetectionOutputs(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript" and method == "scripting":
        scripting_with_instances(wrapped, SCRIPT_FIELDS).save(str(path))
        return path
    # As detectron2's TracingAdapter: len() of detectron2's structures stays a traced value, so
    # the number of detections of the sample does not become a constant of the graph.
    with patch_builtin_len():
        if fmt == "torchscript":
            torch.jit.trace(wrapped, (sample,), check_trace=False).save(str(path))
            return path
        torch.onnx.export(
            wrapped, (sample,), str(path), opset_version=ONNX_OPSET, dynamo=False,
            input_names=["image"], output_names=list(OUTPUT_NAMES),
            dynamic_axes={"image": {1: "height", 2: "width"},
                          **{name: {0: "detections"} for name in OUTPUT_NAMES}},
        )
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))
    return path


def load_exported(path: Path) -> Callable[[torch.Tensor], Tuple[torch.Tensor, ...]]:
    """image tensor -> the four output tensors, from a .ts or .onnx file."""
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run_onnx(image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
            outputs = session.run(list(OUTPUT_NAMES), {"image": image.numpy()})
            return tuple(torch.from_numpy(np.asarray(o)) for o in outputs)

        return run_onnx
    # Exported in eval mode (a scripted model holds it as a constant that eval() may not set).
    module = torch.jit.load(str(path), map_location="cpu")

    @torch.no_grad()
    def run_torchscript(image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(module(image))

    return run_torchscript


def preprocess(cfg: CfgNode, bgr: np.ndarray) -> torch.Tensor:
    """A BGR uint8 image (H, W, 3) -> the exported model's input: (3, H', W') float32, resized
    as the config's test transform does, in INPUT.FORMAT channel order (as DefaultPredictor)."""
    image = bgr[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else bgr
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST],
                                  cfg.INPUT.MAX_SIZE_TEST)
    image = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32)


def build_predictor(cfg: CfgNode) -> DefaultPredictor:
    """detectron2's DefaultPredictor, its weights (MODEL.WEIGHTS, the whole model) loaded by
    AtomicCheckpointer: no code runs from the file, and a partial checkpoint is refused instead
    of keeping a random init of what it lacks."""
    weights = cfg.MODEL.WEIGHTS
    empty = cfg.clone()
    empty.defrost()
    empty.MODEL.WEIGHTS = ""  # DefaultPredictor's own load: nothing to read
    predictor = DefaultPredictor(empty)
    AtomicCheckpointer(predictor.model, require_full_model=True).load(weights)
    return predictor


class ExportedPredictor:
    """
    detectron2's DefaultPredictor for an exported file: a BGR uint8 image (H, W, 3) in,
    ``{"instances": Instances}`` of that image out (boxes rescaled, masks pasted).
    """

    def __init__(self, cfg: CfgNode, path: Path):
        if not Path(path).is_file():
            raise ExportError(f"exported model not found: {path} (--exported)")
        self.cfg = cfg
        self.path = Path(path)
        self.run = load_exported(self.path)

    def __call__(self, bgr: np.ndarray) -> Dict[str, Instances]:
        height, width = bgr.shape[:2]
        image = preprocess(self.cfg, bgr)
        boxes, scores, classes, masks = self.run(image)
        resized = Instances(tuple(image.shape[1:]), pred_boxes=Boxes(boxes), scores=scores,
                            pred_classes=classes, pred_masks=masks)
        return {"instances": detector_postprocess(resized, height, width)}


def compare_outputs(ours: List[torch.Tensor], eager: List[torch.Tensor]) -> Dict[str, float]:
    """Largest differences of exported vs eager (boxes, scores, masks) and class agreement on
    one image; raw outputs as :class:`DetectionOutputs` gives them."""
    (b1, s1, c1, m1), (b2, s2, c2, m2) = ours, eager
    if len(b1) != len(b2):
        return {"detections": float(len(b1)), "eager_detections": float(len(b2)),
                "same_count": 0.0}
    inter = ((m1 > 0.5) & (m2 > 0.5)).flatten(1).sum(1).float()
    union = ((m1 > 0.5) | (m2 > 0.5)).flatten(1).sum(1).float()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return {
        "detections": float(len(b1)),
        "eager_detections": float(len(b2)),
        "same_count": 1.0,
        "max_box_diff": float((b1 - b2).abs().max()) if len(b1) else 0.0,
        "max_score_diff": float((s1 - s2).abs().max()) if len(s1) else 0.0,
        "classes_equal": float(torch.equal(c1, c2)),
        "max_mask_diff": float((m1 - m2).abs().max()) if len(m1) else 0.0,
        "min_mask_iou": float(iou.min()) if len(iou) else 1.0,
    }


def readable_images(paths: Sequence[Path], image_format: str, skipped: List[int]
                    ) -> Iterator[Tuple[int, np.ndarray]]:
    """(index, image) of each of ``paths`` that can be read, in ``image_format``; the index of
    each other one is logged and appended to ``skipped``: one unusable file never costs the
    results of the others (the tools' rule)."""
    for i, path in enumerate(paths):
        try:
            image = read_image(str(path), format=image_format)
        except Exception as e:  # whatever PIL raises for a file it cannot decode
            logger.warning(f"Skipping {path}: cannot read it ({type(e).__name__}: {e})")
            skipped.append(i)
            continue
        yield i, image


def skipped_images_line(names: Sequence[str], total: int) -> str:
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    return f"Skipped {len(names)} of {total} images that cannot be read: {shown}"
