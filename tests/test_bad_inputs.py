"""
Bad inputs: one test per row of the table in docs/reliability.md, "Bad inputs", each asserting
that the message names the culprit (config key and value; json, annotation id, image id and file; checkpoint file).

Rows tested elsewhere: MODEL.WEIGHTS and checkpoint files in tests/test_checkpoint.py;
NUM_CLASSES not matching the dataset and unknown dataset names in tests/test_coco_registration.py
(test_num_classes_mismatch_*, test_unknown_dataset_name_lists_close_matches).
"""

import logging
import math
from pathlib import Path
from typing import Dict, List

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from training_harness import register_datasets_from_config
from training_harness.data.loader import build_train_loader
from training_harness.data.mapper import SKIPPED_KEY, SkippingMapper
from training_harness.data.train_dicts import load_train_dicts
from training_harness.errors import TooManySkippedImages
from training_harness.reliability.launch import collective_timeout

from coco_builders import SIZE, annotation, coco_cfg, write_coco
from conftest import harness_cfg

pytestmark = pytest.mark.usefixtures("forget_bad_datasets")


# ---- config ------------------------------------------------------------------------------


def test_unknown_config_key_is_named(tmp_path: Path):
    # yacs: an assertion for the command line, a KeyError for a file; both name the full key.
    with pytest.raises(AssertionError, match="^Non-existent key: SOLVER.BASE_LRR$"):
        harness_cfg().merge_from_list(["SOLVER.BASE_LRR", "0.1"])
    config = tmp_path / "typo.yaml"
    config.write_text("RELIABILITY:\n  PEER_TIMEOUT: 10.0\n")
    with pytest.raises(KeyError, match="Non-existent config key: RELIABILITY.PEER_TIMEOUT"):
        harness_cfg().merge_from_file(str(config))


def test_wrong_config_type_is_named():
    with pytest.raises(ValueError) as info:
        harness_cfg().merge_from_list(["SOLVER.BASE_LR", "fast"])
    assert str(info.value) == ("Type mismatch (<class 'float'> vs. <class 'str'>) with values "
                               "(0.001 vs. fast) for config key: SOLVER.BASE_LR")
    # yacs does not turn an int into a float: float keys need a decimal point.
    with pytest.raises(ValueError, match=r"\(<class 'float'> vs. <class 'int'>\) with values "
                                         r"\(60.0 vs. 5\) for config key: "
                                         "RELIABILITY.PEER_TIMEOUT_S"):
        harness_cfg().merge_from_list(["RELIABILITY.PEER_TIMEOUT_S", "5"])


def test_negative_or_nan_loss_weight_is_refused_when_the_model_is_built(tiny_cfg, tmp_path):
    tiny_cfg.merge_from_list(["MODEL.BALANCED_LOSS.ROI_LOSS_MASK_WEIGHT", "-1.0"])
    with pytest.raises(ValueError, match=r"^MODEL.BALANCED_LOSS.ROI_LOSS_MASK_WEIGHT must be "
                                         r"finite and >= 0, got -1.0$"):
        build_model(tiny_cfg)
    # NaN can only come from a yaml file (".nan"): yacs reads "nan" on the command line as text.
    config = tmp_path / "nan.yaml"
    config.write_text("MODEL:\n  BALANCED_LOSS:\n    RPN_CLS_POS_WEIGHT: .nan\n")
    tiny_cfg.MODEL.BALANCED_LOSS.ROI_LOSS_MASK_WEIGHT = 1.0
    tiny_cfg.merge_from_file(str(config))
    with pytest.raises(ValueError, match=r"^MODEL.BALANCED_LOSS.RPN_CLS_POS_WEIGHT must be "
                                         r"finite and >= 0, got nan$"):
        build_model(tiny_cfg)


def test_reliability_keys_out_of_range_are_named(tmp_path: Path):
    cfg = harness_cfg()
    cfg.RELIABILITY.COLLECTIVE_TIMEOUT_MIN = 0.0
    with pytest.raises(ValueError, match="RELIABILITY.COLLECTIVE_TIMEOUT_MIN must be > 0, got 0.0"):
        collective_timeout(cfg)
    json_file, image_root = write_coco(tmp_path)
    cfg = coco_cfg("bad_policy", json_file, image_root)
    cfg.RELIABILITY.BAD_ANNOTATIONS = "drop"
    with pytest.raises(ValueError, match=r"^RELIABILITY.BAD_ANNOTATIONS must be one of 'error', "
                                         r"'skip'; got 'drop'.$"):
        register_datasets_from_config(cfg)


# ---- datasets ----------------------------------------------------------------------------


def _register_error(tmp_path: Path, annotations: List[Dict], name: str) -> str:
    json_file, image_root = write_coco(tmp_path, annotations=annotations)
    with pytest.raises(ValueError) as info:
        register_datasets_from_config(coco_cfg(name, json_file, image_root))
    return str(info.value)


