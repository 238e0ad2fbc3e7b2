"""COCO json problems that detectron2 drops silently or meets only when the image is sampled:
refused (or skipped with RELIABILITY.BAD_ANNOTATIONS skip) at registration, naming the json, the
annotation id, the image id and file."""

import json
import logging
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog
from training_harness import register_datasets_from_config
from training_harness.data.checks import check_coco_annotations

from coco_builders import SIZE, annotation, coco_cfg, write_coco

pytestmark = pytest.mark.usefixtures("forget_bad_datasets")


def _refusal(cfg) -> str:
    with pytest.raises(ValueError) as info:
        register_datasets_from_config(cfg)
    return str(info.value)


def test_duplicate_image_ids_are_named_with_their_files(tmp_path: Path):
    images = [{"id": i, "file_name": f"{i}.png", "height": SIZE, "width": SIZE} for i in (1, 2, 3)]
    images[2]["id"] = 2  # 3.png reuses 2.png's id: detectron2 would load one of them
    json_file, root = write_coco(tmp_path, num_images=3, images=images,
                                 annotations=[annotation(1, 1), annotation(2, 2)])
    assert _refusal(coco_cfg("bad_dup_images", json_file, root)) == (
        f"'{json_file}' has 1 invalid image or annotation entries:\n"
        "  image id 2 is used by 2 images ('2.png', '3.png'); detectron2 would keep only one")


def test_duplicate_annotation_ids_are_named(tmp_path: Path):
    json_file, root = write_coco(tmp_path, annotations=[annotation(1, 1), annotation(1, 3)])
    assert _refusal(coco_cfg("bad_dup_anns", json_file, root)) == (
        f"'{json_file}' has 1 invalid image or annotation entries:\n"
        "  annotation id 1 is used by 2 annotations (of image ids 1, 3)")


def test_rle_of_a_non_crowd_object_under_polygon_masks_names_the_fix(tmp_path: Path):
    annotations = [annotation(1, 1), annotation(2, 2)]
    annotations[1]["segmentation"] = {"size": [SIZE, SIZE], "counts": "PPYo0"}
    json_file, root = write_coco(tmp_path, annotations=annotations)
    cfg = coco_cfg("bad_rle", json_file, root)
    cfg.MODEL.MASK_ON = True
    assert _refusal(cfg).endswith(
        "annotation id 2 (image id 2, '2.png'): its segmentation is an RLE mask, which "
        "INPUT.MASK_FORMAT polygon cannot use for a non-crowd object; set INPUT.MASK_FORMAT "
        "bitmask")
    cfg = coco_cfg("bad_rle_bitmask", json_file, root)
    cfg.MODEL.MASK_ON, cfg.INPUT.MASK_FORMAT = True, "bitmask"
    register_datasets_from_config(cfg)  # what bitmask is for
    cfg = coco_cfg("bad_rle_boxes_only", json_file, root)
    register_datasets_from_config(cfg)  # MODEL.MASK_ON False: no mask is read
    cfg = coco_cfg("bad_rle_val", json_file, root)
    cfg.MODEL.MASK_ON, cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = True, (), ("bad_rle_val",)
    register_datasets_from_config(cfg)  # evaluation reads RLE through pycocotools


@pytest.mark.parametrize("case", ["no-key", "empty"])
def test_missing_segmentation_under_mask_on_is_refused_or_skipped(tmp_path, caplog, case):
    annotations = [annotation(i, i) for i in (1, 2, 3)]
    if case == "no-key":
        del annotations[1]["segmentation"]
        shown = "None"
    else:
        annotations[1]["segmentation"] = []
        shown = "[]"
    json_file, root = write_coco(tmp_path, num_images=3, annotations=annotations)
    cfg = coco_cfg("bad_no_segm", json_file, root)
    cfg.MODEL.MASK_ON = True
    culprit = ("annotation id 2 (image id 2, '2.png'): has no segmentation, which MODEL.MASK_ON "
               f"needs for every non-crowd object (segmentation: {shown})")
    assert _refusal(cfg) == (f"'{json_file}' has 1 annotations that cannot be trained on:\n  "
                             f"{culprit}\nFix them, or set RELIABILITY.BAD_ANNOTATIONS skip to "
                             "drop them (each is logged).")
    cfg = coco_cfg("bad_no_segm_skip", json_file, root)
    cfg.MODEL.MASK_ON, cfg.RELIABILITY.BAD_ANNOTATIONS = True, "skip"
    with caplog.at_level(logging.WARNING):
        register_datasets_from_config(cfg)
    assert culprit in caplog.text
    dicts = DatasetCatalog.get("bad_no_segm_skip")
    assert [len(d["annotations"]) for d in dicts] == [1, 0, 1]


