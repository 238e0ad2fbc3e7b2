#!/usr/bin/env python
"""
Turn a schedule in epochs into the iteration keys detectron2 wants, for your dataset and batch.

Usage:
  python tools/schedule.py --json data/train.json --batch 16 [--epochs 12] [--steps 8 11]
      [--eval-every 1] [--checkpoint-every 1] [--keep-empty | --drop-empty]

    iterations per epoch = ceil(training images / IMS_PER_BATCH)
    SOLVER.MAX_ITER      = epochs x iterations per epoch
    SOLVER.STEPS         = each --steps epoch x iterations per epoch (the lr drops x GAMMA there)
    SOLVER.CHECKPOINT_PERIOD, TEST.EVAL_PERIOD = every that many epochs

The training images are those of the json, without the images that have no annotation when
--drop-empty says that DATALOADER.FILTER_EMPTY_ANNOTATIONS is True (by default they are kept, as
the imbalanced-data template configs/my_data/imbalanced_coco.yaml does). Image rebalancing
(ObjectShareTrainingSampler, RepeatFactorTrainingSampler) does not change the formula: an
epoch here is as many images drawn as the training set holds, whatever the sampler. Prints the counts and a line of KEY VALUE overrides to paste
after train_net.py's arguments.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

from training_harness.preflight.schedule import schedule_keys


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, type=Path, help="the training COCO json")
    parser.add_argument("--batch", required=True, type=int, help="SOLVER.IMS_PER_BATCH")
    parser.add_argument("--epochs", type=float, default=12.0, help="default 12 (COCO's 1x)")
    parser.add_argument("--steps", type=float, nargs="*", default=None,
                        help="epochs of the lr drops (default: 2/3 and 11/12 of --epochs, as "
                             "COCO's 1x drops at epochs 8 and 11 of 12); none: no drop")
    parser.add_argument("--eval-every", type=float, default=1.0, help="epochs (default 1)")
    parser.add_argument("--checkpoint-every", type=float, default=1.0, help="epochs (default 1)")
    empty = parser.add_mutually_exclusive_group()
    empty.add_argument("--keep-empty", dest="drop_empty", action="store_false", default=False,
                       help="count the images without annotations (the default)")
    empty.add_argument("--drop-empty", dest="drop_empty", action="store_true",
                       help="with DATALOADER.FILTER_EMPTY_ANNOTATIONS True")
    return parser.parse_args(argv)


def count_images(coco: Dict, drop_empty: bool) -> Dict[str, int]:
    """Images of a COCO json, with and without a non-crowd annotation."""
    annotated = {a["image_id"] for a in coco.get("annotations", []) if not a.get("iscrowd", 0)}
    ids = [image["id"] for image in coco["images"]]
    with_objects = sum(i in annotated for i in ids)
    return {"images": len(ids), "with_objects": with_objects,
            "trained": with_objects if drop_empty else len(ids)}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    try:
        coco = json.loads(args.json.read_text())
        images = count_images(coco, args.drop_empty)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"schedule: cannot read the COCO json {args.json}: {type(e).__name__}: {e}",
              file=sys.stderr)
        sys.exit(2)
    if args.batch < 1 or args.epochs <= 0:
        print(f"schedule: --batch must be >= 1 and --epochs > 0, got {args.batch} and "
              f"{args.epochs}", file=sys.stderr)
        sys.exit(2)
    if images["trained"] == 0:
        print(f"schedule: {args.json} has no image to train on", file=sys.stderr)
        sys.exit(2)
    steps = args.steps if args.steps is not None else [args.epochs * 2 / 3, args.epochs * 11 / 12]
    if any(not 0 < s < args.epochs for s in steps):
        print(f"schedule: --steps must lie inside (0, {args.epochs:g}) epochs, got {steps}",
              file=sys.stderr)
        sys.exit(2)
    out = schedule_keys(images["trained"], args.batch, args.epochs, steps, args.eval_every,
                   args.checkpoint_every)
    print(f"{args.json}: {images['images']} images, {images['with_objects']} with annotations "
          f"({100 * images['with_objects'] / max(images['images'], 1):.1f}%); training on "
          f"{images['trained']} at {args.batch} per step: {out['iterations_per_epoch']} "
          f"iterations per epoch")
    overrides = [f"SOLVER.IMS_PER_BATCH {args.batch}",
                 f"SOLVER.MAX_ITER {out['SOLVER.MAX_ITER']}",
                 'SOLVER.STEPS "' + str(out["SOLVER.STEPS"]).replace(" ", "") + '"',
                 f"SOLVER.CHECKPOINT_PERIOD {out['SOLVER.CHECKPOINT_PERIOD']}",
                 f"TEST.EVAL_PERIOD {out['TEST.EVAL_PERIOD']}"]
    print(" ".join(overrides))
    return {**images, **out}


if __name__ == "__main__":
    main()
