"""
All yacs keys of the project. ``add_balanced_rcnn_config(cfg)`` adds them with their defaults;
calling it twice is harmless (keys already present keep their values). ``load_project_config``
is what train_net.py and the tools start from.
"""
import os
from typing import Optional, Sequence

import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .errors import UnsafeFileError


def _add_balanced_loss_config(cfg: CN) -> None:
    # Weights and normalizers of the balanced RPN / ROI losses (modeling/losses.py).
    cfg.MODEL.BALANCED_LOSS = CN()
    # w_pos of the RPN objectness BCE: weight of positive (foreground) anchors; negatives get 1.
    cfg.MODEL.BALANCED_LOSS.RPN_CLS_POS_WEIGHT = 1.0
    # Multiplier of loss_rpn_cls (replaces MODEL.RPN.LOSS_WEIGHT, which must stay 1.0).
    cfg.MODEL.BALANCED_LOSS.RPN_LOSS_CLS_WEIGHT = 1.0
    # Multiplier of loss_rpn_loc (replaces MODEL.RPN.BBOX_REG_LOSS_WEIGHT).
    cfg.MODEL.BALANCED_LOSS.RPN_LOSS_BBOX_WEIGHT = 1.0
    # w_pos of the ROI classification CE: weight of foreground proposals; background gets 1.
    cfg.MODEL.BALANCED_LOSS.ROI_CLS_POS_WEIGHT = 1.0
    # Multiplier of loss_cls.
    cfg.MODEL.BALANCED_LOSS.ROI_LOSS_CLS_WEIGHT = 1.0
    # Multiplier of loss_box_reg (replaces MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT).
    cfg.MODEL.BALANCED_LOSS.ROI_LOSS_BBOX_WEIGHT = 1.0
    # Multiplier of loss_mask.
    cfg.MODEL.BALANCED_LOSS.ROI_LOSS_MASK_WEIGHT = 1.0
    # Added to every count normalizer (the formulas: modeling/losses.py). Must be > 0.
    cfg.MODEL.BALANCED_LOSS.EPS = 1e-6
    # Replace every count by its mean over workers (one all-reduce) so that DDP's gradient
    # averaging equals training on one large batch.
    cfg.MODEL.BALANCED_LOSS.SYNC_NORMALIZERS = True
    # Divisor of loss_rpn_loc and loss_box_reg: "positives" (the design: positive anchors P,
    # foreground proposals F) or "samples" (detectron2's: B x N anchors, R proposals).
    cfg.MODEL.BALANCED_LOSS.REG_NORMALIZER = "positives"
    # m of a running average of every count (detectron2's RetinaNet/FCOS use 0.9); 0: the
    # counts of each batch (the design).
    cfg.MODEL.BALANCED_LOSS.NORMALIZER_MOMENTUM = 0.0
    # Raise the RPN/ROI positive weights so that positives carry the sampler's POSITIVE_FRACTION
    # of the classification weight when too few were sampled (class-balancing, HED 2015).
    cfg.MODEL.BALANCED_LOSS.ADAPTIVE_POS_WEIGHT = False
    # > 0: initialize the RPN objectness and ROI class biases to this foreground probability
    # (Focal Loss's prior pi, Lin et al. 2017); 0: detectron2's zero biases.
    cfg.MODEL.BALANCED_LOSS.PRIOR_PROB = 0.0


