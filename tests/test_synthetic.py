"""The synthetic shapes generator: deterministic, every knob honoured exactly, valid masks."""
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from training_harness.data.synthetic import (
    SyntheticShapesParams,
    _largest_remainder,
    generate_synthetic_shapes,
)

# Small enough to generate in a few hundred milliseconds, with every knob away from its default.
KNOBS = SyntheticShapesParams(
    num_images=40,
    image_size=(48, 64),
    objects_per_image=(2, 4),
    object_size=(6, 14),
    empty_fraction=0.25,
    classes=("circle", "square", "triangle", "star"),
    class_frequencies=(0.5, 0.25, 0.15, 0.1),
    seed=7,
)


@pytest.fixture(scope="module")
def knobs_dataset(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("knobs")
    json_path = generate_synthetic_shapes(KNOBS, out)
    return {"root": out, "coco": json.loads(json_path.read_text())}


def _by_image(coco: dict) -> dict:
    per_image = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]].append(ann)
    return per_image


def test_same_seed_gives_byte_identical_files(tmp_path: Path):
    params = SyntheticShapesParams(num_images=6, image_size=(40, 40), object_size=(6, 16), seed=3)
    a = generate_synthetic_shapes(params, tmp_path / "a").parent
    b = generate_synthetic_shapes(params, tmp_path / "b").parent
    assert (a / "annotations.json").read_bytes() == (b / "annotations.json").read_bytes()
    pngs = sorted(p.name for p in (a / "images").iterdir())
    assert pngs == [f"{i:06d}.png" for i in range(6)]
    for name in pngs:
        assert (a / "images" / name).read_bytes() == (b / "images" / name).read_bytes()

    other = SyntheticShapesParams(num_images=6, image_size=(40, 40), object_size=(6, 16), seed=4)
    c = generate_synthetic_shapes(other, tmp_path / "c").parent
    assert (c / "annotations.json").read_bytes() != (a / "annotations.json").read_bytes()


def test_image_count_size_files_and_categories_follow_the_params(knobs_dataset):
    coco, root = knobs_dataset["coco"], knobs_dataset["root"]
    assert len(coco["images"]) == 40
    assert [img["id"] for img in coco["images"]] == list(range(1, 41))
    for img in coco["images"]:
        assert (img["height"], img["width"]) == (48, 64)
        pixels = cv2.imread(str(root / "images" / img["file_name"]))
        assert pixels.shape == (48, 64, 3)
    assert [c["name"] for c in coco["categories"]] == ["circle", "square", "triangle", "star"]
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4]
    assert coco["info"]["params"] == KNOBS.to_dict()


def test_empty_share_and_objects_per_image_are_exact(knobs_dataset):
    counts = [len(anns) for anns in _by_image(knobs_dataset["coco"]).values()]
    assert counts.count(0) == 10  # exactly 25% of 40
    non_empty = [c for c in counts if c]
    assert len(non_empty) == 30
    assert min(non_empty) >= 2 and max(non_empty) <= 4
    assert set(non_empty) == {2, 3, 4}  # the whole range is used, not just one end


def test_object_sizes_stay_within_range_and_spread_over_it(knobs_dataset):
    extents = [max(a["bbox"][2], a["bbox"][3]) for a in knobs_dataset["coco"]["annotations"]]
    # The json rounds coordinates to 0.01 px.
    assert 6 - 0.011 <= min(extents) and max(extents) <= 14 + 0.011
    assert max(extents) - min(extents) > 4  # sizes are spread over the range


def test_class_counts_follow_frequencies(knobs_dataset):
    anns = knobs_dataset["coco"]["annotations"]
    total = len(anns)
    counts = Counter(a["category_id"] for a in anns)
    for cat_id, freq in zip((1, 2, 3, 4), KNOBS.class_frequencies):
        assert abs(counts[cat_id] - freq * total) < 1, (cat_id, counts, total)
    assert sum(counts.values()) == total


def test_largest_remainder_split_is_exact():
    assert _largest_remainder(10, np.array([0.5, 0.3, 0.2])) == [5, 3, 2]
    assert _largest_remainder(7, np.array([1, 1, 1]) / 3) == [3, 2, 2]
    assert _largest_remainder(0, np.array([0.9, 0.1])) == [0, 0]
    assert _largest_remainder(3, np.array([0.0, 1.0])) == [0, 3]


