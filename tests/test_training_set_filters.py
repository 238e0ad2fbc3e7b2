"""The training set (data/train_dicts.py): detectron2's get_detection_dataset_dicts records, with
the image files that do not exist dropped before detectron2's filters and counted among all the
images, and errors that name the config key (a training set left empty by the filters:
tests/test_bad_inputs.py)."""

import logging
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog
from detectron2.data.build import get_detection_dataset_dicts
from training_harness import register_datasets_from_config
from training_harness.data.train_dicts import load_train_dicts
from training_harness.errors import TooManySkippedImages

from coco_builders import annotation, coco_cfg, write_coco

pytestmark = pytest.mark.usefixtures("forget_bad_datasets")


def _half_empty(tmp_path: Path, name: str):
    """4 images: 1 and 2 hold an object, 3 only a crowd region, 4 nothing; registered."""
    crowd = dict(annotation(3, 3), iscrowd=1)
    json_file, image_root = write_coco(tmp_path, annotations=[annotation(1, 1), annotation(2, 2),
                                                              crowd])
    cfg = coco_cfg(name, json_file, image_root)
    register_datasets_from_config(cfg)
    return cfg, image_root


@pytest.mark.parametrize("filter_empty", [True, False])
def test_records_and_order_are_detectron2s_when_every_file_exists(tmp_path: Path, filter_empty):
    cfg, _ = _half_empty(tmp_path, "bad_as_detectron2")
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = filter_empty
    dicts, skipped = load_train_dicts(cfg)
    assert dicts == get_detection_dataset_dicts(["bad_as_detectron2"], filter_empty=filter_empty)
    assert [d["image_id"] for d in dicts] == ([1, 2] if filter_empty else [1, 2, 3, 4])
    assert skipped.num_images == 4 and not skipped.reasons


def test_missing_files_count_among_all_images_before_the_empty_filter(tmp_path: Path, caplog):
    cfg, image_root = _half_empty(tmp_path, "bad_missing_before_filter")
    (image_root / "2.png").unlink()
    # 1 of 4 is the allowance; of the 2 images left after the empty filter it would be 0.5.
    cfg.RELIABILITY.MAX_SKIPPED_IMAGE_FRACTION = 0.25
    with caplog.at_level(logging.WARNING):
        dicts, skipped = load_train_dicts(cfg)
    assert [d["image_id"] for d in dicts] == [1]
    assert skipped.num_images == 4 and list(skipped.reasons) == [str(image_root / "2.png")]
    assert (f"Skipping 1 of 4 training images: their files do not exist, e.g. "
            f"'{image_root / '2.png'}'") in caplog.text
    (image_root / "1.png").unlink()
    with pytest.raises(TooManySkippedImages, match="^2 of 4 training images cannot be used"):
        load_train_dicts(cfg)


def test_empty_train_list_and_a_dataset_without_images_are_named(tmp_path: Path):
    cfg = coco_cfg("bad_full", *write_coco(tmp_path / "full"))
    cfg.DATASETS.TRAIN = ()
    with pytest.raises(ValueError) as info:
        load_train_dicts(cfg)
    assert str(info.value) == "DATASETS.TRAIN is empty: name the dataset(s) to train on"

    # A COCO json without images is refused when it is registered, naming the file ...
    no_images = write_coco(tmp_path / "none", num_images=0, annotations=[])
    cfg.DATASETS.REGISTER_COCO.append(["bad_no_images", *map(str, no_images)])
    cfg.DATASETS.TRAIN = ("bad_full", "bad_no_images")
    with pytest.raises(ValueError) as info:
        register_datasets_from_config(cfg)
    assert str(info.value) == (f"DATASETS.TRAIN: dataset 'bad_no_images' ({no_images[0]}) has "
                               "no images: there is nothing to train on")
    # ... and a dataset registered by other code, when the training set is built.
    DatasetCatalog.register("bad_no_images_elsewhere", lambda: [])
    cfg.DATASETS.TRAIN = ("bad_full", "bad_no_images_elsewhere")
    with pytest.raises(ValueError) as info:
        load_train_dicts(cfg)
    assert str(info.value) == "DATASETS.TRAIN: dataset 'bad_no_images_elsewhere' has no images"
    # No detectron2 AssertionError in the traceback to read past.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
