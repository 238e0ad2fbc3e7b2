"""Every config check of the balanced heads runs once per model build: each head's own checks once,
the checks of the MODEL.BALANCED_LOSS keys that the heads share once per balanced head (each
head, built on its own, refuses them too: test_build_refusals.py), nothing twice through the
nested from_config of BalancedROIHeads -> _init_box_head -> the box predictor."""

import collections
import contextlib
from unittest import mock

from detectron2.modeling import build_model

from balanced_rcnn.modeling import checks, fast_rcnn, mask_head, normalizer, roi_heads, rpn
from balanced_rcnn.modeling import settings

# (module, name): the checks, patched where they are called.
CHECKS = [
    (rpn, "check_rpn_config"),
    (fast_rcnn, "check_box_predictor_config"),
    (fast_rcnn, "refuse_unimplemented_options"),
    (roi_heads, "check_mask_head_is_balanced"),
    (checks, "refuse_stock_loss_weight"),
    (checks, "check_box_reg_loss_type"),
    (settings, "check_balanced_loss_weights"),
    (mask_head, "check_balanced_loss_weights"),
    (settings, "balanced_loss_section"),
    (settings, "check_shared_loss_values"),
    (settings, "check_adaptive_pos_weight_fractions"),
    (normalizer, "check_momentum"),
    (mask_head, "check_momentum"),
]
# The checks of keys that the RPN, the box predictor and the mask head all read.
SHARED = {"balanced_loss_section", "check_shared_loss_values",
          "check_adaptive_pos_weight_fractions", "check_momentum"}
BALANCED_HEADS = 3


def _count_checks(build):
    """{(check, the keys it was given): calls} while ``build()`` runs."""
    calls = collections.Counter()

    def counting(name, original):
        def check(*args, **kwargs):
            keys = tuple(a for a in args if isinstance(a, str))  # key names, not values
            calls[name, keys] += 1
            return original(*args, **kwargs)

        return check

    with contextlib.ExitStack() as stack:
        for module, name in CHECKS:
            stack.enter_context(
                mock.patch.object(module, name, counting(name, getattr(module, name)))
            )
        build()
    return calls


def test_head_checks_run_once_per_build_and_shared_key_checks_once_per_head(tiny_cfg):
    for builds in (1, 2):  # nothing is remembered from one build to the next
        calls = _count_checks(lambda: [build_model(tiny_cfg) for _ in range(builds)])
        shared = {k: v for k, v in calls.items() if k[0] in SHARED}
        own = {k: v for k, v in calls.items() if k[0] not in SHARED}
        assert {name for name, _ in own} == {name for _, name in CHECKS} - SHARED
        assert all(count == builds for count in own.values()), own
        per_check = collections.Counter()
        for (name, _), count in shared.items():
            per_check[name] += count
        assert per_check == {name: BALANCED_HEADS * builds for name in SHARED}, shared
    # Each detectron2 key the heads replace and each balanced weight is checked exactly once.
    keys = {keys for (name, keys) in own if name != "check_balanced_loss_weights"}
    assert {k[0] for k in keys if k} == {
        "MODEL.RPN.LOSS_WEIGHT",
        "MODEL.RPN.BBOX_REG_LOSS_WEIGHT",
        "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT",
        "MODEL.RPN.BBOX_REG_LOSS_TYPE",
        "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE",
    }
    weights = sorted(k for (name, keys) in own if name == "check_balanced_loss_weights"
                     for k in keys)
    assert weights == sorted(
        ["RPN_CLS_POS_WEIGHT", "RPN_LOSS_CLS_WEIGHT", "RPN_LOSS_BBOX_WEIGHT",
         "ROI_CLS_POS_WEIGHT", "ROI_LOSS_CLS_WEIGHT", "ROI_LOSS_BBOX_WEIGHT",
         "ROI_LOSS_MASK_WEIGHT"]
    )
