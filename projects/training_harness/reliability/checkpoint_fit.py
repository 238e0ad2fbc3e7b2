"""
Whether a checkpoint fits the model of a config, checked before anything real is built.

detectron2 loads whatever tensors of a checkpoint match the model by name and shape, and only
logs the rest: right for fine-tuning (the class layers of another dataset are re-initialized),
wrong for an evaluation, a prediction or a resumed run, which then go on with random weights. Where
a checkpoint must hold the whole model (``--eval-only``, ``--resume`` from OUTPUT_DIR,
tools/predict.py, tools/export_model.py), a model tensor that is missing from it or has another
shape is an error: :class:`CheckpointMismatchError`, whose message lists them and, for the class
layers, says which NUM_CLASSES the checkpoint was trained with.

:func:`check_checkpoint_fits` runs the checkpointer's own load (the same key matching, heuristics
and prefix stripping as the real load) on a second copy of the model. detectron2's
``build_model`` initializes it on the CPU (Swin's constructor cannot run on the ``meta`` device)
and then moves it to ``meta``, which frees its memory and makes the load copy nothing; the
random-number state is restored afterwards, so a seeded run initializes its real model exactly as
without the check (utils/random_state.py). It runs on the main worker, for local files (a URL is downloaded by the real
load).
"""

import logging
import warnings
from typing import Optional, Sequence, Tuple

from detectron2.config import CfgNode
from detectron2.modeling import build_model

from ..errors import CheckpointMismatchError
from ..utils.random_state import preserved_random_state

__all__ = ["check_checkpoint_fits", "empty_backbone_message", "misfit_message"]

_LISTED = 5  # tensors named in the message

# The ROI heads' classifier: K + 1 rows (background last) for K classes. (The mask predictor's
# rows are K, or 1 with MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK: no class count to read there.)
_CLASSIFIER = "roi_heads.box_predictor.cls_score.weight"

Shape = Tuple[int, ...]


def _listing(items: Sequence[str]) -> str:
    more = len(items) - _LISTED
    return "; ".join(items[:_LISTED]) + (f"; and {more} more" if more > 0 else "")


def _class_count_hint(incorrect_shapes: Sequence[Tuple[str, Shape, Shape]]) -> Optional[str]:
    for key, in_checkpoint, in_model in incorrect_shapes:
        if key.endswith(_CLASSIFIER):
            trained, configured = in_checkpoint[0] - 1, in_model[0] - 1
            return (f"The checkpoint has {trained} classes, the config {configured}: set "
                    f"MODEL.ROI_HEADS.NUM_CLASSES {trained}. ")
    return None


def empty_backbone_message(filename: str, backbone: Sequence[str], missing: Sequence[str]
                           ) -> Optional[str]:
    """Why fine-tuning from ``filename`` would train a randomly initialized backbone: none of
    the model's ``backbone`` tensors is in it (``missing``: fvcore's missing keys); else None."""
    if not backbone or not set(backbone) <= set(missing):
        return None
    return (f"MODEL.WEIGHTS '{filename}' loads none of the backbone's {len(backbone)} tensors, "
            "so training would start from a random backbone. If it is an official Swin "
            "checkpoint, convert it first: python tools/convert_swin_checkpoint.py "
            f"{filename} swin_converted.pth, and set MODEL.WEIGHTS swin_converted.pth. To train "
            "from scratch on purpose, set MODEL.WEIGHTS \"\".")


def misfit_message(
    filename: str,
    named_by: str,
    missing: Sequence[str],
    unexpected: Sequence[str],
    incorrect_shapes: Sequence[Tuple[str, Shape, Shape]],
    num_model_tensors: int,
) -> Optional[str]:
    """
    Why ``filename`` (``named_by``: where its name came from, e.g. " (named by MODEL.WEIGHTS)")
    does not hold the whole model, or None when every model tensor is in it in its shape.
    ``missing`` / ``unexpected`` / ``incorrect_shapes`` are fvcore's incompatible keys (the
    missing ones include those skipped for their shape).
    """
    shape_keys = {k for k, _, _ in incorrect_shapes}
    absent = [k for k in missing if k not in shape_keys]
    if not absent and not incorrect_shapes:
        return None
    parts = [f"Checkpoint '{filename}'{named_by} does not fit the config's model:"]
    if len(absent) == num_model_tensors:
        shown = ", ".join(sorted(unexpected)[:3]) or "none"
        parts.append(f"none of the model's {num_model_tensors} tensors is in it (the "
                     f"checkpoint's names: {shown}, ...). It is a checkpoint of another "
                     "architecture.")
    else:
        if incorrect_shapes:
            parts.append(f"{len(incorrect_shapes)} tensors have another shape ("
                         + _listing([f"{k} {tuple(c)} in the checkpoint, {tuple(m)} in the model"
                                     for k, c, m in incorrect_shapes]) + ").")
        if absent:
            parts.append(f"{len(absent)} tensors are missing ({_listing(sorted(absent))}).")
    hint = _class_count_hint(incorrect_shapes) or ""
    parts.append(f"{hint}Use the config the checkpoint was trained with (its OUTPUT_DIR/"
                 "config.yaml); to fine-tune from it instead, train with MODEL.WEIGHTS.")
    return " ".join(parts)


def check_checkpoint_fits(cfg: CfgNode, resume: bool, *, full_model: bool) -> None:
    """
    Read the checkpoint that training or evaluation with ``cfg`` will load (OUTPUT_DIR's last
    checkpoint with ``resume``, else MODEL.WEIGHTS) into a ``meta``-device model, so that a file
    that is not a checkpoint, and with ``full_model`` one that does not fit the model, is refused
    before the real model and the data are built.

    Raises:
        CheckpointError: the file is truncated, corrupt or not a checkpoint.
        CheckpointMismatchError: (``full_model``) see :func:`misfit_message`.
    """
    from .checkpoint import AtomicCheckpointer  # checkpoint.py imports this module

    meta_cfg = cfg.clone()
    meta_cfg.defrost()
    meta_cfg.MODEL.DEVICE = "meta"
    with preserved_random_state():  # the real model's initialization stays the same
        model = build_model(meta_cfg)
    checker = AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR, require_full_model=full_model)
    checker.file_must_exist_here = True  # this runs on the main worker, which must have it
    # The real load logs the same messages a moment later; here they would only repeat.
    checker.logger = logging.getLogger(f"{__name__}.silent")
    checker.logger.disabled = True
    with warnings.catch_warnings():
        # load_state_dict into meta tensors copies nothing, and says so for each tensor.
        warnings.filterwarnings("ignore", message=".*meta parameter.*")
        rest = checker.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    if not full_model and checker.last_incompatible is not None:
        problem = empty_backbone_message(
            checker.loaded_file, [k for k in model.state_dict() if k.startswith("backbone.")],
            checker.last_incompatible.missing_keys)
        if problem:
            raise CheckpointMismatchError(problem)
    if resume and checker.has_checkpoint():
        # engine/ builds on this package: imported here.
        from ..engine.resume_hparams import check_same_optimizer

        # DefaultTrainer's state: {"trainer": {"_trainer": {"optimizer": ...}, "hooks": ...}}
        optimizer = rest.get("trainer", {}).get("_trainer", {}).get("optimizer", {})
        check_same_optimizer(cfg, optimizer.get("param_groups", ()), checker.loaded_file)

