"""tools/export_model.py and tools/predict.py --exported: the instant-test model exported to
TorchScript (tracing; scripting with a ResNet backbone, since detectron2's Swin does not script)
and to ONNX (run with onnxruntime), each giving the eager model's detections, on the sample's
size and on another one; and one-line refusals."""

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultPredictor

from training_harness import GuardedTrainer
from training_harness.deploy import ExportedPredictor

TOOLS = Path(__file__).resolve().parents[1] / "tools"
# Tolerances of exported vs eager: float32 kernels of another runtime (onnxruntime) reorder sums.
BOX_ATOL, SCORE_ATOL, MASK_IOU = 1e-3, 1e-4, 0.99
# A ResNet-18-FPN backbone instead of Swin (keys on top of the instant-test config).
RESNET = ["MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone", "MODEL.RESNETS.DEPTH", "18",
          "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.NORM", "GN",
          "MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']",
          "MODEL.FPN.IN_FEATURES", "['res2', 'res3', 'res4', 'res5']",
          "MODEL.PIXEL_MEAN", "[103.53, 116.28, 123.675]", "MODEL.PIXEL_STD", "[1.0, 1.0, 1.0]"]


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save_model(cfg, folder: Path) -> Path:
    """A random-init model's checkpoint and its config.yaml, as a training run leaves them."""
    folder.mkdir(parents=True)
    cfg.OUTPUT_DIR = str(folder)
    torch.manual_seed(0)
    model = GuardedTrainer.build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(folder)).save("model_final")
    (folder / "config.yaml").write_text(cfg.dump())
    return folder


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    mp = pytest.MonkeyPatch()
    mp.setenv("BALANCED_RCNN_DATASETS", str(root))
    mp.setenv("OMP_NUM_THREADS", "1")
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def trained(datasets, tmp_path_factory, load_project_config_module):
    cfg = load_project_config_module("quick_schedules/swin_tiny_balanced_instant_test.yaml")
    return _save_model(cfg, tmp_path_factory.mktemp("run") / "swin")


@pytest.fixture(scope="module")
def load_project_config_module(repo_root):
    from training_harness.config import load_project_config

    def load(relative_path, opts=()):
        return load_project_config(str(repo_root / "configs" / relative_path), opts)

    return load


def _export(run: Path, fmt: str, method: str, out: Path, *opts):
    return _tool("export_model").main([
        "--config-file", str(run / "config.yaml"), "--weights", str(run / "model_final.pth"),
        "--format", fmt, "--export-method", method, "--output", str(out), *opts])


def _assert_close(check):
    assert check["same_count"] == 1 and check["detections"] > 0, check
    assert check["max_box_diff"] <= BOX_ATOL and check["max_score_diff"] <= SCORE_ATOL, check
    assert check["classes_equal"] == 1 and check["min_mask_iou"] >= MASK_IOU, check


def _wide_image(datasets: Path) -> np.ndarray:
    """A val image stretched to 96 x 150: another input size than the sample's 64 x 64."""
    image = cv2.imread(str(datasets / "synthetic_shapes_tiny_val" / "images" / "000000.png"))
    return cv2.resize(image, (150, 96))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_traced_export_gives_the_eager_detections(trained, datasets, tmp_path, fmt):
    report = _export(trained, fmt, "tracing", tmp_path)
    assert report["outputs"]["boxes"][1:] == [4] and report["outputs"]["masks"][1:] == [1, 28, 28]
    assert report["inputs"]["image"] == [3, 64, 64] and len(report["checks"]) == 3
    for check in report["checks"]:
        _assert_close(check)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["file"].endswith("model.ts" if fmt == "torchscript" else "model.onnx")
    if fmt == "onnx":
        assert saved["onnx_opset"] == 17
    # Another input size than the sample's, through the predictor tools/predict.py uses.
    from training_harness.config import load_project_config

    run_cfg = load_project_config(str(trained / "config.yaml"),
                                  weights=str(trained / "model_final.pth"))
    wide = _wide_image(datasets)
    ours = ExportedPredictor(run_cfg, Path(saved["file"]))(wide)["instances"]
    eager = DefaultPredictor(run_cfg)(wide)["instances"]
    assert ours.image_size == eager.image_size == (96, 150) and len(ours) == len(eager) > 0
    torch.testing.assert_close(ours.pred_boxes.tensor, eager.pred_boxes.tensor, atol=BOX_ATOL,
                               rtol=0)
    torch.testing.assert_close(ours.scores, eager.scores, atol=SCORE_ATOL, rtol=0)
    assert torch.equal(ours.pred_classes, eager.pred_classes)
    iou = (ours.pred_masks & eager.pred_masks).sum() / (ours.pred_masks | eager.pred_masks).sum()
    assert iou >= MASK_IOU


