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

import logging
import os
import sys

from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from training_harness import GuardedTrainer
from training_harness.config import load_project_config
from training_harness.config_checks import check_config_choices
from training_harness.config_ranges import (check_config_ranges, check_launch_devices,
                                            ignored_key_warnings)
from training_harness.data import register_datasets_from_config
from training_harness.errors import TrainingHealthError, exit_on_refusal
from training_harness.health.check_images import check_health_images
from training_harness.reliability.checkpoint import AtomicCheckpointer
from training_harness.reliability.launch import (collective_timeout, launch, launched_by_torchrun,
                                                 refused_together, run_torchrun_worker)
from training_harness.reliability.output_dir import claim_output_dir, remove_earlier_run
from training_harness.reliability.weights_files import check_weights_file


def load_config(args) -> CfgNode:
    cfg = load_project_config(args.config_file, args.opts)
    cfg.freeze()
    return cfg


def setup(args) -> CfgNode:
    cfg = load_config(args)
    # Every key with a fixed set of values or a valid range, before anything is written or built.
    check_config_choices(cfg)
    check_config_ranges(cfg)
    main_worker = comm.is_main_process()
    if main_worker:
        for warning in ignored_key_warnings(cfg):
            logging.getLogger("training_harness").warning(warning)
    with refused_together():  # a refusal on the main worker stops every worker at once
        if main_worker and not args.eval_only:
            # Before anything is written into it (log.txt, config.yaml, checkpoints).
            claim_output_dir(cfg.OUTPUT_DIR, resume=args.resume,
                             overwrite=cfg.RELIABILITY.OVERWRITE_OUTPUT)
    # The project's own loggers (balanced_rcnn.*: the samplers, the evaluators; training_harness.*:
    # dataset generation, the health monitor) write to the console and to OUTPUT_DIR/log.txt like
    # detectron2's.
    for name in ("balanced_rcnn", "training_harness"):
        setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name=name)
    # Dataset registration from the config (the synthetic datasets and DATASETS.REGISTER_COCO).
    # It lives here, not at import time, because launch() starts fresh worker processes whose
    # catalogs are empty: every worker runs setup().
    with refused_together():
        register_datasets_from_config(cfg)
        # Before anything is built: detectron2 would fail on a missing or unfit checkpoint only
        # after building the model and the data loader, and evaluate random weights when none
        # are given.
        check_weights_file(cfg, resume=args.resume, eval_only=args.eval_only)
        if main_worker and not args.eval_only:
            check_health_images(cfg)  # the monitor would read them after the model is built
    # Only now: it rewrites OUTPUT_DIR/config.yaml, which must stay the config of the
    # checkpoints there when a check refuses this run.
    default_setup(cfg, args)
    if main_worker and not args.eval_only and cfg.RELIABILITY.OVERWRITE_OUTPUT and not args.resume:
        # Once the set-up checks have passed; never the weights this run starts from.
        remove_earlier_run(cfg.OUTPUT_DIR, keep=[cfg.MODEL.WEIGHTS])
    return cfg


def main(args):
    # Every refusal of the set-up, the build and the checkpoint load is one line, exit code 1.
    with exit_on_refusal("train_net.py"):
        cfg = setup(args)
        if args.eval_only:
            model = GuardedTrainer.build_model(cfg)
            # Every model tensor must come from the checkpoint: no AP for weights not loaded.
            checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, require_full_model=True)
            checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        else:
            trainer = GuardedTrainer(cfg)
            trainer.resume_or_load(resume=args.resume)
    if args.eval_only:
        results = GuardedTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results

    try:
        return trainer.train()
    except TrainingHealthError as e:
        logging.getLogger("detectron2").error(f"Training stopped, exit code {e.exit_code}: {e}")
        # Every worker stops at the same step. Leave together, so that the launcher, which kills
        # the others when one exits, does not kill the main worker while it writes its logs.
        comm.synchronize()
        sys.exit(e.exit_code)  # docs/reliability.md, "Exit codes": 3 collapse, 4 non-finite


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    # Before any worker process is started (a CUDA config on a CPU machine, say).
    with exit_on_refusal("train_net.py"):
        config = load_config(args)
        check_config_ranges(config)
        torchrun = launched_by_torchrun()
        if torchrun and (args.num_gpus != 1 or args.num_machines != 1):
            raise ValueError("under torchrun, each process is one worker: give the workers to "
                             "torchrun (--nproc-per-node, --nnodes), not --num-gpus or "
                             "--num-machines")
        check_launch_devices(config, int(os.environ["LOCAL_WORLD_SIZE"]) if torchrun
                             else args.num_gpus)
    if torchrun:
        # torchrun started this process as one worker; torch's elastic agent stops the others
        # when one fails and restarts them (--max-restarts).
        run_torchrun_worker(main, args=(args,), timeout=collective_timeout(config))
        sys.exit(0)
    # The project's launch: exits with the status of a failed worker (docs/reliability.md, "Exit
    # codes": 3 collapse, 4 non-finite, 75 lost peer, 130 / 143 Ctrl-C / SIGTERM after a
    # checkpoint).
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        timeout=collective_timeout(config),
    )
