"""
What the quality A/B (quality_ab.py) compares: its data settings and its arms. Every arm is one
set of config overrides on the CPU demo configs; every balanced arm sets every
MODEL.BALANCED_LOSS key it depends on, so no arm changes when a config file's defaults do.

Settings (all keep the images without objects, DATALOADER.FILTER_EMPTY_ANNOTATIONS False: with
True detectron2 drops them and the imbalance under test disappears):

- mild: synthetic_shapes_train / _val (10% empty images, objects 12-60 px in 192-px images,
  3 classes equally frequent), resized to 128 px as in the CPU demo;
- severe: synthetic_shapes_rare_train / _val (80% empty, objects 8-20 px in 128-px images,
  class frequencies 0.7 / 0.2 / 0.1);
- coco_sampling: severe's data with the COCO configs' sample sizes (RPN 256 anchors and ROI
  512 proposals per image, 2000 / 1000 proposals before / after NMS; the tiny config has
  128 / 128 and 500 / 200), so that the sampled foreground share is several times smaller;
- many: synthetic_shapes_many_* (20 classes = 5 shapes x 4 colours with Zipf frequencies,
  85% empty training images, objects 8-20 px);
- sparse: synthetic_shapes_novel_* from random init (95% empty training images, 2 classes,
  0.8 / 0.2, objects 8-20 px): the fine-tune's data without the pretraining;
- finetune: a detector trained on mild (the stock CPU demo: 1500 iterations, seed 0, trained
  once and reused) fine-tuned on synthetic_shapes_novel_* (2 classes it has never seen, star
  and hexagon, 0.8 / 0.2; 95% empty training images; objects 8-20 px): its class layers are
  re-initialized for the new classes, everything else starts trained.
"""

from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

__all__ = ["ARMS", "Arm", "PRETRAINS", "Pretrain", "SETTINGS", "TINY_SETTINGS", "Setting",
           "balanced_overrides"]

Overrides = Tuple[Tuple[str, str], ...]


@dataclass(frozen=True)
class Pretrain:
    """A run whose model_final.pth is where a fine-tune setting starts."""

    setting: str  # trained on this setting's data
    arm: str
    iters: int
    seed: int

    @property
    def name(self) -> str:
        return f"pretrain_{self.setting}_{self.arm}_{self.iters}it_s{self.seed}"


@dataclass(frozen=True)
class Setting:
    train: str
    test: str
    image_side: int  # INPUT.MIN_SIZE_TRAIN / MIN_SIZE_TEST
    num_classes: int = 3
    overrides: Overrides = ()
    pretrain: Optional[str] = None  # a key of PRETRAINS: MODEL.WEIGHTS is its model_final.pth


COCO_SAMPLING: Overrides = (
    ("MODEL.RPN.BATCH_SIZE_PER_IMAGE", "256"),
    ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "512"),
    ("MODEL.RPN.PRE_NMS_TOPK_TRAIN", "2000"),
    ("MODEL.RPN.POST_NMS_TOPK_TRAIN", "1000"),
)

SETTINGS: Dict[str, Setting] = {
    "mild": Setting("synthetic_shapes_train", "synthetic_shapes_val", 128),
    "severe": Setting("synthetic_shapes_rare_train", "synthetic_shapes_rare_val", 128),
    "coco_sampling": Setting("synthetic_shapes_rare_train", "synthetic_shapes_rare_val", 128,
                             overrides=COCO_SAMPLING),
    "many": Setting("synthetic_shapes_many_train", "synthetic_shapes_many_val", 128,
                    num_classes=20),
    "sparse": Setting("synthetic_shapes_novel_train", "synthetic_shapes_novel_val", 128,
                      num_classes=2),
    "finetune": Setting("synthetic_shapes_novel_train", "synthetic_shapes_novel_val", 128,
                        num_classes=2, pretrain="mild_stock"),
}
# The same plumbing in seconds (tests): 64-px datasets of 16 training images.
_TINY = ("synthetic_shapes_tiny_train", "synthetic_shapes_tiny_val")
TINY_SETTINGS: Dict[str, Setting] = {
    "mild": Setting(*_TINY, 64),
    "severe": Setting(*_TINY, 64),
    "coco_sampling": Setting(*_TINY, 64, overrides=COCO_SAMPLING),
    "many": Setting("synthetic_shapes_tiny_many_train", "synthetic_shapes_tiny_many_val", 64,
                    num_classes=20),
    "sparse": Setting("synthetic_shapes_tiny_novel_train", "synthetic_shapes_tiny_novel_val", 64,
                      num_classes=2),
    "finetune": Setting("synthetic_shapes_tiny_novel_train", "synthetic_shapes_tiny_novel_val",
                        64, num_classes=2, pretrain="mild_stock"),
}
PRETRAINS: Dict[str, Pretrain] = {"mild_stock": Pretrain("mild", "stock", 1500, 0)}
TINY_PRETRAINS: Dict[str, Pretrain] = {"mild_stock": Pretrain("mild", "stock", 4, 0)}


# -- arms --