def test_masks_are_valid_inside_the_image_and_disjoint(knobs_dataset):
    coco = knobs_dataset["coco"]
    h, w = 48, 64
    for image_id, anns in _by_image(coco).items():
        union = np.zeros((h, w), dtype=np.int32)
        for ann in anns:
            x, y, bw, bh = ann["bbox"]
            assert x >= 0 and y >= 0 and x + bw <= w and y + bh <= h, ann
            assert len(ann["segmentation"]) == 1 and len(ann["segmentation"][0]) >= 6
            xs, ys = ann["segmentation"][0][0::2], ann["segmentation"][0][1::2]
            assert [min(xs), min(ys)] == [x, y]
            rle = mask_util.merge(mask_util.frPyObjects(ann["segmentation"], h, w))
            mask = mask_util.decode(rle)
            assert mask.shape == (h, w)
            assert ann["area"] == int(mask.sum()) > 0
            mx, my, mw, mh = mask_util.toBbox(rle)
            assert mx >= x - 1 and my >= y - 1 and mx + mw <= x + bw + 1 and my + mh <= y + bh + 1
            assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 4
            union += mask
        assert union.max() <= 1, f"objects of image {image_id} overlap"


def test_objects_are_painted_where_their_masks_are(knobs_dataset):
    # The mask must describe the pixels: the object interior differs from the ring around it.
    coco, root = knobs_dataset["coco"], knobs_dataset["root"]
    files = {img["id"]: img["file_name"] for img in coco["images"]}
    ann = max(coco["annotations"], key=lambda a: a["area"])
    pixels = cv2.imread(str(root / "images" / files[ann["image_id"]])).astype(np.float32)
    mask = mask_util.decode(mask_util.merge(mask_util.frPyObjects(ann["segmentation"], 48, 64)))
    ring = cv2.dilate(mask, np.ones((5, 5), np.uint8)) - mask
    inside = pixels[mask.astype(bool)].mean(axis=0)
    outside = pixels[ring.astype(bool)].mean(axis=0)
    assert np.abs(inside - outside).sum() > 30


def test_params_fingerprint_changes_with_any_knob():
    base = SyntheticShapesParams()
    assert base.fingerprint() == SyntheticShapesParams().fingerprint()
    changed = [SyntheticShapesParams(seed=1), SyntheticShapesParams(empty_fraction=0.2),
               SyntheticShapesParams(class_frequencies=(1, 1, 2))]
    assert len({p.fingerprint() for p in changed} | {base.fingerprint()}) == 4
    # Lists (from yaml or json) are accepted and equal to tuples.
    assert SyntheticShapesParams(image_size=[192, 192]) == base


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_images=0), "num_images must be >= 1, got 0"),
        (dict(objects_per_image=(0, 3)),
         r"objects_per_image must satisfy 1 <= min <= max, got \(0, 3\)"),
        (dict(object_size=(12, 300)),
         r"object_size must satisfy 4 <= min <= max <= 192 \(the image side\), got \(12, 300\)"),
        (dict(empty_fraction=1.5), r"empty_fraction must be in \[0, 1\], got 1.5"),
        (dict(classes=("circle", "blob")), "classes must be a non-empty subset of"),
        (dict(class_frequencies=(1, 2)),
         r"class_frequencies must be 3 non-negative numbers with a positive sum \(one per "
         r"class\), got \(1, 2\)"),
    ],
)
def test_invalid_params_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=r"^SyntheticShapesParams: " + message):
        SyntheticShapesParams(**kwargs)


def test_impossible_placement_names_the_image(tmp_path: Path):
    crowded = SyntheticShapesParams(num_images=1, image_size=(16, 16), objects_per_image=(5, 5),
                                    object_size=(10, 12), empty_fraction=0.0)
    with pytest.raises(ValueError, match=r"synthetic image 0: could not place 5 non-overlapping "
                                         r"objects in 16x16 px"):
        generate_synthetic_shapes(crowded, tmp_path)
