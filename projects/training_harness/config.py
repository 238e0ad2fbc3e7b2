"""
The yacs keys of the training harness (the health monitor, reliability, dataset registration) and
the config loader that train_net.py and the tools start from. ``add_training_harness_config(cfg)``
adds them with their defaults; calling it twice is harmless.
"""
import os
from typing import Optional, Sequence

import yaml
from balanced_rcnn import add_balanced_rcnn_config
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .errors import UnsafeFileError


def _add_dataset_config(cfg: CN) -> None:
    # Read by register_datasets_from_config (data/register.py), e.g. from the command line:
    # DATASETS.REGISTER_COCO "[['mine_train', 'train.json', 'images/']]".
    # Users' COCO instances datasets: [name, json_file, image_root] triples; classes from the json.
    cfg.DATASETS.REGISTER_COCO = []
    # Cache folder of the generated synthetic datasets; "" = $BALANCED_RCNN_DATASETS or datasets/.
    cfg.DATASETS.SYNTHETIC_ROOT = ""


def _add_health_config(cfg: CN) -> None:
    # The training-health monitor (health/monitor.py): periodic detection checks, collapse
    # warnings/stop, per-step balance measures, stop on non-finite losses or gradient norm.
    cfg.HEALTH = CN()
    cfg.HEALTH.ENABLED = True  # off: detectron2's plain training loop and no health/ scalars
    cfg.HEALTH.PERIOD = 100  # a detection check after every PERIOD iterations; 0: no checks
    cfg.HEALTH.NUM_IMAGES = 16  # check images: the first NUM_IMAGES records of HEALTH.DATASET
    cfg.HEALTH.DATASET = ""  # registered dataset of the check images; "": DATASETS.TEST[0]
    cfg.HEALTH.SCORE_THRESHOLDS = (0.05, 0.3, 0.5)  # detections per image are counted at each
    # Score of the collapse rule; 0.05 is detectron2's SCORE_THRESH_TEST (what COCO AP sees).
    cfg.HEALTH.MAIN_THRESHOLD = 0.05
    # A check is collapsed when detections per image are 0 or below this x the best earlier one,
    # capped at the ground-truth objects per check image (health/collapse.py, is_collapsed_check).
    cfg.HEALTH.COLLAPSE_FRACTION = 0.05
    cfg.HEALTH.PATIENCE = 3  # K: consecutive collapsed checks that make a collapse
    cfg.HEALTH.WARMUP_ITERS = 100  # checks before this many iterations are logged, not judged
    # The confident rule: from CONFIDENT_AFTER x SOLVER.MAX_ITER on, a check also counts towards
    # a collapse when its detections per image at CONFIDENT_SCORE (-1: TEST.DEPLOYMENT_SCORE_THRESH)
    # are below CONFIDENT_FRACTION x the objects per check image (0: rule off).
    cfg.HEALTH.CONFIDENT_SCORE = -1.0
    cfg.HEALTH.CONFIDENT_FRACTION = 0.1
    cfg.HEALTH.CONFIDENT_AFTER = 0.5
    # The no-foreground rule: a check also counts when, in most steps since the previous one, the
    # sampled anchors or ROIs held no foreground.
    cfg.HEALTH.NO_FOREGROUND_RULE = True
    cfg.HEALTH.ACTION = "warn"  # on a collapse: "warn", or "stop" (checkpoint, exit code 3)
    # Also check once before the first step (logged, not judged): where fine-tuning starts from.
    cfg.HEALTH.CHECK_AT_START = False
    # Take the check images only among the images that hold an object (a non-crowd annotation):
    # on a mostly empty val set the first NUM_IMAGES say little about lost detections.
    cfg.HEALTH.OBJECT_IMAGES_ONLY = False
    # Stop (exit code 4) on a loss that explodes while finite (health/divergence.py): a total loss
    # above LOSS_CEILING, or above LOSS_JUMP_FACTOR x the largest total of every earlier step of
    # the run. 0 turns the ceiling / the jump rule off.
    cfg.HEALTH.LOSS_CEILING = 1000.0
    cfg.HEALTH.LOSS_JUMP_FACTOR = 100.0


def _add_reliability_config(cfg: CN) -> None:
    # Bad inputs and interrupted or broken runs (docs/reliability.md). Checkpoints are always
    # written atomically and SIGTERM / Ctrl-C always checkpoint before exiting: no key for those.
    cfg.RELIABILITY = CN()
    # Invalid annotations in a DATASETS.REGISTER_COCO json (zero-area box, polygon with < 3
    # points): "error" refuses the json, naming them; "skip" drops each one with a warning.
    cfg.RELIABILITY.BAD_ANNOTATIONS = "error"
    # Training images that cannot be used (missing, unreadable, truncated, size not the json's)
    # are skipped, logged and counted; skipping more than this share of the set is an error.
    cfg.RELIABILITY.MAX_SKIPPED_IMAGE_FRACTION = 0.01
    # DDP: a worker that sees no heartbeat from a peer for this many seconds takes it for dead
    # and exits (code 75) instead of waiting in a collective; 0 turns the watchdog off.
    cfg.RELIABILITY.PEER_TIMEOUT_S = 60.0
    # DDP: timeout of every collective (detectron2's launch(timeout=...), default 30 min); it
    # bounds a wait on a peer that is alive but stuck. Keep it above the longest evaluation.
    cfg.RELIABILITY.COLLECTIVE_TIMEOUT_MIN = 30.0
    # Training without --resume into an OUTPUT_DIR that holds checkpoints is refused; True
    # deletes that run's checkpoints and metrics.json instead (reliability/output_dir.py).
    cfg.RELIABILITY.OVERWRITE_OUTPUT = False


def add_training_harness_config(cfg: CN) -> None:
    """Add the harness's keys to ``cfg`` (idempotent)."""
    if "REGISTER_COCO" not in cfg.DATASETS:
        _add_dataset_config(cfg)
    if "HEALTH" not in cfg:
        _add_health_config(cfg)
    if "RELIABILITY" not in cfg:
        _add_reliability_config(cfg)


def load_project_config(config_file: str, opts: Sequence[str] = (),
                        weights: Optional[str] = None) -> CN:
    """
    detectron2's defaults with the project's keys, ``config_file`` merged over them and then the
    KEY VALUE pairs ``opts`` (unfrozen); ``weights``, a tool's --weights, replaces MODEL.WEIGHTS.

    Raises:
        FileNotFoundError: ``config_file`` does not exist (named with --config-file).
    """
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {config_file} (--config-file)")
    cfg = get_cfg()
    add_balanced_rcnn_config(cfg)
    add_training_harness_config(cfg)
    # yaml.safe_load only: detectron2's default falls back to yaml.unsafe_load, which runs the
    # python tags of a crafted file (in the config or any of its _BASE_ files).
    try:
        cfg.merge_from_file(str(config_file), allow_unsafe=False)
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        where = f"'{mark.name}', line {mark.line + 1}" if mark is not None else f"'{config_file}'"
        raise UnsafeFileError(
            f"Config {where}: {e.problem} (a config holds plain values: numbers, strings, lists, "
            "true/false; a python tag builds an object, which can run code). Loaded from "
            f"--config-file '{config_file}'.") from None
    cfg.merge_from_list(list(opts))
    if weights is not None:
        cfg.MODEL.WEIGHTS = str(weights)
    return cfg