def test_box_outside_its_image_is_refused_or_skipped(tmp_path: Path, caplog):
    annotations = [annotation(1, 1), annotation(2, 2, x=SIZE + 5), annotation(3, 3, x=SIZE - 4),
                   dict(annotation(4, 3, x=SIZE + 5), iscrowd=1)]  # crowd: not trained on
    json_file, root = write_coco(tmp_path, num_images=3, annotations=annotations)
    culprit = (f"annotation id 2 (image id 2, '2.png'): bbox [37, 37, 12, 12] lies outside its "
               f"{SIZE}x{SIZE} image (zero area after clipping)")
    message = _refusal(coco_cfg("bad_outside", json_file, root))
    assert f"has 1 annotations that cannot be trained on:\n  {culprit}\n" in message
    # Annotation 3 sticks out by 8 pixels: clipped by detectron2, kept.
    cfg = coco_cfg("bad_outside_skip", json_file, root)
    cfg.RELIABILITY.BAD_ANNOTATIONS = "skip"
    with caplog.at_level(logging.WARNING):
        register_datasets_from_config(cfg)
    assert culprit in caplog.text
    assert [[a["bbox"] for a in d["annotations"]] for d in DatasetCatalog.get(
        "bad_outside_skip")] == [[[4, 4, 12, 12]], [], [[28, 28, 12, 12], [37, 37, 12, 12]]]


def test_training_set_without_any_annotation_is_warned_about(tmp_path: Path, caplog):
    json_file, root = write_coco(tmp_path, annotations=[])
    with caplog.at_level(logging.WARNING):
        register_datasets_from_config(coco_cfg("bad_unlabelled", json_file, root))
    assert (f"DATASETS.TRAIN: dataset 'bad_unlabelled' ({json_file}) has no annotation at all: "
            "the model can only learn to detect nothing.") in caplog.text
    caplog.clear()
    cfg = coco_cfg("bad_unlabelled_test", json_file, root)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ("bad_unlabelled_test",)
    with caplog.at_level(logging.WARNING):
        register_datasets_from_config(cfg)
    assert "no annotation at all" not in caplog.text  # a test set may be unlabelled


@pytest.mark.parametrize("box, problem", [
    ([1, 2, 3, 4], None),
    ([1.5, 2, 3.25, 4], None),
    ([-5, -5, 6, 6], None),  # 1 x 1 pixel left after clipping
    # Four finite values whose sum overflows: the exact path decides.
    ([1e308, 0, 1e308, 10], "lies outside its 32x32 image"),
    ([-5, 0, 5, 10], "lies outside its 32x32 image"),  # ends on the left edge
    ([0, 32, 10, 10], "lies outside its 32x32 image"),  # starts on the bottom edge
    ([True, 0, 5, 5], "is not [x, y, width, height]"),  # json's true is no coordinate
    ([float("nan"), 0, 5, 5], "is not [x, y, width, height]"),
    ([0, 0, float("inf"), 5], "is not [x, y, width, height]"),
    (["1", 0, 5, 5], "is not [x, y, width, height]"),
    ([0, 0, 5], "is not [x, y, width, height]"),
    ((0, 0, 5, 5), "is not [x, y, width, height]"),  # json gives lists only
    ([0, 0, 0, 5], "has zero area"),
])
def test_box_rule_on_each_kind_of_value(box, problem):
    coco = {"images": [{"id": 1, "file_name": "1.png", "height": 32, "width": 32}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": box,
                             "iscrowd": 0}],
            "categories": [{"id": 1, "name": "thing"}]}
    if problem is None:
        assert check_coco_annotations(coco, "boxes.json") == set()
        return
    with pytest.raises(ValueError) as info:
        check_coco_annotations(coco, "boxes.json")
    assert str(info.value).startswith(
        "'boxes.json' has 1 annotations that cannot be trained on:\n  annotation id 7 "
        f"(image id 1, '1.png'): bbox {box!r} ")
    assert problem in str(info.value)