@pytest.mark.parametrize(
    "field, value, culprit",
    [
        ("bbox", [4, 4, 0, 12], "bbox [4, 4, 0, 12] has zero area (width 0, height 12)"),
        ("segmentation", [[4, 4, 16, 4]],
         "segmentation polygon 0 has 2 points (a polygon needs at least 3)"),
    ],
    ids=["zero-area-box", "two-point-polygon"],
)
def test_bad_annotation_geometry_is_named_or_skipped(tmp_path: Path, caplog, field, value,
                                                     culprit):
    annotations = [annotation(i, i) for i in range(1, 5)]
    annotations[1][field] = value
    json_file, image_root = write_coco(tmp_path, annotations=annotations)
    with pytest.raises(ValueError) as info:
        register_datasets_from_config(coco_cfg("bad_geometry", json_file, image_root))
    assert str(info.value) == (
        f"'{json_file}' has 1 annotations that cannot be trained on:\n"
        f"  annotation id 2 (image id 2, '2.png'): {culprit}\n"
        "Fix them, or set RELIABILITY.BAD_ANNOTATIONS skip to drop them (each is logged).")

    cfg = coco_cfg("bad_geometry_skip", json_file, image_root)
    cfg.RELIABILITY.BAD_ANNOTATIONS = "skip"
    with caplog.at_level(logging.WARNING):
        register_datasets_from_config(cfg)
    assert f"annotation id 2 (image id 2, '2.png'): {culprit}" in caplog.text
    dicts = DatasetCatalog.get("bad_geometry_skip")
    assert [[a["id"] for a in d["annotations"]] for d in dicts] == [[1], [], [3], [4]]


def test_category_id_missing_from_categories_is_named(tmp_path: Path):
    annotations = [annotation(1, 1), annotation(2, 2, category_id=9)]
    message = _register_error(tmp_path, annotations, "bad_category")
    assert message == (f"'{tmp_path / 'instances.json'}' has 1 invalid image or annotation "
                       "entries:\n  annotation id 2 (image id 2, '2.png'): category_id 9 is not "
                       "in 'categories' (ids: 3, 7)")


def test_annotation_of_an_image_missing_from_images_is_named(tmp_path: Path):
    annotations = [annotation(1, 1), annotation(2, 9)]
    message = _register_error(tmp_path, annotations, "bad_image_ref")
    assert message.endswith("entries:\n  annotation id 2: image_id 9 is not in 'images'")


def test_missing_image_files_are_skipped_and_counted_then_refused(tiny_cfg, tmp_path, caplog):
    json_file, image_root = write_coco(tmp_path)
    (image_root / "3.png").unlink()
    cfg = coco_cfg("bad_missing", json_file, image_root, tiny_cfg)
    cfg.RELIABILITY.MAX_SKIPPED_IMAGE_FRACTION = 0.25
    register_datasets_from_config(cfg)
    with caplog.at_level(logging.WARNING):
        dicts, skipped = load_train_dicts(cfg)
    assert [d["image_id"] for d in dicts] == [1, 2, 4]
    assert skipped.reasons == {str(image_root / "3.png"): "the file does not exist"}
    assert (f"Skipping 1 of 4 training images: their files do not exist, e.g. "
            f"'{image_root / '3.png'}'") in caplog.text

    cfg.RELIABILITY.MAX_SKIPPED_IMAGE_FRACTION = 0.2
    with pytest.raises(TooManySkippedImages) as info:
        load_train_dicts(cfg)
    assert str(info.value) == (
        "1 of 4 training images cannot be used, more than RELIABILITY.MAX_SKIPPED_IMAGE_FRACTION"
        f" = 0.2 of them: '{image_root / '3.png'}' (the file does not exist). Fix or remove these "
        "files (or their json entries), or raise the fraction.")


@pytest.mark.parametrize(
    "annotated, missing, why",
    [
        ([], [], "3 images have no non-crowd annotation and DATALOADER.FILTER_EMPTY_ANNOTATIONS "
                 "True removes those (set it to False to train on images without objects)"),
        # The missing file is dropped first: detectron2's filter sees only the other two.
        ([1], ["1.png"], "1 image files do not exist; 2 images have no non-crowd annotation and "
                         "DATALOADER.FILTER_EMPTY_ANNOTATIONS True removes those (set it to "
                         "False to train on images without objects)"),
    ],
    ids=["no-objects", "missing-file-and-no-objects"],
)
def test_dataset_left_empty_after_filtering_says_why(tiny_cfg, tmp_path: Path, annotated,
                                                     missing, why):
    json_file, image_root = write_coco(tmp_path, num_images=3,
                                       annotations=[annotation(i, i) for i in annotated])
    for file_name in missing:
        (image_root / file_name).unlink()
    cfg = coco_cfg("bad_empty", json_file, image_root, tiny_cfg)
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True
    cfg.RELIABILITY.MAX_SKIPPED_IMAGE_FRACTION = 0.5
    register_datasets_from_config(cfg)
    with pytest.raises(ValueError) as info:
        load_train_dicts(cfg)
    assert str(info.value) == (
        f"DATASETS.TRAIN ('bad_empty',): no image left to train on. Of 3 images, {why}.")


