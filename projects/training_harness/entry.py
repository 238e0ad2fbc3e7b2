"""
What train_net.py takes from the harness, besides its Trainer (engine/trainer.py): the set-up
checks each worker runs before ``default_setup`` (:func:`check_setup`), and detectron2's
``launch`` with the harness's refusals, exit codes and torchrun (:func:`launch`).
train_net.py marks each line that uses them; deleting those lines and this package leaves a
detectron2 project that trains with the core alone (tests/test_core_alone.py runs it).
"""

import functools
import logging
import os
import sys
import traceback
from argparse import Namespace
from typing import Any, Callable, Sequence

from detectron2.config import CfgNode
from detectron2.engine import DefaultTrainer, TrainerBase
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .config import load_project_config
from .config_checks import check_config_choices
from .config_ranges import check_config_ranges, check_launch_devices, ignored_key_warnings
from .data import register_datasets_from_config
from .errors import SETUP_REFUSALS, TrainingHealthError, exit_on_refusal, refusal_line
from .health.check_images import check_health_images
from .reliability.launch import collective_timeout, launched_by_torchrun, refused_together
from .reliability.launch import launch as launch_workers
from .reliability.launch import leave_process_group, run_torchrun_worker
from .reliability.output_dir import claim_output_dir, remove_earlier_run
from .reliability.weights_files import check_weights_file

__all__ = ["check_setup", "launch"]

logger = logging.getLogger(__name__)

# An error raised while training or evaluating keeps its traceback: only the set-up, the build
# and the checkpoint load refuse with one line.
_RUN_CODE = (TrainerBase.train.__code__, DefaultTrainer.test.__func__.__code__)


def check_setup(cfg: CfgNode, args: Namespace) -> None:
    """
    Every check of the config, the output folder, the datasets and the weights, on every worker,
    before ``default_setup`` writes into OUTPUT_DIR. A refusal on one worker stops them all.
    """
    # Every key with a fixed set of values or a valid range, before anything is written or built.
    check_config_choices(cfg)
    check_config_ranges(cfg)
    main_worker = comm.is_main_process()
    if main_worker:
        for warning in ignored_key_warnings(cfg):
            logger.warning(warning)
    with refused_together():  # a refusal on the main worker stops every worker at once
        if main_worker and not args.eval_only:
            # Before anything is written into it (log.txt, config.yaml, checkpoints).
            claim_output_dir(cfg.OUTPUT_DIR, resume=args.resume,
                             overwrite=cfg.RELIABILITY.OVERWRITE_OUTPUT)
    # The harness's loggers (dataset generation, the health monitor) write to the console and
    # to OUTPUT_DIR/log.txt like detectron2's.
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(),
                 name="training_harness")
    # Dataset registration from the config (the synthetic datasets and DATASETS.REGISTER_COCO),
    # here, not at import time: launch() starts fresh worker processes whose catalogs are empty.
    with refused_together():
        register_datasets_from_config(cfg)
        # Before anything is built: detectron2 would fail on a missing or unfit checkpoint only
        # after building the model and the data loader, and evaluate random weights when none
        # are given.
        check_weights_file(cfg, resume=args.resume, eval_only=args.eval_only)
        if main_worker and not args.eval_only:
            check_health_images(cfg)  # the monitor would read them after the model is built
    if main_worker and not args.eval_only and cfg.RELIABILITY.OVERWRITE_OUTPUT and not args.resume:
        # Once every check has passed; never the weights this run starts from.
        remove_earlier_run(cfg.OUTPUT_DIR, keep=[cfg.MODEL.WEIGHTS])


def launch(main_func: Callable[..., Any], num_gpus_per_machine: int, num_machines: int = 1,
           machine_rank: int = 0, dist_url: str = None, args: Sequence[Any] = ()) -> None:
    """
    detectron2's ``launch`` (same arguments; ``args[0]`` is train_net.py's argument namespace,
    whose config is checked before any worker starts), and:

    - a refused set-up, build or checkpoint load ends each worker with one line,
      ``<program>: error: ...``, exit code 1 (errors.py);
    - a stop of the health checks ends with its exit code (3 collapse, 4 non-finite), every
      worker at the same step;
    - the workers' exit codes, signals and collective timeout of reliability/launch.py;
    - under torchrun no process is started: this process is one worker.
    """
    program = os.path.basename(sys.argv[0])
    options = args[0]
    # Before any worker process is started (a CUDA config on a CPU machine, say).
    with exit_on_refusal(program):
        config = load_project_config(options.config_file, options.opts)
        check_config_ranges(config)
        torchrun = launched_by_torchrun()
        if torchrun and (num_gpus_per_machine != 1 or num_machines != 1):
            raise ValueError("under torchrun, each process is one worker: give the workers to "
                             "torchrun (--nproc-per-node, --nnodes), not --num-gpus or "
                             "--num-machines")
        check_launch_devices(config, int(os.environ["LOCAL_WORLD_SIZE"]) if torchrun
                             else num_gpus_per_machine)
    worker = functools.partial(_run_worker, main_func, program)
    if torchrun:
        # torch's elastic agent stops the other workers when one fails and restarts them
        # (--max-restarts).
        run_torchrun_worker(worker, args=args, timeout=collective_timeout(config))
        sys.exit(0)
    launch_workers(worker, num_gpus_per_machine, num_machines=num_machines,
                   machine_rank=machine_rank, dist_url=dist_url, args=args,
                   timeout=collective_timeout(config))


def _raised_in_run(error: BaseException) -> bool:
    return any(frame.f_code in _RUN_CODE for frame, _ in traceback.walk_tb(error.__traceback__))


def _run_worker(main_func: Callable[..., Any], program: str, *args: Any) -> Any:
    try:
        return main_func(*args)
    except TrainingHealthError as e:
        logging.getLogger("detectron2").error(f"Training stopped, exit code {e.exit_code}: {e}")
        # Every worker stops at the same step. Leave together, so that the launcher, which kills
        # the others when one exits, does not kill the main worker while it writes its logs.
        comm.synchronize()
        sys.exit(e.exit_code)  # docs/reliability.md, "Exit codes": 3 collapse, 4 non-finite
    except SETUP_REFUSALS as e:
        if _raised_in_run(e):
            raise
        sys.exit(refusal_line(program, e))
    finally:
        leave_process_group()
