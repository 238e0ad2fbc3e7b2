"""Registration's box records (data/box_records.py), which the pre-flight report reads instead of
parsing a json twice, are the projection of what detectron2's load_coco_json returns through the
registered loader: same images in the same order, same boxes, classes and crowd flags, the
annotations RELIABILITY.BAD_ANNOTATIONS skip drops left out."""

from pathlib import Path

from detectron2.data import DatasetCatalog

from coco_builders import annotation, coco_cfg, forgetting_datasets, write_coco
from training_harness import register_datasets_from_config


def _projection(record):
    return {"image_id": record["image_id"], "height": record["height"],
            "width": record["width"],
            "annotations": [{k: a.get(k, 0) if k == "iscrowd" else a[k]
                             for k in ("bbox", "bbox_mode", "category_id", "iscrowd")}
                            for a in record["annotations"]]}


def test_box_records_are_the_registered_loaders_records(tmp_path: Path):
    crowd = {**annotation(5, 2, x=2, category_id=7), "iscrowd": 1}
    no_crowd_key = annotation(6, 4, x=6)
    del no_crowd_key["iscrowd"]
    annotations = [annotation(1, 3, category_id=7), annotation(2, 1), crowd,
                   annotation(3, 1, x=37),  # outside its 32-px image: skipped
                   annotation(4, 1, x=10, category_id=7), no_crowd_key]
    # Images listed out of id order; image 5 holds nothing.
    images = [{"id": i, "file_name": f"{i}.png", "height": 32, "width": 32}
              for i in (3, 1, 5, 2, 4)]
    json_file, root = write_coco(tmp_path, num_images=5, annotations=annotations, images=images)
    cfg = coco_cfg("box_records_skip", json_file, root)
    cfg.RELIABILITY.BAD_ANNOTATIONS = "skip"
    with forgetting_datasets() as names:
        names.append("box_records_skip")
        kept = {}
        register_datasets_from_config(cfg, keep_records=kept)
        loaded = DatasetCatalog.get("box_records_skip")
    assert [_projection(r) for r in kept["box_records_skip"]] == [_projection(r) for r in loaded]
    # The hand-made answer: ids 3 and 7 -> classes 0 and 1, annotation 3 dropped.
    assert [[(a["category_id"], a["iscrowd"]) for a in r["annotations"]]
            for r in kept["box_records_skip"]] == [[(0, 0), (1, 0)], [(1, 1)], [(1, 0)], [(0, 0)],
                                                   []]
