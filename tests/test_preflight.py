"""The pre-flight report (preflight/): counts on hand-made records, a box that no anchor matches,
detectron2's anchors and matcher against a brute-force count, what the sampler shows, the
suggestions (checked), and the tiny config's anchor numbers on the synthetic shapes."""

import itertools
import math

import numpy as np
import pytest
import torch
from detectron2.structures import BoxMode

from training_harness.preflight.anchor_coverage import AnchorMatching, anchor_coverage
from training_harness.preflight.dataset_stats import dataset_statistics
from training_harness.preflight.report import preflight_report, preflight_summary, render_report
from training_harness.preflight.schedule import times_seen
from training_harness.preflight.suggestions import no_anchor_share

TINY = "configs/quick_schedules/swin_tiny_balanced_demo.yaml"


@pytest.fixture
def tiny(repo_root):
    """The CPU demo's config with KEY VALUE overrides."""
    from training_harness.config import load_project_config

    return lambda *opts: load_project_config(str(repo_root / TINY), list(opts))


def _ann(x, y, w, h, c, crowd=0):
    return {"bbox": [x, y, w, h], "bbox_mode": BoxMode.XYWH_ABS, "category_id": c,
            "iscrowd": crowd}


def _records(num_empty=6):
    """128x128 images: class 0 in 3 images (4 objects), class 1 in 1, a crowd-only image, and
    ``num_empty`` empty ones."""
    objects = [[_ann(10, 10, 16, 16, 0), _ann(60, 60, 20, 20, 0)], [_ann(30, 30, 12, 12, 0)],
               [_ann(5, 5, 2, 2, 0), _ann(70, 20, 24, 16, 1)], [_ann(0, 0, 40, 40, 2, crowd=1)]]
    records = [{"image_id": i, "height": 128, "width": 128, "file_name": f"{i}.png",
                "annotations": anns} for i, anns in enumerate(objects)]
    return records + [{"image_id": 10 + i, "height": 128, "width": 128,
                       "file_name": f"e{i}.png", "annotations": []} for i in range(num_empty)]


def test_dataset_statistics_by_hand():
    val = [{"annotations": [_ann(0, 0, 4, 4, 0)]}]
    stats = dataset_statistics(_records(), ["a", "b", "c"], {"val": val})
    assert (stats["images"], stats["object_images"], stats["objects"]) == (10, 3, 5)
    assert stats["empty_share"] == pytest.approx(0.7)  # 6 empty + 1 crowd-only of 10
    assert stats["objects_per_object_image"] == pytest.approx(5 / 3)
    assert stats["crowd_share"] == pytest.approx(1 / 6)
    assert [(c["name"], c["images"], c["instances"], c["group"]) for c in stats["classes"]] == [
        ("a", 3, 4, "APf"), ("b", 1, 1, "APc"), ("c", 0, 0, "APr")]
    assert stats["head_tail_ratio"] == 3.0  # classes with images: 3 / 1
    assert stats["classes_without_images"] == ["c"]
    assert stats["classes_with_few_images"] == ["a", "b"]
    assert stats["absent_in_test"] == {"val": ["b", "c"]}


def _brute_force(cfg, box, height, width):
    """Best IoU and anchors at IoU >= the threshold, from ANCHOR_GENERATOR's definition
    (cell anchors of each size and aspect ratio, centred on every offset*stride + k*stride)."""
    gen = cfg.MODEL.ANCHOR_GENERATOR
    best, above = 0.0, 0
    for sizes, stride in zip(gen.SIZES, (4, 8, 16, 32, 64)):
        for size, ratio in itertools.product(sizes, gen.ASPECT_RATIOS[0]):
            w = math.sqrt(size * size / ratio)
            h = w * ratio
            for i, j in itertools.product(range(math.ceil(height / stride)),
                                          range(math.ceil(width / stride))):
                cy, cx = (i + gen.OFFSET) * stride, (j + gen.OFFSET) * stride
                ix = max(0.0, min(box[2], cx + w / 2) - max(box[0], cx - w / 2))
                iy = max(0.0, min(box[3], cy + h / 2) - max(box[1], cy - h / 2))
                inter = ix * iy
                iou = inter / ((box[2] - box[0]) * (box[3] - box[1]) + w * h - inter)
                best = max(best, iou)
                above += iou >= cfg.MODEL.RPN.IOU_THRESHOLDS[-1]
    return best, above


def test_matching_against_a_brute_force_count(tiny):
    cfg = tiny()
    matching = AnchorMatching.from_config(cfg)
    boxes = [(0.0, 0.0, 16.0, 16.0), (37.0, 50.0, 61.0, 66.0), (100.0, 3.0, 127.0, 30.0)]
    best, above, positives = matching.match(torch.tensor(boxes), 128, 128)
    for k, box in enumerate(boxes):
        expected_best, expected_above = _brute_force(cfg, box, 128, 128)
        assert best[k].item() == pytest.approx(expected_best, abs=1e-5)
        assert above[k].item() == expected_above
        assert positives[k] >= above[k]  # the matcher's positives include them


