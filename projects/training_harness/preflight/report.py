"""
The pre-flight report of a config's datasets: images and imbalance (dataset_stats.py), object
sizes against the anchors (anchor_coverage.py), the schedule and what the sampler shows
(schedule.py), and suggestions (suggestions.py); as a dict (the JSON file), as text, and the
short version train_net.py logs at set-up.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from balanced_rcnn.data.samplers import holds_objects
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

from .anchor_coverage import SIZE_BANDS, anchor_coverage, sample_object_images, training_scales
from .dataset_stats import dataset_statistics
from .schedule import iterations_per_epoch, times_seen
from .suggestions import format_overrides, no_anchor_share, suggest

__all__ = ["POSITIVES_BINS", "load_datasets", "preflight_report", "preflight_summary",
           "render_report", "summarize_coverage"]

POSITIVES_BINS = (("0", 0, 0), ("1", 1, 1), ("2-3", 2, 3), ("4-7", 4, 7), ("8+", 8, 10 ** 9))


def load_datasets(cfg: CfgNode, records: Optional[Dict[str, List[Dict]]] = None
                  ) -> Tuple[List[Dict], List[Dict], List[str], Dict[str, List]]:
    """(every training record, those the trainer keeps under DATALOADER.FILTER_EMPTY_ANNOTATIONS,
    the class names, {test set: records}) of registered datasets; a dataset in ``records``
    (registration's box records, data/box_records.py) is read from there."""
    def get(name: str) -> List[Dict]:
        return records[name] if records and name in records else DatasetCatalog.get(name)

    train = [r for name in cfg.DATASETS.TRAIN for r in get(name)]
    classes = list(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes)
    # What detectron2's filter_images_with_only_crowd_annotations keeps.
    kept = [r for r in train if holds_objects(r)] if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS \
        else train
    return train, kept, classes, {name: get(name) for name in cfg.DATASETS.TEST}


def summarize_coverage(coverage: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """Per-object arrays of one scale -> shares, means and the distribution by size band."""
    def stats(mask: np.ndarray) -> Dict[str, Any]:
        n = int(mask.sum())
        if not n:
            return {"objects": 0}
        positives = coverage["positives"][mask]
        return {
            "objects": n,
            "no_anchor_share": float((coverage["above"][mask] == 0).mean()),
            "anchors_above_mean": float(coverage["above"][mask].mean()),
            "positives_mean": float(positives.mean()),
            "best_iou_median": float(np.median(coverage["best_iou"][mask])),
            "positives_distribution": {label: float(((positives >= lo) & (positives <= hi)).mean())
                                       for label, lo, hi in POSITIVES_BINS},
        }

    sizes = coverage["size"]
    return {**stats(np.ones(len(sizes), dtype=bool)),
            "by_size": {label: stats((sizes >= lo) & (sizes < hi))
                        for label, lo, hi in SIZE_BANDS}}


def preflight_report(cfg: CfgNode, anchor_images: int = 200, target_epochs: float = 0.0,
                     datasets: Optional[Tuple] = None) -> Dict[str, Any]:
    """The whole report (module docstring) of registered datasets; ``anchor_images`` object
    images sampled for the anchor analysis (0: all)."""
    train, kept, classes, tests = datasets or load_datasets(cfg)
    stats = dataset_statistics(train, classes, tests)
    schedule = times_seen(cfg, kept, classes)

    images = sample_object_images(kept, anchor_images)  # one sample for every anchor set
    coverage = anchor_coverage(cfg, images)

    def recompute(c: CfgNode) -> Dict[int, Dict[str, np.ndarray]]:
        # The suggestions are judged at the smallest scale: only that one is recomputed.
        return anchor_coverage(c, images, scales=[min(coverage)])

    return {
        "config": {"DATASETS.TRAIN": list(cfg.DATASETS.TRAIN),
                   "DATASETS.TEST": list(cfg.DATASETS.TEST),
                   "anchor_sizes": [list(s) for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES],
                   "rpn_iou_thresholds": list(cfg.MODEL.RPN.IOU_THRESHOLDS)},
        "dataset": stats,
        "schedule": schedule,
        "anchors": {"sampled_images": anchor_images,
                    "by_scale": {scale: summarize_coverage(c) for scale, c in coverage.items()}},
        "suggestions": suggest(cfg, stats, schedule, coverage, recompute, target_epochs),
        "_coverage": coverage,  # per-object arrays for the figure; not in the JSON file
    }


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render_report(report: Dict[str, Any]) -> str:
    d, s, a = report["dataset"], report["schedule"], report["anchors"]
    lines = [
        f"== Images and imbalance ({', '.join(report['config']['DATASETS.TRAIN'])})",
        f"{d['images']} training images, {_pct(d['empty_share'])} without objects; "
        f"{d['objects']} objects, {d['objects_per_object_image']:.2f} per object image; crowd "
        f"share {_pct(d['crowd_share'])}",
        "classes by training images (head/tail ratio "
        + (f"{d['head_tail_ratio']:.1f}" if d["head_tail_ratio"] else "-")
        + "; group = the AP by class frequency group):",
    ]
    lines += [f"  {c['name']:<24} {c['images']:>8} images {c['instances']:>9} objects  "
              f"{c['group']}" for c in d["classes"]]
    for name, absent in d["absent_in_test"].items():
        lines.append(f"{name}: " + ("every class has an object" if not absent else
                                    f"no object of {', '.join(absent)} (AP undefined)"))
    fg = report["config"]["rpn_iou_thresholds"][-1]
    lines.append(f"== Objects against the anchors (sizes {report['config']['anchor_sizes']}, RPN "
                 f"foreground IoU {fg:g}; {a['sampled_images'] or 'all'} object images)")
    for scale, c in a["by_scale"].items():
        if not c["objects"]:
            continue
        lines.append(f"short edge {scale}: {c['objects']} objects, {_pct(c['no_anchor_share'])} "
                     f"without an anchor at IoU >= {fg:g}; positive anchors per object (the "
                     f"matcher's, low-quality matches included) mean {c['positives_mean']:.1f}")
        for band, b in c["by_size"].items():
            if b["objects"]:
                lines.append(f"  {band:>9}: {b['objects']:>7} objects, "
                             f"{_pct(b['no_anchor_share'])} without, best IoU median "
                             f"{b['best_iou_median']:.2f}, positives mean "
                             f"{b['positives_mean']:.1f}")
    lines.append(f"== Schedule ({s['sampler']})")
    lines.append(f"{s['training_images']} images trained on, {s['iterations_per_epoch']} "
                 f"iterations per epoch: {s['epochs']:.2f} epochs; checkpoint every "
                 f"{s['checkpoint_period_epochs']:.2f} epochs" + (
                     f", evaluation every {s['eval_period_epochs']:.2f}"
                     if s["eval_period_epochs"] else ""))
    if "seen_per_object_image" in s:
        paste = s["copy_paste"]
        rarest = min((c for c in s["seen_per_class_image"] if c["images"]),
                     key=lambda c: c["images"], default=None)
        lines.append(
            f"{_pct(s['object_share_sampled'])} of the sampled images hold objects"
            + (f" (with copy-paste, INPUT.COPY_PASTE.PROBABILITY {paste:g}: up to "
               f"{_pct(s['object_share_shown'])} show objects)" if paste else "")
            + f"; each object image is seen {s['seen_per_object_image']:.1f} times"
            + (f", each empty one {s['seen_per_empty_image']:.2f}"
               if s["seen_per_empty_image"] is not None else "")
            + (f", each image of the rarest class ({rarest['name']}, {rarest['images']} images) "
               f"{rarest['seen_per_image']:.1f}" if rarest else ""))
    lines.append("== Suggestions")
    suggestions = report["suggestions"]
    if not suggestions:
        lines.append("none: nothing above calls for a change")
    for item in suggestions:
        if "warning" in item:
            lines.append(f"- warning: {item['warning']}")
            continue
        lines.append(f"- {item['reason']}" + (f"; {item['checked']}" if "checked" in item
                                               else ""))
        lines.append(f"    {format_overrides(item['overrides'])}")
    every = [kv for item in suggestions for kv in item.get("overrides", [])]
    if every:
        lines.append("All of them: " + format_overrides(every))
    return "\n".join(lines)


def preflight_summary(cfg: CfgNode, kept: Sequence[Dict[str, Any]], anchor_images: int = 20
                      ) -> str:
    """The lines that matter, for train_net.py's set-up log: the empty share, the objects
    without an anchor at the smallest training scale (on ``anchor_images`` images), epochs."""
    empty = sum(not holds_objects(r) for r in kept) / max(len(kept), 1)
    scale = training_scales(cfg)[0]
    coverage = anchor_coverage(cfg, kept, anchor_images, scales=[scale])[scale]
    sampled = min(anchor_images, sum(holds_objects(r) for r in kept))
    epochs = cfg.SOLVER.MAX_ITER / iterations_per_epoch(max(len(kept), 1),
                                                        cfg.SOLVER.IMS_PER_BATCH)
    return (f"Pre-flight: {len(kept)} training images, {100 * empty:.1f}% without objects; "
            f"{100 * no_anchor_share(coverage):.1f}% of {len(coverage['size'])} objects (in "
            f"{sampled} images) without an anchor at IoU >= "
            f"{cfg.MODEL.RPN.IOU_THRESHOLDS[-1]:g} at short edge {scale}; SOLVER.MAX_ITER "
            f"{cfg.SOLVER.MAX_ITER} = {epochs:.2f} epochs. The full report: "
            "python tools/analyze_data.py --config-file <this config>")