def _unreadable(path: Path) -> None:
    path.write_bytes(b"\x00" * 100)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _other_size(path: Path) -> None:
    cv2.imwrite(str(path), np.zeros((SIZE, SIZE + 8, 3), np.uint8))


def _sixteen_bit(path: Path) -> None:
    # A 16-bit grey PNG with values up to 4000: detectron2 would read it as all white.
    cv2.imwrite(str(path), np.full((SIZE, SIZE), 4000, np.uint16))


DAMAGES = [
    (_unreadable, "UnidentifiedImageError: cannot identify image file"),
    (_truncated, "OSError: image file is truncated"),
    (_other_size, "SizeMismatchError: Mismatched image shape for image {file}, got (40, 32), "
                  "expect (32, 32)."),
    (_sixteen_bit, "UnsupportedImageError: it is a 16-bit image (PIL mode I;16), which "
                   "detectron2 reads as 8 bits per channel by clipping every value above 255 (a "
                   "16-bit photo becomes all white); convert it to 8 bits first, scaling its "
                   "range to 0-255"),
]
DAMAGE_IDS = ["unreadable", "truncated", "size-differs-from-json", "16-bit"]


@pytest.mark.parametrize("damage, reason", DAMAGES, ids=DAMAGE_IDS)
def test_unusable_image_is_skipped_logged_and_handed_on(tiny_cfg, tmp_path, caplog, damage,
                                                        reason):
    json_file, image_root = write_coco(tmp_path)
    bad = image_root / "2.png"
    damage(bad)
    cfg = coco_cfg("bad_read", json_file, image_root, tiny_cfg)
    register_datasets_from_config(cfg)
    dicts = DatasetCatalog.get("bad_read")
    mapper = SkippingMapper(DatasetMapper(cfg, True), max_skipped=1)
    with caplog.at_level(logging.WARNING):
        assert mapper(dicts[1]) is None  # detectron2's MapDataset then draws another image
    assert f"Skipping training image '{bad}': {reason.format(file=bad)}" in caplog.text
    record = mapper(dicts[0])[SKIPPED_KEY]  # the next image carries the skip to the trainer
    assert record == [(str(bad), caplog.records[-1].getMessage().split(f"'{bad}': ")[1])]
    assert SKIPPED_KEY not in mapper(dicts[2])
    caplog.clear()
    assert mapper(dicts[1]) is None and not caplog.text  # known bad: not read or logged again
    # In evaluation the same file is an error: a skipped image would change the result.
    with pytest.raises(ValueError, match=rf"^Cannot use image '{bad}' \(image id 2\): "):
        SkippingMapper(DatasetMapper(cfg, False))(dicts[1])


def test_training_loader_resamples_summarizes_and_stops_at_the_limit(tiny_cfg, tmp_path):
    json_file, image_root = write_coco(tmp_path)
    _truncated(image_root / "2.png")
    cfg = coco_cfg("bad_loader", json_file, image_root, tiny_cfg)
    cfg.DATALOADER.NUM_WORKERS = 1  # the skip record crosses a process boundary
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.RELIABILITY.MAX_SKIPPED_IMAGE_FRACTION = 0.25
    register_datasets_from_config(cfg)
    loader = build_train_loader(cfg)
    batches = [b for _, b in zip(range(6), loader)]
    seen = [d["file_name"] for batch in batches for d in batch]
    assert len(seen) == 12 and str(image_root / "2.png") not in seen
    assert not any(SKIPPED_KEY in d for batch in batches for d in batch)
    assert list(loader.skipped.reasons) == [str(image_root / "2.png")]
    assert loader.skipped.summary() == (
        "Skipped 1 of 4 training images that cannot be used (RELIABILITY.MAX_SKIPPED_IMAGE_"
        f"FRACTION = 0.25): '{image_root / '2.png'}' (OSError: image file is truncated)")

    _unreadable(image_root / "4.png")  # 2 of 4 > 0.25
    cfg.DATALOADER.NUM_WORKERS = 0
    with pytest.raises(TooManySkippedImages, match=r"2 training images failed to load .*"
                                                   r"'.*/[24].png' .*'.*/[24].png'"):
        for _ in zip(range(20), build_train_loader(cfg)):
            pass


def test_skip_limit_is_a_fraction_of_the_training_set():
    from training_harness.data.mapper import SkippedImages

    skipped = SkippedImages(num_images=1000, max_fraction=0.01)
    for i in range(10):
        skipped.add(f"{i}.png", "truncated")
    assert math.isclose(skipped.remaining(), 0.0)
    with pytest.raises(TooManySkippedImages, match="^11 of 1000 training images cannot be used"):
        skipped.add("10.png", "truncated")
    with pytest.raises(ValueError, match="MAX_SKIPPED_IMAGE_FRACTION must be in"):
        SkippedImages(10, 1.5)