def test_a_box_no_anchor_matches_gets_only_its_best_anchors(tiny):
    cfg = tiny()
    best, above, positives = AnchorMatching.from_config(cfg).match(
        torch.tensor([[41.0, 41.0, 43.0, 43.0]]), 128, 128)
    # 2x2 px inside 16x16 anchors: IoU 4 / 256 at best, nothing at the threshold 0.5; the
    # matcher's low-quality matches still label its best anchors (those holding the box).
    assert best.item() == pytest.approx(4 / 256) and above.item() == 0
    assert positives.item() >= 1


def test_times_seen_under_the_object_share(tiny):
    cfg = tiny("SOLVER.MAX_ITER", "100", "SOLVER.IMS_PER_BATCH", "4",
               "DATALOADER.SAMPLER_TRAIN", "ObjectShareTrainingSampler")
    seen = times_seen(cfg, _records(), ["a", "b", "c"])
    # 10 images at 4 per step: 3 iterations per epoch; 100 iterations = 33.3 epochs. Share 0.5:
    # 3 object images r = 0.5*10/3, 7 others (crowd-only counts as empty) 0.5*10/7; 400 draws.
    assert seen["iterations_per_epoch"] == 3 and seen["epochs"] == pytest.approx(100 / 3)
    assert seen["seen_per_object_image"] == pytest.approx(400 * 0.5 / 3)
    assert seen["seen_per_empty_image"] == pytest.approx(400 * 0.5 / 7)
    assert seen["seen_per_class_image"][1] == {"name": "b", "images": 1,
                                               "seen_per_image": pytest.approx(400 * 0.5 / 3)}
    # The shipped class-aware share (t = 1): the images of a (3 of 10 images) and of b (1 of 10,
    # with a) drawn as sqrt(10 / 3) : sqrt(10), their 200 draws split in that proportion.
    cfg.DATALOADER.SAMPLER_TRAIN = "ClassAwareObjectShareTrainingSampler"
    seen = times_seen(cfg, _records(), ["a", "b", "c"])
    assert seen["seen_per_object_image"] == pytest.approx(400 * 0.5 / 3)
    assert seen["seen_per_class_image"][1]["seen_per_image"] == pytest.approx(
        200 * math.sqrt(10) / (2 * math.sqrt(10 / 3) + math.sqrt(10)), rel=1e-5)
    # Copy-paste onto half the sampled empty images: up to 0.5 + 0.5 * 0.5 show objects.
    assert seen["copy_paste"] == 0.5 and seen["object_share_shown"] == pytest.approx(0.75)
    cfg.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"
    cfg.INPUT.COPY_PASTE.PROBABILITY = 0.0
    seen = times_seen(cfg, _records(), ["a", "b", "c"])
    assert seen["seen_per_empty_image"] == pytest.approx(40)
    assert seen["object_share_shown"] == seen["object_share_sampled"] == pytest.approx(0.3)


def test_report_suggestions_are_checked(tiny):
    # detectron2's defaults for 128-px images of small objects: TrainingSampler, no copy-paste,
    # empty images dropped, anchors 32-512 at RPN IoU 0.7.
    cfg = tiny("DATALOADER.SAMPLER_TRAIN", "TrainingSampler", "INPUT.COPY_PASTE.PROBABILITY", "0.0",
               "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "True",
               "MODEL.ANCHOR_GENERATOR.SIZES", "[[32], [64], [128], [256], [512]]",
               "MODEL.RPN.IOU_THRESHOLDS", "[0.3, 0.7]")
    records = _records()
    kept = [r for r in records if any(not a["iscrowd"] for a in r["annotations"])]
    report = preflight_report(cfg, anchor_images=0, target_epochs=12,
                              datasets=(records, kept, ["a", "b", "c"], {}))
    overrides = {k: v for s in report["suggestions"] for k, v in s.get("overrides", [])}
    assert overrides["DATALOADER.FILTER_EMPTY_ANNOTATIONS"] == "False"
    # What ships: the class-aware share at 0.5, RFS's threshold 1, copy-paste 0.5.
    assert overrides["DATALOADER.SAMPLER_TRAIN"] == "ClassAwareObjectShareTrainingSampler"
    assert (overrides["DATALOADER.OBJECT_IMAGE_SHARE"], overrides["DATALOADER.REPEAT_THRESHOLD"],
            overrides["INPUT.COPY_PASTE.PROBABILITY"]) == ("0.5", "1.0", "0.5")
    # 3 kept images at 4 per step: 1 iteration per epoch.
    assert overrides["SOLVER.MAX_ITER"] == "12"
    anchors = next(s for s in report["suggestions"] if "MODEL.RPN.IOU_THRESHOLDS" in dict(
        s.get("overrides", [])) or "MODEL.ANCHOR_GENERATOR.SIZES" in dict(s.get("overrides", [])))
    now = report["anchors"]["by_scale"][128]["no_anchor_share"]
    assert now > 0.25
    # The suggestion was recomputed on the same objects, and does better.
    after = float(anchors["checked"].split("with these overrides: ")[1].split("%")[0]) / 100
    assert after < now
    # What it states is what the whole analysis gives with its overrides applied.
    applied = cfg.clone()
    applied.merge_from_list([x for kv in anchors["overrides"] for x in kv])
    full = anchor_coverage(applied, kept)[128]
    assert anchors["checked"] == (
        f"with these overrides: {100 * no_anchor_share(full):.1f}% without an anchor at IoU >= "
        f"{applied.MODEL.RPN.IOU_THRESHOLDS[-1]:g}")
    text = render_report(report)
    assert "== Suggestions" in text and "All of them: " in text
    # Empty images dropped, no copy-paste: every sampled image holds objects, nothing pasted.
    assert "\n100.0% of the sampled images hold objects; each object image is seen" in text


