"""
The yacs keys of the model, its losses, the optimizer, the sampler and copy-paste.
``add_balanced_rcnn_config(cfg)`` adds them with their defaults; calling it twice is harmless (keys
already present keep their values).
"""
import difflib
from typing import Sequence

from detectron2.config import CfgNode as CN

__all__ = ["add_balanced_rcnn_config", "check_choice"]


def check_choice(key: str, value: object, choices: Sequence[str]) -> None:
    """
    The one refusal of a key with a fixed set of values; each component that reads such a key
    calls it with its own table, when it reads the key and, through the set-up checks, before
    anything is built.

    Raises:
        ValueError: "<key> must be one of <choices>; got <value>. Did you mean <close match>?"
    """
    if value in choices:
        return
    choices = sorted(choices, key=str.lower)
    close = difflib.get_close_matches(str(value), choices, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"{key} must be one of {', '.join(map(repr, choices))}; got {value!r}."
                     f"{hint}")


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
    # Divisor of loss_rpn_loc and loss_box_reg: "samples" (detectron2's: B x N anchors, R
    # proposals) or "positives" (the original design: positive anchors P, foreground proposals F;
    # configs/swin_balanced_design.yaml).
    cfg.MODEL.BALANCED_LOSS.REG_NORMALIZER = "samples"
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


def add_balanced_rcnn_config(cfg: CN) -> None:
    """Add the keys of the model, losses, optimizer, sampler and copy-paste (idempotent)."""
    # Each section is added once; a second call must not reset values already set.
    if "BALANCED_LOSS" not in cfg.MODEL:
        _add_balanced_loss_config(cfg)
    if "SWIN" not in cfg.MODEL:
        _add_swin_config(cfg)
    if "OPTIMIZER" not in cfg.SOLVER:
        _add_solver_config(cfg)
    if "OBJECT_IMAGE_SHARE" not in cfg.DATALOADER:
        _add_data_config(cfg)