def test_one_file_under_two_image_ids_is_refused(tmp_path: Path):
    images = [{"id": i, "file_name": f"{i}.png", "height": SIZE, "width": SIZE} for i in (1, 2, 3)]
    images[2]["file_name"] = "1.png"  # id 3 is 1.png again
    json_file, root = write_coco(tmp_path, num_images=3, images=images,
                                 annotations=[annotation(1, 1), annotation(2, 3)])
    assert _refusal(coco_cfg("bad_dup_files", json_file, root)) == (
        f"'{json_file}' has 1 invalid image or annotation entries:\n"
        "  image file '1.png' is listed under 2 image ids (1, 3): its objects would be counted "
        "once per id, and a detector would be scored against each copy")


def test_image_sizes_must_be_positive_numbers(tmp_path: Path):
    images = [{"id": 1, "file_name": "1.png", "height": SIZE, "width": "32"},
              {"id": 2, "file_name": "2.png", "height": 0, "width": SIZE}]
    json_file, root = write_coco(tmp_path, num_images=2, images=images,
                                 annotations=[annotation(1, 1)])
    message = _refusal(coco_cfg("bad_sizes", json_file, root))
    assert "images[0] (id 1): height and width must be positive numbers, got 32 and '32'" in message
    assert "images[1] (id 2): height and width must be positive numbers, got 0 and 32" in message


def test_duplicate_category_names_are_refused(tmp_path: Path):
    json_file, root = write_coco(tmp_path)
    coco = json.loads(json_file.read_text())
    coco["categories"] = [{"id": 3, "name": "car"}, {"id": 7, "name": "car"}]
    json_file.write_text(json.dumps(coco))
    assert _refusal(coco_cfg("bad_dup_names", json_file, root)) == (
        f"'{json_file}': categories share a name ('car': ids 3, 7); their per-class AP would "
        "overwrite each other in metrics.json. Give each its own name, or merge them into one "
        "category")


def test_polygons_that_do_not_match_their_box(tmp_path: Path, caplog):
    shifted = annotation(2, 2)
    shifted["segmentation"] = [[v + 10 for v in shifted["segmentation"][0]]]
    xyxy = annotation(3, 3, x=18)
    xyxy["bbox"] = [18, 18, 30, 30]  # x1, y1, x2, y2 of the 12 x 12 square at (18, 18)
    json_file, root = write_coco(tmp_path, num_images=3,
                                 annotations=[annotation(1, 1), shifted, xyxy])
    message = _refusal(coco_cfg("bad_extent", json_file, root))
    assert ("annotation id 2 (image id 2, '2.png'): bbox [4, 4, 12, 12] and its polygons' extent "
            "[14, 14, 26, 26] (x1, y1, x2, y2) overlap at IoU 0.01 < 0.5: one of them is wrong.\n"
            ) in message
    assert ("annotation id 3 (image id 3, '3.png'): bbox [18, 18, 30, 30] and its polygons' "
            "extent [18, 18, 30, 30] (x1, y1, x2, y2) overlap at IoU 0.16 < 0.5: one of them is "
            "wrong. It matches the bbox read as [x1, y1, x2, y2]: COCO's bbox is [x, y, width, "
            "height].") in message
    # The square drawn around its polygon (annotation 1) passes; skip drops the two.
    cfg = coco_cfg("bad_extent_skip", json_file, root)
    cfg.RELIABILITY.BAD_ANNOTATIONS = "skip"
    register_datasets_from_config(cfg)
    assert [len(d["annotations"]) for d in DatasetCatalog.get("bad_extent_skip")] == [1, 0, 0]