_BL = "MODEL.BALANCED_LOSS."
# The original design's defaults: every weight 1, regression divided by the positive counts,
# per-batch counts, detectron2's initialization.
DESIGN_DEFAULTS = {
    "RPN_CLS_POS_WEIGHT": 1.0,
    "ROI_CLS_POS_WEIGHT": 1.0,
    "RPN_LOSS_CLS_WEIGHT": 1.0,
    "RPN_LOSS_BBOX_WEIGHT": 1.0,
    "ROI_LOSS_CLS_WEIGHT": 1.0,
    "ROI_LOSS_BBOX_WEIGHT": 1.0,
    "ROI_LOSS_MASK_WEIGHT": 1.0,
    "REG_NORMALIZER": "positives",
    "NORMALIZER_MOMENTUM": 0.0,
    "ADAPTIVE_POS_WEIGHT": False,
    "PRIOR_PROB": 0.0,
}


def balanced_overrides(pos: Optional[float] = None, bbox: Optional[float] = None,
                       **changes) -> Overrides:
    """Every MODEL.BALANCED_LOSS key of DESIGN_DEFAULTS, with ``changes`` (key names without
    the prefix); ``pos`` sets both POS weights, ``bbox`` both regression weights."""
    values = dict(DESIGN_DEFAULTS)
    if pos is not None:
        values["RPN_CLS_POS_WEIGHT"] = values["ROI_CLS_POS_WEIGHT"] = float(pos)
    if bbox is not None:
        values["RPN_LOSS_BBOX_WEIGHT"] = values["ROI_LOSS_BBOX_WEIGHT"] = float(bbox)
    unknown = set(changes) - set(values)
    assert not unknown, unknown
    values.update(changes)
    # str(float): "2.0", not "2", which yacs refuses for a float key.
    return tuple((_BL + k, str(float(v)) if isinstance(v, (int, float)) and not isinstance(
        v, bool) else str(v)) for k, v in values.items())


# detectron2's RepeatFactorTrainingSampler (LVIS, Gupta et al. 2019): images repeated by their
# rarest category, r = max(1, sqrt(t / f)); empty images keep 1. t = 1: every category counts
# as rare below 100% of the images.
RFS: Overrides = (("DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler"),
                  ("DATALOADER.REPEAT_THRESHOLD", "1.0"))
# The project's ObjectShareTrainingSampler (data/samplers.py): half the sampled images hold
# objects.
SHARE: Overrides = (("DATALOADER.SAMPLER_TRAIN", "ObjectShareTrainingSampler"),
                    ("DATALOADER.OBJECT_IMAGE_SHARE", "0.5"))


def class_aware_share(share: float) -> Overrides:
    """The project's ClassAwareObjectShareTrainingSampler (data/samplers.py): the object images
    at ``share`` of the sampled ones, each drawn by RFS's factor at RFS's threshold here (1)."""
    return (("DATALOADER.SAMPLER_TRAIN", "ClassAwareObjectShareTrainingSampler"),
            ("DATALOADER.OBJECT_IMAGE_SHARE", str(share)),
            ("DATALOADER.REPEAT_THRESHOLD", "1.0"))


@dataclass(frozen=True)
class Arm:
    heads: str  # "stock" or "balanced"
    overrides: Overrides = ()
    label: str = ""  # the table's name of the arm
    # What the arm changes relative to which other arm, and where the method comes from.
    about: str = ""


def _balanced(label: str, about: str, **kw) -> Arm:
    return Arm("balanced", balanced_overrides(**kw), label, about)


# The loss variants; "samples" + weights 1 is stock's loss, so each samples_* arm is one change
# against stock, and each positives_* arm one change against the design's defaults.
_LOSSES: Dict[str, Arm] = {
    "stock": Arm("stock", (), "stock", "detectron2's RPN and StandardROIHeads"),
    "samples": _balanced("samples", "balanced heads with stock's normalization and every weight "
                         "1: stock's loss (up to EPS)", REG_NORMALIZER="samples"),
    "design_defaults": _balanced("design defaults", "balanced heads: regression by the "
                                 "positive counts, every weight 1"),
    "design": _balanced("design (POS 2)", "the design for severe imbalance: design defaults "
                        "with both POS weights 2", pos=2),
    "demo_weights": _balanced("POS 3, BBOX 0.25", "the former CPU demo weights: design defaults "
                              "with POS 3 and regression weights 0.25", pos=3, bbox=0.25),
    "positives_ema": _balanced("positives + EMA 0.9", "design defaults + NORMALIZER_MOMENTUM 0.9 "
                               "(detectron2's RetinaNet/FCOS _ema_update)",
                               NORMALIZER_MOMENTUM=0.9),
    "samples_pos3": _balanced("samples + POS 3", "stock + foreground weight 3 in both heads",
                              pos=3, REG_NORMALIZER="samples"),
    "samples_adaptive": _balanced("samples + adaptive", "stock + ADAPTIVE_POS_WEIGHT (HED's "
                                  "class-balancing weight)", REG_NORMALIZER="samples",
                                  ADAPTIVE_POS_WEIGHT=True),
    "samples_adaptive_ema": _balanced("samples + adaptive + EMA 0.9", "samples + adaptive with "
                                      "running counts (NORMALIZER_MOMENTUM 0.9)",
                                      REG_NORMALIZER="samples", ADAPTIVE_POS_WEIGHT=True,
                                      NORMALIZER_MOMENTUM=0.9),
    "samples_prior": _balanced("samples + prior 0.01", "stock + PRIOR_PROB 0.01 (Focal Loss's "
                               "prior; Sampling-Free's bias init)", REG_NORMALIZER="samples",
                               PRIOR_PROB=0.01),
}
_SAMPLERS = {
    "rfs": (RFS, "RFS", "detectron2's RepeatFactorTrainingSampler, t = 1 (LVIS, Gupta et al. 2019)"),
    "share": (SHARE, "share 0.5", "ObjectShareTrainingSampler, OBJECT_IMAGE_SHARE 0.5"),
    "cshare": (class_aware_share(0.5), "class-aware share 0.5",
               "ClassAwareObjectShareTrainingSampler, OBJECT_IMAGE_SHARE 0.5, RFS's factors "
               "(t = 1) within the object images"),
}