def test_report_states_the_share_shown_with_copy_paste(tiny):
    cfg = tiny("DATALOADER.SAMPLER_TRAIN", "ObjectShareTrainingSampler",
               "INPUT.COPY_PASTE.PROBABILITY", "0.5")
    records = _records()
    report = preflight_report(cfg, anchor_images=0, datasets=(records, records, ["a", "b", "c"],
                                                               {}))
    assert ("\n50.0% of the sampled images hold objects (with copy-paste, "
            "INPUT.COPY_PASTE.PROBABILITY 0.5: up to 75.0% show objects); each object image is "
            "seen ") in render_report(report)


def test_tiny_config_anchor_numbers_on_the_synthetic_shapes(tmp_path, monkeypatch, tiny):
    """What configs/quick_schedules/Base-BalancedRCNN-TinySwin-CPU.yaml's comments and
    docs/data.md state: on synthetic_shapes_train at 128 px, about 7.6 positive anchors per
    object at RPN IoU 0.5, 1.4 at detectron2's 0.7, and about 1 with anchors of twice the
    stride at 0.7 (best IoU median 0.57)."""
    from detectron2.data import DatasetCatalog

    monkeypatch.setenv("BALANCED_RCNN_DATASETS", str(tmp_path))
    records = DatasetCatalog.get("synthetic_shapes_train")

    def coverage(*opts):
        return anchor_coverage(tiny(*opts), records)[128]

    shipped = coverage()
    assert len(shipped["size"]) == 1824
    assert shipped["positives"].mean() == pytest.approx(7.6, abs=0.05)
    assert coverage("MODEL.RPN.IOU_THRESHOLDS", "[0.3, 0.7]")["positives"].mean() == \
        pytest.approx(1.37, abs=0.01)
    small = coverage("MODEL.RPN.IOU_THRESHOLDS", "[0.3, 0.7]", "MODEL.ANCHOR_GENERATOR.SIZES",
                     "[[8], [16], [32], [64], [128]]")
    assert small["positives"].mean() == pytest.approx(1.04, abs=0.01)
    assert float(np.median(small["best_iou"])) == pytest.approx(0.57, abs=0.01)


def test_summary_line(tiny):
    cfg = tiny("SOLVER.MAX_ITER", "30", "SOLVER.IMS_PER_BATCH", "4")
    line = preflight_summary(cfg, _records(), anchor_images=20)
    assert line.startswith("Pre-flight: 10 training images, 70.0% without objects; ")
    assert "20.0% of 5 objects (in 3 images) without an anchor at IoU >= 0.5" in line
    assert "SOLVER.MAX_ITER 30 = 10.00 epochs" in line


@pytest.mark.parametrize("opts", [
    [],  # the COCO config: anchors 8x the stride, RPN IoU 0.7
    # Anchors as large as the stride: a box's best anchor can sit on a level whose bound is far
    # below the best level's (the grid misses the box there).
    ["MODEL.ANCHOR_GENERATOR.SIZES", "[[4], [8], [16], [32], [64]]"],
])
def test_matching_on_the_candidate_anchors_equals_matching_on_all(repo_root, opts):
    """AnchorMatching matches each image's boxes against the anchors near them only; detectron2's
    matcher on every anchor of the image gives the same numbers (800 px)."""
    from detectron2.structures import Boxes, pairwise_iou
    from training_harness.config import load_project_config

    matching = AnchorMatching.from_config(
        load_project_config(str(repo_root / "configs/swin_balanced.yaml"), opts))
    anchors, _ = matching.anchors(800, 1216)
    generator = torch.Generator().manual_seed(0)
    images = [torch.tensor([[300.9, 306.4, 317.5, 319.3], [10.0, 10.0, 10.0, 30.0]])]
    for _ in range(5):
        xy = torch.rand(7, 2, generator=generator) * 600
        wh = torch.exp(torch.rand(7, 2, generator=generator) * 4.6 + 1.4)  # 4-400 px
        images.append(torch.cat([xy, xy + wh], dim=1))
    for boxes in images:  # the first with a box of no area: every anchor its match
        iou = pairwise_iou(Boxes(boxes), Boxes(anchors))
        matched, labels = matching.matcher(iou)
        everything = (iou.max(dim=1).values, (iou >= matching.fg_threshold).sum(dim=1),
                      torch.bincount(matched[labels == 1], minlength=len(boxes)))
        for ours, theirs in zip(matching.match(boxes, 800, 1216), everything):
            assert torch.equal(ours, theirs)