def _add_swin_config(cfg: CN) -> None:
    # detectron2.modeling.backbone.swin.SwinTransformer's arguments (Swin paper, Liu et al. 2021).
    cfg.MODEL.SWIN = CN()
    cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE = 224  # image size the ImageNet weights were trained at
    cfg.MODEL.SWIN.PATCH_SIZE = 4  # patch embedding stride
    cfg.MODEL.SWIN.EMBED_DIM = 96  # C: channels of stage 1 (96 = Swin-T/S, 128 = Swin-B)
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]  # blocks per stage (Swin-T; Swin-S/B: 2-2-18-2)
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]  # attention heads per stage
    cfg.MODEL.SWIN.WINDOW_SIZE = 7  # M: local attention window, in patches
    cfg.MODEL.SWIN.MLP_RATIO = 4.0  # MLP hidden size / embedding size
    cfg.MODEL.SWIN.QKV_BIAS = True  # learnable bias on query, key, value
    cfg.MODEL.SWIN.DROP_RATE = 0.0  # dropout after attention projection and MLP
    cfg.MODEL.SWIN.ATTN_DROP_RATE = 0.0  # dropout on attention weights
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.2  # stochastic depth, linearly increasing to this value
    cfg.MODEL.SWIN.APE = False  # absolute position embedding (off in the published detectors)
    cfg.MODEL.SWIN.PATCH_NORM = True  # LayerNorm after patch embedding
    cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]  # stages 1-4, strides 4-32
    # -1: train all; 0: freeze patch embedding; 1: also the absolute position embedding;
    # n >= 2: also stages 1..n-1 (detectron2 SwinTransformer._freeze_stages semantics).
    cfg.MODEL.SWIN.FROZEN_STAGES = -1
    cfg.MODEL.SWIN.USE_CHECKPOINT = False  # activation checkpointing: less memory, slower


def _add_solver_config(cfg: CN) -> None:
    # "SGD" (detectron2's default) or "AdamW" (the Swin detection recipe).
    cfg.SOLVER.OPTIMIZER = "SGD"
    # Parameters whose own name (the part after the last dot) is one of these get no weight
    # decay (Swin recipe); passed as `overrides` to get_default_optimizer_params.
    cfg.SOLVER.NO_WEIGHT_DECAY_KEYS = ["relative_position_bias_table", "absolute_pos_embed"]
    # AdamW's (beta1, beta2).
    cfg.SOLVER.BETAS = (0.9, 0.999)
    # With SOLVER.AMP.ENABLED: autocast dtype of detectron2's AMPTrainer, "float16" (its
    # default, with a GradScaler) or "bfloat16" (no overflow to guard; the scaler stays harmless).
    cfg.SOLVER.AMP.PRECISION = "float16"
    # SOLVER.CLIP_GRADIENTS.CLIP_TYPE also accepts "full_model": one L2 clip of the total norm
    # over all parameters (torch.nn.utils.clip_grad_norm_) with max norm CLIP_VALUE.


def _add_data_config(cfg: CN) -> None:
    # Read by balanced_rcnn.register_datasets_from_config (data/register.py), e.g. from the
    # command line: DATASETS.REGISTER_COCO "[['mine_train', 'train.json', 'images/']]".
    # Users' COCO instances datasets: [name, json_file, image_root] triples; classes from the json.
    cfg.DATASETS.REGISTER_COCO = []
    # Cache folder of the generated synthetic datasets; "" = $BALANCED_RCNN_DATASETS or datasets/.
    cfg.DATASETS.SYNTHETIC_ROOT = ""
    # With DATALOADER.SAMPLER_TRAIN "ObjectShareTrainingSampler" or
    # "ClassAwareObjectShareTrainingSampler" (data/samplers.py): the share of sampled training
    # images that hold objects, in (0, 1].
    cfg.DATALOADER.OBJECT_IMAGE_SHARE = 0.5
    # Simple copy-paste (Ghiasi et al. 2021; data/copy_paste.py): the probability that an empty
    # training image gets the objects of a random object image pasted; 0: off.
    cfg.INPUT.COPY_PASTE = CN()
    cfg.INPUT.COPY_PASTE.PROBABILITY = 0.0
    # The score at which a deployment keeps detections: every evaluation reports the image-level
    # metrics there (false-alarm images, object recall; evaluation/image_level.py).
    cfg.TEST.DEPLOYMENT_SCORE_THRESH = 0.5


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


def add_balanced_rcnn_config(cfg: CN) -> None:
    """Add every key of the project to ``cfg`` (idempotent)."""
    # Each section is added once; a second call must not reset values already set.
    if "BALANCED_LOSS" not in cfg.MODEL:
        _add_balanced_loss_config(cfg)
    if "SWIN" not in cfg.MODEL:
        _add_swin_config(cfg)
    if "OPTIMIZER" not in cfg.SOLVER:
        _add_solver_config(cfg)
    if "REGISTER_COCO" not in cfg.DATASETS:
        _add_data_config(cfg)
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
