"""
Time the balanced losses against detectron2's on identical, realistically sized inputs.

    python benchmarks/bench_losses.py              # COCO-sized inputs (below)
    python benchmarks/bench_losses.py --tiny       # a few seconds; what the test suite runs
    python benchmarks/bench_losses.py --update-md  # ... and replace its section of BENCHMARKS.md

Inputs (default): 2 images of 800x1333; FPN P2-P6 anchors (sizes 32-512, 3 aspect ratios,
about 267k per image) labelled and sampled by detectron2 (256 per image); 512 sampled ROIs per
image with 80 classes, a quarter of them foreground; 28x28 mask logits for those foreground ROIs
with polygon ground truth (detectron2's default mask format).

Per head it prints the median time of stock detectron2's loss and of the balanced one, for the
loss alone ("forward") and with its backward pass, and the ratio balanced / stock. Stock
detectron2 writes its scalars to EventStorage inside the losses; the balanced heads keep them as
tensors, which the trainer moves to the host once per step: that flush is timed on its own and
added to the balanced side of the "all" rows. The row "roi_box_nostats" (not in "all") times the
balanced box losses with their statistics switched off: they log 8 scalars where stock logs 3,
and on sub-millisecond timings that shows. The table also goes to
benchmarks/results/bench_losses.md and .json (with --tiny only when --results-dir is given).
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_loss
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from balanced_rcnn import BalancedFastRCNNOutputLayers, add_balanced_rcnn_config
from balanced_rcnn.modeling import balanced_mask_rcnn_loss
from balanced_rcnn.utils.events import flush_tensor_scalars

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file
import common  # noqa: E402

NAME = "bench_losses"

SIZES = {
    # image (h, w), images, gt boxes per image, ROIs per image, classes, mask side, repeats
    "full": dict(image=(800, 1333), images=2, gt=7, rois=512, classes=80, mask=28, repeats=20),
    "tiny": dict(image=(96, 128), images=2, gt=3, rois=32, classes=5, mask=14, repeats=3),
}
STRIDES = (4, 8, 16, 32, 64)  # P2-P6


def _cfg(size: dict) -> CfgNode:
    cfg = get_cfg()
    add_balanced_rcnn_config(cfg)
    cfg.MODEL.RPN.IN_FEATURES = [f"p{int(math.log2(s))}" for s in STRIDES]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]  # one size per level
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = size["classes"]
    return cfg


def _random_boxes(n: int, height: int, width: int, g: torch.Generator) -> torch.Tensor:
    wh = torch.rand(n, 2, generator=g) * torch.tensor([width / 3, height / 3]) + 8
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([width, height]) - wh)
    return torch.cat([xy, xy + wh], dim=1)


def rpn_inputs(rpn, size: dict, device: torch.device, g: torch.Generator):
    """The arguments of RPN.losses, labelled and sampled by ``rpn`` (detectron2's code)."""
    height, width = size["image"]
    n = size["images"]
    features = [
        torch.zeros(n, 8, math.ceil(height / s), math.ceil(width / s), device=device)
        for s in STRIDES
    ]
    anchors = rpn.anchor_generator(features)
    gt = []
    for _ in range(n):
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(_random_boxes(size["gt"], height, width, g).to(device))
        gt.append(inst)
    labels, matched = rpn.label_and_sample_anchors(anchors, gt)
    logits = [torch.randn(n, len(a), generator=g).to(device).requires_grad_() for a in anchors]
    deltas = [
        (torch.randn(n, len(a), 4, generator=g) * 0.2).to(device).requires_grad_() for a in anchors
    ]
    return anchors, logits, labels, deltas, matched


def roi_inputs(size: dict, device: torch.device, g: torch.Generator):
    """Sampled proposals with their gt (a quarter foreground) and box-head predictions."""
    height, width = size["image"]
    k, per_image = size["classes"], size["rois"]
    proposals = []
    for _ in range(size["images"]):
        inst = Instances((height, width))
        boxes = _random_boxes(per_image, height, width, g)
        inst.proposal_boxes = Boxes(boxes.to(device))
        inst.gt_boxes = Boxes((boxes + torch.randn(per_image, 4, generator=g) * 4).to(device))
        classes = torch.full((per_image,), k)
        num_fg = per_image // 4
        classes[:num_fg] = torch.randint(0, k, (num_fg,), generator=g)
        inst.gt_classes = classes.to(device)
        proposals.append(inst)
    num_rois = per_image * size["images"]
    scores = torch.randn(num_rois, k + 1, generator=g).to(device).requires_grad_()
    deltas = (torch.randn(num_rois, 4 * k, generator=g) * 0.3).to(device).requires_grad_()
    return proposals, (scores, deltas)


def mask_inputs(proposals: List[Instances], size: dict, device: torch.device, g: torch.Generator):
    """The foreground proposals with polygon gt masks, and class-specific mask logits."""
    height, width = size["image"]
    angles = torch.linspace(0, 2 * math.pi, 17)[:-1]
    fg = []
    for inst in proposals:
        inst = inst[inst.gt_classes < size["classes"]]
        polygons = []
        for x0, y0, x1, y1 in inst.gt_boxes.tensor.cpu().tolist():
            cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, abs(x1 - x0) / 2, abs(y1 - y0) / 2
            ellipse = torch.stack([cx + rx * angles.cos(), cy + ry * angles.sin()], dim=1)
            polygons.append([ellipse.flatten().numpy()])
        inst.gt_masks = PolygonMasks(polygons)
        fg.append(inst)
    num_fg = sum(len(x) for x in fg)
    side = size["mask"]
    logits = torch.randn(num_fg, size["classes"], side, side, generator=g).to(device)
    return fg, logits.requires_grad_()


def _compare(
    stock: Callable[[], Dict[str, torch.Tensor]],
    balanced: Callable[[], Dict[str, torch.Tensor]],
    leaves: List[torch.Tensor],
    backward: bool,
    repeats: int,
    device: torch.device,
) -> Tuple[float, float]:
    """Median milliseconds of both, run alternately so that drifts of the machine hit both."""

    def run(fn):
        for leaf in leaves:
            leaf.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        losses = fn()
        if backward:
            sum(losses.values()).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    times = {stock: [], balanced: []}
    for i in range(repeats + 2):  # two warm-up rounds
        order = (stock, balanced) if i % 2 == 0 else (balanced, stock)
        for fn in order:
            elapsed = run(fn)
            if i >= 2:
                times[fn].append(elapsed)
    return statistics.median(times[stock]) * 1e3, statistics.median(times[balanced]) * 1e3


def _time_flush(balanced_losses: List[Callable], repeats: int) -> float:
    """Median milliseconds of the trainer's one flush of the tensor scalars of all heads."""
    times = []
    for i in range(repeats + 2):
        for fn in balanced_losses:
            fn()
        start = time.perf_counter()
        flush_tensor_scalars()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> Dict[Tuple[str, str], Tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small inputs, 3 repeats")
    parser.add_argument("--repeats", type=int, help="timed repetitions per measurement")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    common.add_output_arguments(parser, NAME)
    args = parser.parse_args(argv)
    size = SIZES["tiny" if args.tiny else "full"]
    repeats = args.repeats or size["repeats"]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)

    cfg = _cfg(size)
    with EventStorage():
        shapes = {
            f: ShapeSpec(channels=8, stride=s) for f, s in zip(cfg.MODEL.RPN.IN_FEATURES, STRIDES)
        }
        cfg.MODEL.PROPOSAL_GENERATOR.NAME = "RPN"
        stock_rpn = build_proposal_generator(cfg, shapes).to(device)
        rpn_args = rpn_inputs(stock_rpn, size, device, g)
        cfg.MODEL.PROPOSAL_GENERATOR.NAME = "BalancedRPN"
        balanced_rpn = build_proposal_generator(cfg, shapes).to(device)

        proposals, predictions = roi_inputs(size, device, g)
        box_features = ShapeSpec(channels=16)
        stock_box = FastRCNNOutputLayers(cfg, box_features).to(device)
        balanced_box = BalancedFastRCNNOutputLayers(cfg, box_features).to(device)
        balanced_box_no_stats = BalancedFastRCNNOutputLayers(cfg, box_features).to(device)
        balanced_box_no_stats._log_stats = lambda *args: None

        fg_proposals, mask_logits = mask_inputs(proposals, size, device, g)
        eps, sync = cfg.MODEL.BALANCED_LOSS.EPS, cfg.MODEL.BALANCED_LOSS.SYNC_NORMALIZERS

        heads = {
            "rpn": (
                lambda: stock_rpn.losses(*rpn_args),
                lambda: balanced_rpn.losses(*rpn_args),
                rpn_args[1] + rpn_args[3],
            ),
            "roi_box": (
                lambda: stock_box.losses(predictions, proposals),
                lambda: balanced_box.losses(predictions, proposals),
                list(predictions),
            ),
            "roi_box_nostats": (
                lambda: stock_box.losses(predictions, proposals),
                lambda: balanced_box_no_stats.losses(predictions, proposals),
                list(predictions),
            ),
            "mask": (
                lambda: {"loss_mask": mask_rcnn_loss(mask_logits, fg_proposals)},
                lambda: {
                    "loss_mask": balanced_mask_rcnn_loss(
                        mask_logits, fg_proposals, eps=eps, sync_normalizers=sync
                    )
                },
                [mask_logits],
            ),
        }
        results = {}
        for name, (stock, balanced, leaves) in heads.items():
            for backward in (False, True):
                mode = "fwd+bwd" if backward else "forward"
                results[name, mode] = _compare(stock, balanced, leaves, backward, repeats, device)
        flush_ms = _time_flush([heads[h][1] for h in ("rpn", "roi_box", "mask")], repeats)

    losses = ("rpn", "roi_box", "mask")
    for mode in ("forward", "fwd+bwd"):
        results["all", mode] = (
            sum(results[h, mode][0] for h in losses),
            sum(results[h, mode][1] for h in losses) + flush_ms,
        )
    num_anchors = sum(len(a) for a in rpn_args[0])
    inputs = (
        f"device {device}, threads {torch.get_num_threads()}, torch {torch.__version__}; "
        f"{size['images']} images {size['image'][0]}x{size['image'][1]}, {num_anchors} anchors "
        f"per image, {size['rois']} ROIs per image, {size['classes']} classes, "
        f"{mask_logits.shape[0]} masks {size['mask']}x{size['mask']}; median of {repeats}"
    )
    print(inputs)
    print(f"{'head':<15} {'pass':<8} {'stock ms':>9} {'balanced ms':>12} {'balanced/stock':>15}")
    for (name, mode), (stock_ms, balanced_ms) in results.items():
        if (name, mode) == ("all", "forward"):
            print(f"{'flush':<15} {'':<8} {'-':>9} {flush_ms:>12.2f} {'-':>15}")
        ratio = balanced_ms / stock_ms
        print(f"{name:<15} {mode:<8} {stock_ms:>9.2f} {balanced_ms:>12.2f} {ratio:>15.2f}")
    results_dir = common.results_dir(args, tiny=args.tiny)
    if results_dir is not None:
        write_results(results, flush_ms, inputs, args, argv, results_dir)
    return results


def write_results(
    results: Dict[Tuple[str, str], Tuple[float, float]],
    flush_ms: float,
    inputs: str,
    args: argparse.Namespace,
    argv: Optional[List[str]],
    results_dir: Path,
) -> None:
    """The printed table as markdown + JSON (benchmarks/common.py), optionally in BENCHMARKS.md."""
    rows = [
        [name, mode, f"{stock_ms:.2f}", f"{balanced_ms:.2f}", f"{balanced_ms / stock_ms:.3f}"]
        for (name, mode), (stock_ms, balanced_ms) in results.items()
    ]
    body = common.markdown_table(
        ["head", "pass", "stock ms", "balanced ms", "balanced/stock"], rows
    )
    notes = [
        inputs,
        f"The balanced side of the \"all\" rows includes the once-per-step flush of the heads' "
        f"tensor scalars ({flush_ms:.2f} ms); stock detectron2 logs inside its losses.",
        "roi_box_nostats (not in \"all\"): the balanced box losses without their statistics "
        "(8 logged scalars: accuracies, sample counts, normalizers); stock as in roi_box, with "
        "its 3.",
    ]
    data = {
        "tiny": args.tiny,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "flush_ms": flush_ms,
        "results_ms": [
            {"head": name, "pass": mode, "stock": stock_ms, "balanced": balanced_ms}
            for (name, mode), (stock_ms, balanced_ms) in results.items()
        ],
    }
    markdown = common.write_results(
        NAME, "Losses alone: balanced vs stock (bench_losses.py)", body, data,
        common.command_line(__file__, argv), results_dir, notes,
    )
    if args.update_md:
        common.update_benchmarks_md(NAME, markdown)


if __name__ == "__main__":
    main()
