#!/usr/bin/env python
"""
Train or evaluate Balanced R-CNN (Swin + FPN Mask R-CNN with the balanced RPN/ROI losses).

    python train_net.py --config-file configs/swin_balanced.yaml --num-gpus 8
    python train_net.py --config-file configs/swin_balanced.yaml --eval-only \
        MODEL.WEIGHTS output/swin_balanced/model_final.pth
    python train_net.py --config-file configs/quick_schedules/swin_tiny_balanced_demo.yaml

--resume continues from the last checkpoint in OUTPUT_DIR; KEY VALUE pairs after the options
override the config. Starting points for MODEL.WEIGHTS:
- ImageNet Swin weights: convert them with tools/convert_swin_checkpoint.py.
- A COCO-trained Mask R-CNN on data with another number of classes: set MODEL.WEIGHTS to it and
  MODEL.ROI_HEADS.NUM_CLASSES to your count. The checkpointer loads every tensor whose shape
  matches and skips, with a warning naming each one, the class-dependent layers
  (roi_heads.box_predictor.cls_score, .bbox_pred and roi_heads.mask_head.predictor), which keep
  their fresh initialization.
"""

from balanced_rcnn import Trainer, add_balanced_rcnn_config
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

# The training harness (docs/health.md, docs/reliability.md): its config keys, its set-up checks,
# its Trainer (the core's with the health checks, atomic checkpoints and checked data loaders)
# and its launch (refusals in one line, exit codes, signals, torchrun). Each line that uses it
# ends with "# harness"; without those lines and the package, this trains with the core alone.
from training_harness import GuardedTrainer as Trainer  # harness
from training_harness import add_training_harness_config, check_setup, launch  # harness


def setup(args) -> CfgNode:
    cfg = get_cfg()
    add_balanced_rcnn_config(cfg)
    add_training_harness_config(cfg)  # harness
    # yaml.safe_load only: detectron2's default falls back to yaml.unsafe_load, which runs the
    # python tags of a crafted file.
    cfg.merge_from_file(args.config_file, allow_unsafe=False)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    check_setup(cfg, args)  # harness
    default_setup(cfg, args)
    # The core's loggers (the samplers, the evaluators) write to log.txt like detectron2's.
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="balanced_rcnn")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        Trainer.build_checkpointer(cfg, model).resume_or_load(cfg.MODEL.WEIGHTS,
                                                              resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