def test_scripting_a_resnet_model_gives_the_eager_detections(datasets, tmp_path,
                                                             load_project_config_module):
    cfg = load_project_config_module("quick_schedules/swin_tiny_balanced_instant_test.yaml",
                                     RESNET)
    run = _save_model(cfg, tmp_path / "resnet")
    report = _export(run, "torchscript", "scripting", tmp_path / "out")
    for check in report["checks"]:
        _assert_close(check)


def test_predict_with_the_exported_model(trained, datasets, tmp_path):
    _export(trained, "onnx", "tracing", tmp_path / "export")
    predict = _tool("predict")
    images = datasets / "synthetic_shapes_tiny_val" / "images"
    predict.main(["--config-file", str(trained / "config.yaml"), "--exported",
                  str(tmp_path / "export" / "model.onnx"), "--input", str(images),
                  "--output", str(tmp_path / "onnx")])
    predict.main(["--config-file", str(trained / "config.yaml"), "--weights",
                  str(trained / "model_final.pth"), "--input", str(images),
                  "--output", str(tmp_path / "eager")])
    ours = json.loads((tmp_path / "onnx" / "coco_instances_results.json").read_text())
    eager = json.loads((tmp_path / "eager" / "coco_instances_results.json").read_text())
    assert len(ours) == len(eager) > 0
    for a, b in zip(ours, eager):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert abs(a["score"] - b["score"]) <= SCORE_ATOL
        assert np.allclose(a["bbox"], b["bbox"], atol=BOX_ATOL)
    assert len(list((tmp_path / "onnx" / "vis").glob("*.png"))) == 8


@pytest.mark.parametrize("case,message", [
    ("swin_scripting", "export_model: this model cannot be scripted: detectron2's SwinTransformer "
                       "backbone is not TorchScript-compatible"),
    ("onnx_scripting", "export_model: ONNX export goes through tracing here: use --export-method "
                       "tracing"),
    ("no_checkpoint", "export_model: checkpoint not found: "),
    ("other_classes", "does not fit the config's model: 6 tensors have another shape"),
    ("unreadable_sample", "export_model: none of the 1 sample and check images could be read"),
])
def test_refusals_are_one_line(trained, datasets, tmp_path, capsys, case, message):
    fmt, method, opts = "torchscript", "tracing", []
    run = trained
    if case == "swin_scripting":
        method = "scripting"
    elif case == "onnx_scripting":
        fmt, method = "onnx", "scripting"
    elif case == "no_checkpoint":
        run = tmp_path
        (tmp_path / "config.yaml").write_text((trained / "config.yaml").read_text())
    elif case == "other_classes":
        opts = ["MODEL.ROI_HEADS.NUM_CLASSES", "2", "DATASETS.TEST", "()",
                "--sample-image",
                str(datasets / "synthetic_shapes_tiny_val" / "images" / "000000.png")]
        opts = opts[4:] + opts[:4]  # the option first, the overrides last
    elif case == "unreadable_sample":
        (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a header, no image
        opts = ["--sample-image", str(tmp_path / "cut.png")]
    with pytest.raises(SystemExit) as info:
        _export(run, fmt, method, tmp_path / "out", *opts)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_deploy_benchmark_tiny(datasets, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "bench_deploy", TOOLS.parent / "benchmarks" / "bench_deploy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = module.main(["--tiny", "--results-dir", str(tmp_path)])
    assert set(data["timings_ms"]) == {"eager", "torchscript", "onnx"}
    assert all(v > 0 for v in data["timings_ms"].values())
    assert "| runtime | ms per image | / eager | export s |" in (tmp_path / "bench_deploy.md").read_text()


def test_an_unreadable_image_among_good_ones_is_skipped_and_named(datasets, tmp_path, caplog):
    """The rule of predict.py, export_model.py's check images and the demo's drawings."""
    from training_harness.deploy import readable_images, skipped_images_line

    good = datasets / "synthetic_shapes_tiny_val" / "images" / "000000.png"
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:60])
    skipped = []
    read = list(readable_images([good, tmp_path / "cut.png", good], "BGR", skipped))
    assert [i for i, _ in read] == [0, 2] and skipped == [1]
    assert read[0][1].shape == (64, 64, 3)
    assert f"Skipping {tmp_path / 'cut.png'}: cannot read it (" in caplog.text
    assert skipped_images_line(["cut.png"], 3) == "Skipped 1 of 3 images that cannot be read: " \
                                                   "cut.png"