# Every loss variant alone ("<loss>", with detectron2's TrainingSampler whatever the config file
# says) and with each sampler ("<loss>_<sampler>").
PLAIN: Overrides = (("DATALOADER.SAMPLER_TRAIN", "TrainingSampler"),)
ARMS: Dict[str, Arm] = {k: replace(a, overrides=PLAIN + a.overrides) for k, a in _LOSSES.items()}
for _loss, _arm in _LOSSES.items():
    for _key, (_sampler, _name, _about) in _SAMPLERS.items():
        ARMS[f"{_loss}_{_key}"] = Arm(_arm.heads, _arm.overrides + _sampler,
                                      f"{_arm.label} + {_name}", f"{_arm.about}; {_about}")


# The sweep of OBJECT_IMAGE_SHARE: stock's loss (the shipped "samples") with either object-share
# sampler at other shares ("samples_share_0.25", "samples_cshare_0.75", ...).
SWEEP_SHARES = (0.1, 0.25, 0.75)
for _share in SWEEP_SHARES:
    for _key, _sampler, _name in (
            ("share", (("DATALOADER.SAMPLER_TRAIN", "ObjectShareTrainingSampler"),
                       ("DATALOADER.OBJECT_IMAGE_SHARE", str(_share))), "share"),
            ("cshare", class_aware_share(_share), "class-aware share")):
        ARMS[f"samples_{_key}_{_share:g}"] = Arm(
            "balanced", _LOSSES["samples"].overrides + _sampler,
            f"samples + {_name} {_share:g}", f"{_LOSSES['samples'].about}; {_sampler[0][1]}, "
            f"OBJECT_IMAGE_SHARE {_share:g}")


_COPY_PASTE = "INPUT.COPY_PASTE.PROBABILITY"
# Simple copy-paste (Ghiasi et al. 2021; data/copy_paste.py) on top of either object share
# ("samples_share_paste", "samples_cshare_paste"): half of the sampled empty images get the
# objects of a random object image.
for _key in ("share", "cshare"):
    _base = ARMS[f"samples_{_key}"]
    ARMS[f"samples_{_key}_paste"] = Arm(
        "balanced", _base.overrides + ((_COPY_PASTE, "0.5"),),
        f"{_base.label} + copy-paste 0.5",
        f"{_base.about}; INPUT.COPY_PASTE.PROBABILITY 0.5 (simple copy-paste onto empty images, "
        "Ghiasi et al. 2021)")
# The shipped rule (class-aware share + copy-paste 0.5) at the sweep's other shares
# ("samples_cshare_paste_0.75", ...): each changes OBJECT_IMAGE_SHARE alone against
# "samples_cshare_paste".
for _share in SWEEP_SHARES:
    _base = ARMS[f"samples_cshare_{_share:g}"]
    ARMS[f"samples_cshare_paste_{_share:g}"] = Arm(
        "balanced", _base.overrides + ((_COPY_PASTE, "0.5"),),
        f"{_base.label} + copy-paste 0.5", f"{_base.about}; INPUT.COPY_PASTE.PROBABILITY 0.5")


# The shipped configs paste objects onto empty images (INPUT.COPY_PASTE.PROBABILITY 0.5); every
# arm that does not name copy-paste trains without it, so that each arm still changes one thing
# and its runs stay those the study trained.
def _without_paste_unless_named(arm: Arm) -> Arm:
    if any(key == _COPY_PASTE for key, _ in arm.overrides):
        return arm
    return replace(arm, overrides=arm.overrides + ((_COPY_PASTE, "0.0"),))


ARMS = {k: _without_paste_unless_named(a) for k, a in ARMS.items()}


def weight_pair_arm(pos: float, bbox: float) -> Tuple[str, Arm]:
    """--ab-balanced POS:BBOX: the design's normalization with these weights."""
    name = f"balanced_w{pos:g}" + (f"_b{bbox:g}" if bbox != 1 else "")
    return name, _without_paste_unless_named(_balanced(
        f"balanced POS {pos:g}, BBOX {bbox:g}", "--ab-balanced", pos=pos, bbox=bbox))
