"""Simple copy-paste onto empty training images (data/copy_paste.py): the paste by hand, the
annotations that join, what does not fit, the mapper through detectron2's pipeline, refusals."""

import numpy as np
import pytest
import torch
from detectron2.structures import BoxMode

from balanced_rcnn.data.copy_paste import CopyPasteDatasetMapper, PasteTransform, paste_objects


def _donor():
    # An 8x8 donor: a 3x3 square object of class 2 at (1, 1)-(4, 4), a crowd region, and an
    # object given by its box only.
    square = {"bbox": [1, 1, 3, 3], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 2,
              "iscrowd": 0, "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]]}
    crowd = {"bbox": [0, 5, 3, 3], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
             "iscrowd": 1}
    boxed = {"bbox": [5, 5, 7, 7], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1,
             "iscrowd": 0}
    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    return {"file_name": "donor.png", "annotations": [square, crowd, boxed]}, image


@pytest.mark.core
def test_paste_transform_by_hand():
    pixels = np.full((2, 3, 3), 200, dtype=np.uint8)
    mask = np.array([[True, False, True], [False, True, False]])
    out = PasteTransform(pixels, mask).apply_image(np.zeros((4, 4, 3), dtype=np.uint8))
    expected = np.zeros((4, 4, 3), dtype=np.uint8)
    expected[0, 0] = expected[0, 2] = expected[1, 1] = 200
    np.testing.assert_array_equal(out, expected)
    coords = np.array([[1.0, 2.0]])
    np.testing.assert_array_equal(PasteTransform(pixels, mask).apply_coords(coords), coords)


@pytest.mark.core
def test_paste_objects_takes_every_non_crowd_object_at_its_place():
    donor, image = _donor()
    paste, pasted = paste_objects(donor, image, 8, 8)
    assert [a["category_id"] for a in pasted] == [2, 1]  # the crowd region stays behind
    assert all(a["iscrowd"] == 0 for a in pasted) and pasted[0]["bbox"] == [1, 1, 3, 3]
    out = paste.apply_image(np.zeros((8, 8, 3), dtype=np.uint8))
    # The polygon (1,1)-(4,4) covers pixels 1..3; the box (5,5)-(7,7) pixels 5..6.
    inside = np.zeros((8, 8), dtype=bool)
    inside[1:4, 1:4] = True
    inside[5:7, 5:7] = True
    np.testing.assert_array_equal(out[inside], image[inside])
    assert not out[~inside].any()


@pytest.mark.core
def test_objects_that_do_not_fit_a_smaller_image_are_left_out():
    donor, image = _donor()
    paste, pasted = paste_objects(donor, image, 6, 6)  # the box object ends at 7
    assert [a["category_id"] for a in pasted] == [2]
    assert paste.apply_image(np.zeros((6, 6, 3), dtype=np.uint8)).shape == (6, 6, 3)
    assert paste_objects(donor, image, 3, 3) == (None, [])  # nothing fits


def _mapper(cfg, donors, probability):
    cfg.INPUT.COPY_PASTE.PROBABILITY = probability
    cfg.INPUT.RANDOM_FLIP = "none"
    return CopyPasteDatasetMapper(cfg, True, donors=donors)


def test_mapper_pastes_onto_empty_images_only(tmp_path, monkeypatch, tiny_cfg):
    from detectron2.data import DatasetCatalog

    monkeypatch.setenv("BALANCED_RCNN_DATASETS", str(tmp_path))
    records = DatasetCatalog.get("synthetic_shapes_tiny_train")
    empty = next(r for r in records if not r["annotations"])
    donor = next(r for r in records if r["annotations"])
    plain = _mapper(tiny_cfg, [donor], 0.0)(dict(empty))
    pasted = _mapper(tiny_cfg, [donor], 1.0)(dict(empty))
    assert len(plain["instances"]) == 0
    # Every object of the donor, with its class, box (resized as the image) and mask.
    assert pasted["instances"].gt_classes.tolist() == [a["category_id"]
                                                     for a in donor["annotations"]]
    scale = pasted["image"].shape[-1] / empty["width"]
    donor_boxes = torch.tensor([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                                for a in donor["annotations"]], dtype=torch.float32)
    torch.testing.assert_close(pasted["instances"].gt_boxes.tensor, donor_boxes * scale)
    assert pasted["instances"].has("gt_masks")
    assert not torch.equal(pasted["image"], plain["image"])
    # An image with objects is left alone; so is every image at probability 0.
    again = _mapper(tiny_cfg, [donor], 1.0)(dict(donor))
    assert len(again["instances"]) == len(donor["annotations"])


@pytest.mark.core
@pytest.mark.parametrize("probability", [-0.1, 1.5])
def test_probability_outside_zero_one_is_refused(probability, tiny_core_cfg):
    with pytest.raises(ValueError, match=rf"INPUT.COPY_PASTE.PROBABILITY must be in \[0, 1\], "
                                         rf"got {probability}"):
        _mapper(tiny_core_cfg, [], probability)


def test_training_loader_with_copy_paste_leaves_no_image_empty(tmp_path, monkeypatch, tiny_cfg):
    import itertools

    from training_harness.data import build_train_loader

    monkeypatch.setenv("BALANCED_RCNN_DATASETS", str(tmp_path))
    tiny_cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False  # synthetic_shapes_tiny_train: 4 empty
    tiny_cfg.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"
    tiny_cfg.INPUT.COPY_PASTE.PROBABILITY = 1.0
    tiny_cfg.SOLVER.IMS_PER_BATCH = 4
    images = [i for b in itertools.islice(iter(build_train_loader(tiny_cfg)), 10) for i in b]
    assert len(images) == 40 and all(len(i["instances"]) > 0 for i in images)
