"""tools/predict.py with a tiny randomly initialized Mask R-CNN saved by DetectionCheckpointer."""
import contextlib
import importlib.util
import io
import json
import logging
import shutil
from pathlib import Path

import pycocotools.mask as mask_util
import pytest
from balanced_rcnn import add_balanced_rcnn_config
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import Metadata
from detectron2.modeling import build_model
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from training_harness import add_training_harness_config
from training_harness.data import SyntheticShapesParams, generate_synthetic_shapes

TOOL = Path(__file__).resolve().parents[1] / "tools" / "predict.py"
spec = importlib.util.spec_from_file_location("predict_tool", TOOL)
predict_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(predict_tool)


def _tiny_cfg():
    """Stock ResNet-18-FPN Mask R-CNN heads at their smallest: builds and runs in a blink."""
    cfg = get_cfg()
    add_balanced_rcnn_config(cfg)
    add_training_harness_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[8], [16], [32], [64], [128]]
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.5
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 1
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16
    cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 14
    cfg.TEST.DETECTIONS_PER_IMAGE = 5
    cfg.INPUT.MIN_SIZE_TEST = 48
    cfg.INPUT.MAX_SIZE_TEST = 64
    cfg.DATASETS.TRAIN = ("synthetic_shapes_tiny_train",)
    cfg.DATASETS.TEST = ("synthetic_shapes_tiny_val",)  # metadata only: nothing is generated
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A config file, a checkpoint, and three images with their COCO json."""
    root = tmp_path_factory.mktemp("predict")
    cfg = _tiny_cfg()
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(root)).save("model")
    (root / "config.yaml").write_text(cfg.dump())
    params = SyntheticShapesParams(num_images=3, image_size=(48, 48), object_size=(8, 20),
                                   empty_fraction=0.0, seed=11)
    gt_json = generate_synthetic_shapes(params, root / "data")
    return {"root": root, "config": root / "config.yaml", "weights": root / "model.pth",
            "images": root / "data" / "images", "gt": gt_json}


def _run(trained, *extra: str) -> Path:
    args = ["--config-file", str(trained["config"]), "--weights", str(trained["weights"]),
            *extra]
    with contextlib.redirect_stdout(io.StringIO()):
        return predict_tool.main(args)


def test_folder_with_coco_json_gives_loadable_results_and_drawings(trained, tmp_path: Path):
    out = tmp_path / "out"
    # The trailing KEY VALUE pair overrides the config: random weights score about 1/4.
    results_path = _run(trained, "--input", str(trained["images"]), "--output", str(out),
                        "--coco-json", str(trained["gt"]),
                        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")
    assert results_path == out / "coco_instances_results.json"
    results = json.loads(results_path.read_text())
    assert len(results) == 15  # 5 detections per image (TEST.DETECTIONS_PER_IMAGE) x 3 images
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"}
        assert r["image_id"] in (1, 2, 3) and r["category_id"] in (1, 2, 3)  # dataset ids
        assert len(r["bbox"]) == 4 and 0 <= r["score"] <= 1
        assert mask_util.decode(r["segmentation"]).shape == (48, 48)
    assert {r["image_id"] for r in results} == {1, 2, 3}

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(trained["gt"]))
        dt = gt.loadRes(str(results_path))
        for iou_type in ("bbox", "segm"):
            evaluation = COCOeval(gt, dt, iou_type)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
            assert len(evaluation.stats) == 12 and evaluation.stats[0] >= 0  # scored, not -1
    assert len(dt.getAnnIds()) == 15

    drawn = sorted(p.name for p in (out / "vis").iterdir())
    assert drawn == ["000000.png", "000001.png", "000002.png"]
    with Image.open(out / "vis" / "000000.png") as image:
        assert image.format == "PNG" and image.size == (480, 480)  # small images are enlarged
    assert not (out / "image_ids.json").exists()  # ids came from the json


def test_single_image_gets_sequential_id_and_mapping_file(trained, tmp_path: Path):
    out = tmp_path / "out"
    image = trained["images"] / "000001.png"
    results_path = _run(trained, "--input", str(image), "--output", str(out),
                        "--confidence-threshold", "1.01")
    assert json.loads(results_path.read_text()) == []  # nothing scores above 1
    assert json.loads((out / "image_ids.json").read_text()) == {
        "images": [{"id": 1, "file_name": "000001.png", "height": 48, "width": 48}]}
    assert (out / "vis" / "000001.png").is_file()


def test_category_ids_are_mapped_back_to_the_dataset_ids():
    meta = Metadata(name="m").set(thing_dataset_id_to_contiguous_id={3: 0, 7: 1})
    results = [{"category_id": 0}, {"category_id": 1}, {"category_id": 0}]
    assert [r["category_id"] for r in predict_tool.to_dataset_category_ids(results, meta)] == [
        3, 7, 3]


def _error(trained, tmp_path: Path, *args: str, weights: bool = True) -> str:
    argv = ["--config-file", str(trained["config"]), "--output", str(tmp_path / "o"), *args]
    if weights:
        argv += ["--weights", str(trained["weights"])]
    with pytest.raises(SystemExit) as info:
        predict_tool.main(argv)
    return str(info.value.code)


def test_bad_inputs_give_clear_errors(trained, tmp_path: Path):
    images = str(trained["images"])
    assert _error(trained, tmp_path, "--input", images, "--weights", "nope.pth", weights=False) \
        == "predict: error: checkpoint not found: nope.pth (--weights)"
    assert _error(trained, tmp_path, "--input", images, weights=False) == (
        "predict: error: no checkpoint given: pass --weights or set MODEL.WEIGHTS")
    assert _error(trained, tmp_path, "--input", images, "MODEL.WEIGHTS", "gone.pth",
                  weights=False) == "predict: error: checkpoint not found: gone.pth (MODEL.WEIGHTS)"
    missing_cfg = ["--config-file", str(tmp_path / "none.yaml"), "--input", images]
    assert _error(trained, tmp_path, *missing_cfg) == (
        f"predict: error: config file not found: {tmp_path / 'none.yaml'} (--config-file)")
    assert _error(trained, tmp_path, "--input", str(tmp_path / "nothing")) == (
        f"predict: error: input not found: {tmp_path / 'nothing'} (--input)")
    (tmp_path / "empty").mkdir()
    assert _error(trained, tmp_path, "--input", str(tmp_path / "empty")) == (
        "predict: error: no images (.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp) in folder "
        f"{tmp_path / 'empty'} (--input)")
    assert _error(trained, tmp_path, "--input", images, "--coco-json",
                  str(tmp_path / "gt.json")) == (
        f"predict: error: COCO json not found: {tmp_path / 'gt.json'} (--coco-json)")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"images": [{"id": 9, "file_name": "x.png"}]}))
    assert _error(trained, tmp_path, "--input", images, "--coco-json", str(other)) == (
        f"predict: error: image '000000.png' is not in '{other}' (no unique 'file_name' match); "
        "pass the folder the json's file_names are relative to")
    assert _error(trained, tmp_path, "--input", images, "--dataset", "nope") == (
        "predict: error: unknown dataset 'nope' (--dataset)")
    assert "does not fit the config's model: 6 tensors have another shape" in _error(
        trained, tmp_path, "--input", images, "--weights", str(trained["weights"]),
        "MODEL.ROI_HEADS.NUM_CLASSES", "9", "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
        weights=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"not a png")
    assert _error(trained, tmp_path, "--input", str(broken)) == (
        "predict: error: none of the 1 images could be read (--input)")
    assert _error(trained, tmp_path, "--input", images, "--dataset",
                  "synthetic_shapes_many_val") == (
        "predict: error: dataset 'synthetic_shapes_many_val' has 20 classes (red_circle, "
        "green_circle, blue_circle, yellow_circle, red_square, green_square, blue_square, "
        "yellow_square, red_triangle, green_triangle) but the model predicts 3 "
        "(MODEL.ROI_HEADS.NUM_CLASSES): "
        "its names and ids would be wrong. Pass the --dataset the model was trained on")


def test_inputs_are_listed_once_without_the_output_and_bad_files_cost_nothing(
        trained, tmp_path: Path, caplog):
    """A symlinked subfolder is followed, a link back to the input is not looped over, the
    --output folder inside --input is left out (a second run would predict on its drawings),
    and an unreadable file is skipped, named and counted."""
    images = tmp_path / "in"
    shutil.copytree(trained["images"], images)
    (images / "bad.png").write_bytes(b"not a png")
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    shutil.copy(images / "000001.png", extra / "linked.png")
    (images / "sub").symlink_to(extra, target_is_directory=True)
    (images / "loop").symlink_to(images, target_is_directory=True)
    output = images / "predictions"
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # the second run finds the first one's drawings inside --input
            _run(trained, "--input", str(images), "--output", str(output))
    entries = json.loads((output / "image_ids.json").read_text())["images"]
    assert [e["file_name"] for e in entries] == ["000000.png", "000001.png", "000002.png",
                                                 "sub/linked.png"]
    assert "Skipped 1 of 5 images that cannot be read: bad.png" in caplog.text
    assert sorted(p.name for p in (output / "vis").rglob("*.png")) == [
        "000000.png", "000001.png", "000002.png", "linked.png"]
