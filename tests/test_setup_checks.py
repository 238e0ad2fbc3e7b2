"""Checks that run at set-up, before the model is built: config keys with a fixed set of values,
HEALTH.DATASET and the health check images; and the image files detectron2 would misread."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetMapper
from detectron2.data import DatasetCatalog
from PIL import Image
from training_harness import register_datasets_from_config
from training_harness.config_checks import check_config_choices
from training_harness.data.images import check_image_mode, size_mismatch_hint
from training_harness.data.mapper import SkippingMapper
from training_harness.errors import UnsupportedImageError
from training_harness.health.check_images import check_health_images

from coco_builders import SIZE, coco_cfg, write_coco

pytestmark = pytest.mark.usefixtures("forget_bad_datasets")

SHIPPED = sorted(str(p.relative_to(Path(__file__).resolve().parents[1] / "configs"))
                 for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", SHIPPED)
def test_every_shipped_config_passes(load_project_config, config):
    check_config_choices(load_project_config(config))


@pytest.mark.parametrize("key, value, message", [
    # Not read in this run (HEALTH.ENABLED False): refused all the same.
    ("HEALTH.ACTION", "stpo", "HEALTH.ACTION must be one of 'stop', 'warn'; got 'stpo'. Did you "
                              "mean 'stop'?"),
    ("SOLVER.OPTIMIZER", "AdamWW", "SOLVER.OPTIMIZER must be one of 'AdamW', 'SGD'; got "
                                   "'AdamWW'. Did you mean 'AdamW'?"),
    ("SOLVER.AMP.PRECISION", "fp16", "SOLVER.AMP.PRECISION must be one of 'bfloat16', "
                                     "'float16'; got 'fp16'."),
    ("MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "gio", "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE must "
     "be one of 'ciou', 'diou', 'giou', 'smooth_l1'; got 'gio'. Did you mean 'giou'?"),
    # detectron2's keys: its registries, and the builders that read them.
    ("MODEL.ROI_HEADS.NAME", "BalancedROIHead", "MODEL.ROI_HEADS.NAME must be one of "
                                                "'BalancedROIHeads', "),
    ("INPUT.RANDOM_FLIP", "horizontall", "detectron2 refuses INPUT.RANDOM_FLIP = 'horizontall' "
     "(ValueError: At least one of horiz or vert has to be True!)"),
    ("INPUT.CROP.TYPE", "relativ", "detectron2 refuses INPUT.CROP.TYPE = 'relativ' "
                                   "(AssertionError: )"),  # cropping is off: refused all the same
    ("SOLVER.WARMUP_METHOD", "lin", "detectron2 refuses SOLVER.WARMUP_METHOD = 'lin' (ValueError: "
                                    "Unknown warmup method: lin)"),
    ("INPUT.MASK_FORMAT", "bitmap", "detectron2 refuses INPUT.MASK_FORMAT = 'bitmap' "
                                    "(AssertionError: bitmap)"),
    ("MODEL.FPN.NORM", "BNN", "detectron2 refuses MODEL.FPN.NORM = 'BNN' (KeyError: 'BNN')"),
    ("MODEL.ROI_MASK_HEAD.POOLER_TYPE", "ROIAlignV3", "detectron2 refuses "
     "MODEL.ROI_MASK_HEAD.POOLER_TYPE = 'ROIAlignV3' (ValueError: Unknown pooler type: "
     "ROIAlignV3)"),
    # detectron2 only asserts these (FPN) or reads them in the loss (RetinaNet): the core's tables.
    ("MODEL.FPN.FUSE_TYPE", "mean", "MODEL.FPN.FUSE_TYPE must be one of 'avg', 'sum'; got "
                                    "'mean'."),
    ("MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "gio", "MODEL.RETINANET.BBOX_REG_LOSS_TYPE must be one "
     "of 'ciou', 'diou', 'giou', 'smooth_l1'; got 'gio'. Did you mean 'giou'?"),
])
def test_a_bad_choice_is_refused_with_close_matches(tiny_cfg, key, value, message):
    tiny_cfg.HEALTH.ENABLED = False
    tiny_cfg.merge_from_list([key, value])
    with pytest.raises(ValueError) as info:
        check_config_choices(tiny_cfg)
    assert str(info.value).startswith(message)


def test_balanced_loss_keys_are_checked_with_stock_heads(load_project_config):
    cfg = load_project_config("swin_stock.yaml")
    assert cfg.MODEL.ROI_HEADS.NAME == "StandardROIHeads"  # never reads MODEL.BALANCED_LOSS
    cfg.MODEL.BALANCED_LOSS.REG_NORMALIZER = "sample"
    with pytest.raises(ValueError, match="^MODEL.BALANCED_LOSS.REG_NORMALIZER must be one of "
                                         "'positives', 'samples'; got 'sample'. Did you mean "
                                         "'samples'\\?$"):
        check_config_choices(cfg)
    cfg.MODEL.BALANCED_LOSS.REG_NORMALIZER = "samples"
    cfg.MODEL.BALANCED_LOSS.EPS = 0.0  # a range, checked by the heads' own check
    with pytest.raises(ValueError, match="^MODEL.BALANCED_LOSS.EPS must be finite and > 0"):
        check_config_choices(cfg)


def test_other_keys_that_detectron2s_builders_read_do_not_matter(tiny_cfg):
    # Keypoints without a registered dataset, a schedule whose steps pass MAX_ITER: not the
    # business of the choice check (each builder sees detectron2's defaults and its own key).
    tiny_cfg.merge_from_list(["MODEL.KEYPOINT_ON", "True", "DATASETS.TRAIN", "('unregistered',)",
                              "SOLVER.STEPS", "(50, 100)", "SOLVER.MAX_ITER", "60"])
    check_config_choices(tiny_cfg)


def test_detectron2_defaults_pass(tiny_cfg):
    from balanced_rcnn import add_balanced_rcnn_config
    from detectron2.config import get_cfg
    from training_harness import add_training_harness_config

    cfg = get_cfg()
    add_balanced_rcnn_config(cfg)
    add_training_harness_config(cfg)
    check_config_choices(cfg)  # Res5ROIHeads with an empty ROI_BOX_HEAD.NAME included


def test_unknown_health_dataset_is_refused_at_registration(tmp_path):
    json_file, root = write_coco(tmp_path)
    cfg = coco_cfg("bad_health_train", json_file, root)
    cfg.HEALTH.DATASET = "bad_health_trian"
    with pytest.raises(ValueError, match="^HEALTH.DATASET: unknown dataset 'bad_health_trian'. "
                                         "Did you mean: bad_health_train"):
        register_datasets_from_config(cfg)


def test_an_unusable_check_image_is_refused_at_set_up(tiny_cfg, tmp_path):
    json_file, root = write_coco(tmp_path)
    cv2.imwrite(str(root / "3.png"), np.full((SIZE, SIZE), 4000, np.uint16))
    cfg = coco_cfg("bad_health_images", json_file, root, tiny_cfg)
    cfg.DATASETS.TEST = ("bad_health_images",)
    cfg.HEALTH.NUM_IMAGES = 4
    register_datasets_from_config(cfg)
    with pytest.raises(ValueError, match=rf"^Cannot use image '{root / '3.png'}' \(image id 3\): "
                                         r"UnsupportedImageError: it is a 16-bit image"):
        check_health_images(cfg)
    cfg.HEALTH.NUM_IMAGES = 2  # the first two are fine
    check_health_images(cfg)
    cfg.HEALTH.NUM_IMAGES, cfg.HEALTH.PERIOD = 4, 0  # no checks: nothing is read
    check_health_images(cfg)


def test_float_and_32_bit_images_are_refused(tmp_path):
    for mode, kind in (("F", "32-bit float"), ("I", "32-bit integer")):
        path = tmp_path / f"{mode}.tif"
        Image.new(mode, (8, 8)).save(path)
        with pytest.raises(UnsupportedImageError, match=f"^it is a {kind} image \\(PIL mode "
                                                        f"{mode}\\)"):
            check_image_mode(str(path))


def test_palette_grey_and_alpha_images_are_read_with_their_colors(tiny_cfg, tmp_path):
    json_file, root = write_coco(tmp_path, num_images=3)
    colors = np.zeros((SIZE, SIZE, 3), np.uint8)
    colors[:, :, 0], colors[:, :, 2] = 200, 30  # RGB
    Image.fromarray(colors).convert("P", palette=Image.ADAPTIVE).save(root / "1.png")
    Image.fromarray(colors[:, :, 0]).save(root / "2.png")  # grey "L"
    Image.fromarray(np.dstack([colors, np.full((SIZE, SIZE), 255, np.uint8)])).save(
        root / "3.png")  # RGBA
    cfg = coco_cfg("bad_palette", json_file, root, tiny_cfg)
    register_datasets_from_config(cfg)
    mapper = SkippingMapper(DatasetMapper(cfg, False))
    images = [mapper(d)["image"].permute(1, 2, 0).numpy() for d in DatasetCatalog.get(
        "bad_palette")]
    rgb = [i if tiny_cfg.INPUT.FORMAT == "RGB" else i[..., ::-1] for i in images]
    assert np.abs(rgb[0].astype(int) - [200, 0, 30]).max() <= 2  # palette: its colors
    assert (rgb[1] == 200).all()  # grey: the same value in each channel
    assert (rgb[2] == [200, 0, 30]).all()  # alpha dropped


def test_size_mismatch_of_an_exif_rotated_photo_says_why(tmp_path):
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.new("RGB", (40, 32)).save(path, exif=exif)
    assert size_mismatch_hint(str(path), json_width=40, json_height=32) == (
        " Its EXIF orientation 6 rotates it by 90 degrees, which detectron2 applies; the json's "
        "width and height must be those of the rotated image.")
    # A json size that is neither the stored nor the rotated one: EXIF is not the cause.
    assert size_mismatch_hint(str(path), json_width=50, json_height=50) == ""
    Image.new("RGB", (40, 32)).save(tmp_path / "plain.jpg")
    assert size_mismatch_hint(str(tmp_path / "plain.jpg"), 40, 32) == ""


def test_set_up_checks_leave_the_random_state_as_they_found_it(tiny_cfg, tmp_path):
    # The training sampler's seed is drawn from NumPy's state after set-up: a check that drew
    # from it (the test-time resize does) would change a seeded run's data.
    import random

    import torch
    from detectron2.modeling import build_model
    from training_harness.reliability.checkpoint import AtomicCheckpointer
    from training_harness.reliability.weights_files import check_weights_file

    json_file, root = write_coco(tmp_path)
    cfg = coco_cfg("bad_random_state", json_file, root, tiny_cfg)
    cfg.DATASETS.TEST = ("bad_random_state",)
    register_datasets_from_config(cfg)
    AtomicCheckpointer(build_model(cfg), str(tmp_path)).save("model_final")
    cfg.MODEL.WEIGHTS = str(tmp_path / "model_final.pth")
    def state():
        name, keys, *position = np.random.get_state()  # position: where in the keys it is
        return random.getstate(), keys.copy(), position, torch.get_rng_state()

    before = state()
    check_health_images(cfg)
    check_weights_file(cfg, resume=False, eval_only=True)  # builds a model copy
    after = state()
    assert before[0] == after[0]
    assert (before[1] == after[1]).all() and before[2] == after[2]
    assert torch.equal(before[3], after[3])
    # What the test-time resize draws (detectron2 builds it with (size, size)): it shows.
    np.random.choice([128, 128])
    assert state()[2] != before[2]