def test_a_training_set_of_crowd_regions_only_is_warned_about(tmp_path: Path, caplog):
    json_file, root = write_coco(tmp_path, annotations=[
        dict(annotation(i, i), iscrowd=1) for i in (1, 2)])
    with caplog.at_level(logging.WARNING):
        register_datasets_from_config(coco_cfg("bad_all_crowd", json_file, root))
    assert (f"DATASETS.TRAIN: every annotation of dataset 'bad_all_crowd' ({json_file}) is "
            "iscrowd, and crowd regions are not trained on") in caplog.text


def test_a_test_set_without_images_is_refused(tmp_path: Path):
    json_file, root = write_coco(tmp_path / "train")
    empty, empty_root = write_coco(tmp_path / "val", num_images=0, annotations=[])
    cfg = coco_cfg("bad_train_ok", json_file, root)
    cfg.DATASETS.REGISTER_COCO.append(["bad_val_empty", str(empty), str(empty_root)])
    cfg.DATASETS.TEST = ("bad_val_empty",)
    assert _refusal(cfg) == (f"DATASETS.TEST: dataset 'bad_val_empty' ({empty}) has no images: "
                             "there is nothing to evaluate")


def _one_image_coco(**annotation_fields):
    ann = dict(annotation(7, 1), **annotation_fields)
    return {"images": [{"id": 1, "file_name": "1.png", "height": SIZE, "width": SIZE}],
            "annotations": [ann], "categories": [{"id": 3, "name": "dog"}]}


# Values that detectron2 or pycocotools would misread or fail on after training started.
@pytest.mark.parametrize("fields, problem", [
    ({"iscrowd": "0"}, "iscrowd must be 0 or 1 (detectron2 reads any other true value, even "
                       "\"0\", as a crowd region), got '0'"),
    ({"iscrowd": 2}, "iscrowd must be 0 or 1"),
    ({"area": "144"}, "area must be a number >= 0 (COCO evaluation sorts the objects into small, "
                      "medium and large by it), got '144'"),
    ({"area": -1}, "area must be a number >= 0"),
    ({"area": float("nan")}, "area must be a number >= 0"),
    ({"category_id": [3]}, "category_id [3] is not in 'categories' (ids: 3)"),
])
def test_annotation_fields_of_the_wrong_type_are_refused(fields, problem):
    with pytest.raises(ValueError) as info:
        check_coco_annotations(_one_image_coco(**fields), "f.json")
    assert str(info.value).startswith("'f.json' has 1 invalid image or annotation entries:\n  "
                                      f"annotation id 7 (image id 1, '1.png'): {problem}")


@pytest.mark.parametrize("segmentation, problem", [
    ([["4", "4", "16", "4", "16", "16"]], "segmentation polygons hold values that are not finite "
                                          "numbers"),
    ([[4, 4, "16", 4, 16, 16]], "segmentation polygons hold values that are not finite numbers"),
    ([[4, 4, float("nan"), 4, 16, 16]], "segmentation polygons hold values that are not finite "
                                        "numbers"),
    ({"counts": "PPYo0", "size": [SIZE, 2 * SIZE]}, "segmentation is an RLE mask without "
     "'counts', or whose 'size' [32, 64] is not its image's [height, width] [32, 32]"),
    ({"size": [SIZE, SIZE]}, "segmentation is an RLE mask without 'counts'"),
])
def test_segmentations_that_cannot_be_decoded_are_refused(segmentation, problem):
    for crowd in (0, 1):  # a crowd region's mask is read too (evaluation, ignored regions)
        with pytest.raises(ValueError) as info:
            check_coco_annotations(_one_image_coco(segmentation=segmentation, iscrowd=crowd),
                                   "f.json", mask_format="bitmask")
        assert "annotation id 7 (image id 1, '1.png'): " + problem in str(info.value)


@pytest.mark.parametrize("images, problem", [
    ([{"id": [1], "file_name": "1.png", "height": SIZE, "width": SIZE}],
     "images[0]: id must be an int or a string (detectron2 sorts the ids), got [1]"),
    ([{"id": True, "file_name": "1.png", "height": SIZE, "width": SIZE}],
     "images[0]: id must be an int or a string (detectron2 sorts the ids), got True"),
    ([{"id": 1, "file_name": 1, "height": SIZE, "width": SIZE}],
     "images[0] (id 1): file_name must be a non-empty string, got 1"),
    ([{"id": 1, "file_name": "", "height": SIZE, "width": SIZE}],
     "images[0] (id 1): file_name must be a non-empty string, got ''"),
    ([{"id": 1, "file_name": "1.png", "height": SIZE, "width": SIZE},
      {"id": "2", "file_name": "2.png", "height": SIZE, "width": SIZE}],
     "image ids mix ints and strings (e.g. 1); detectron2 sorts them, which needs one type"),
])
def test_image_fields_of_the_wrong_type_are_refused(images, problem):
    coco = {"images": images, "annotations": [], "categories": [{"id": 3, "name": "dog"}]}
    with pytest.raises(ValueError) as info:
        check_coco_annotations(coco, "f.json")
    assert str(info.value) == f"'f.json' has 1 invalid image or annotation entries:\n  {problem}"


def test_string_ids_of_one_type_still_register(tmp_path: Path):
    images = [{"id": f"img{i}", "file_name": f"{i}.png", "height": SIZE, "width": SIZE}
              for i in (1, 2)]
    json_file, root = write_coco(tmp_path, num_images=2, images=images, annotations=[
        annotation(1, "img1"), annotation(2, "img2")])
    register_datasets_from_config(coco_cfg("bad_but_fine_string_ids", json_file, root))
    assert [len(d["annotations"]) for d in DatasetCatalog.get("bad_but_fine_string_ids")] == [1, 1]


@pytest.mark.parametrize("categories, problem", [
    ([{"id": [3], "name": "dog"}], "categories[0]: id must be an int or a string (detectron2 "
                                   "sorts the ids), got [3]"),
    ([{"id": 3, "name": None}], "categories[0] (id 3): name must be a non-empty string (the "
                                "class name in every result), got None"),
    ([{"id": 3, "name": "dog"}, {"id": "7", "name": "cat"}],
     "category ids mix ints and strings; detectron2 sorts them, which needs one type"),
])
def test_category_fields_of_the_wrong_type_are_refused(tmp_path: Path, categories, problem):
    json_file, root = write_coco(tmp_path)
    coco = json.loads(json_file.read_text())
    coco["categories"] = categories
    json_file.write_text(json.dumps(coco))
    assert _refusal(coco_cfg("bad_category_fields", json_file, root)) == (
        f"'{json_file}': {problem}")


def test_a_test_set_needs_what_coco_evaluation_reads(tmp_path: Path):
    """pycocotools' COCOeval reads every ground-truth annotation's area, and with masks the
    segmentation of crowd regions too; without them evaluation fails after training."""
    annotations = [annotation(i, i) for i in (1, 2, 3)]
    del annotations[0]["area"], annotations[2]["area"]
    annotations[1] = dict(annotations[1], iscrowd=1)
    del annotations[1]["segmentation"]
    json_file, root = write_coco(tmp_path, num_images=3, annotations=annotations)
    cfg = coco_cfg("bad_eval_fields", json_file, root)
    register_datasets_from_config(cfg)  # trained on only: area is not read
    cfg = coco_cfg("bad_eval_fields_val", json_file, root)
    cfg.MODEL.MASK_ON, cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = True, (), ("bad_eval_fields_val",)
    assert _refusal(cfg) == (
        f"'{json_file}' has 2 invalid image or annotation entries:\n"
        "  annotation id 2 (image id 2, '2.png'): a crowd region of a DATASETS.TEST set under "
        "MODEL.MASK_ON needs a segmentation: COCO's mask evaluation reads one for every "
        "annotation\n"
        "  2 annotations have no 'area' (ids 1, 3), which COCO evaluation of a DATASETS.TEST set "
        "reads: add each object's area in pixels (its mask's; bbox width x height without masks)")
