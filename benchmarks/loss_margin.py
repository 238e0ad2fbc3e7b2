#!/usr/bin/env python
"""
How far healthy runs stay from the stop on a finite loss explosion (health/divergence.py).

Each run is one of the quality A/B's (benchmarks/quality_ab.py: its exact config and overrides,
given as setting/arm/seed), trained in this process with the detection checks and the final
evaluation off. From every step's losses (detectron2's EventStorage keeps them all) it prints the
first and the largest total with its largest term, the largest ratio of a step's total to the
largest total before it (the jump rule's reference, as the rule floors it at
JUMP_REFERENCE_FLOOR, and unfloored), and the margins to HEALTH.LOSS_CEILING and
HEALTH.LOSS_JUMP_FACTOR: the factor by which each run stays below them.

    python benchmarks/loss_margin.py --runs sparse/stock/0 sparse/design/0 finetune/stock/0 \
        --update-md
    python benchmarks/loss_margin.py --tiny   # seconds: the plumbing (what the tests run)

finetune runs start from the A/B's pretrained model
(output/quality_ab/pretrain_mild_stock_1500it_s0, written by quality_ab.py).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from detectron2.config import get_cfg
from detectron2.utils.env import seed_all_rng

from training_harness import GuardedTrainer, add_training_harness_config
from training_harness.config import load_project_config
from training_harness.data import register_datasets_from_config
from training_harness.health.divergence import JUMP_REFERENCE_FLOOR

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the A/B's modules beside this file
import common  # noqa: E402
import quality_ab  # noqa: E402
import quality_arms  # noqa: E402

NAME = "loss_margin"


def step_losses(command: List[str], output_dir: Path) -> Dict[str, np.ndarray]:
    """Train ``command``'s config (a train_net.py command line) here; every step's losses."""
    cfg = load_project_config(command[3], command[4:])
    # Only the training steps are measured: no detection checks, no final evaluation, and no
    # stop (a run past the limits is reported with a margin below 1).
    cfg.merge_from_list(["HEALTH.PERIOD", "0", "HEALTH.CHECK_AT_START", "False",
                         "HEALTH.LOSS_CEILING", "0.0", "HEALTH.LOSS_JUMP_FACTOR", "0.0",
                         "DATASETS.TEST", "()", "OUTPUT_DIR", str(output_dir)])
    cfg.freeze()
    seed_all_rng(cfg.SEED)  # as train_net.py's default_setup: the A/B run's initialization
    register_datasets_from_config(cfg)
    trainer = GuardedTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    histories = trainer.storage.histories()
    return {k: np.array([v for v, _ in h.values()]) for k, h in histories.items()
            if k == "total_loss" or k.startswith("loss_")}


def summarize(losses: Dict[str, np.ndarray], ceiling: float, jump_factor: float) -> dict:
    """The figures of the module docstring for one run's per-step losses."""
    total = losses["total_loss"]
    largest_before = np.maximum.accumulate(total)[:-1]
    ratios = total[1:] / np.maximum(largest_before, JUMP_REFERENCE_FLOOR)
    raw_ratios = total[1:] / np.maximum(largest_before, 1e-12)
    peak = int(total.argmax())
    terms = {k: float(v[peak]) for k, v in losses.items() if k != "total_loss"}
    top_term = max(terms, key=terms.get)
    return {
        "steps": int(len(total)),
        "first_total": float(total[0]),
        "median_total": float(np.median(total)),
        "max_total": float(total[peak]),
        "max_at": peak,
        "max_term": top_term,
        "max_term_value": terms[top_term],
        "max_jump": float(ratios.max()),
        "max_jump_unfloored": float(raw_ratios.max()),
        "ceiling_margin": ceiling / float(total[peak]),
        "jump_margin": jump_factor / float(ratios.max()),
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=["sparse/stock/0", "sparse/design/0"],
                        help="setting/arm/seed of the quality A/B (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true",
                        help="the A/B's tiny settings and schedule (seconds)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    common.add_output_arguments(parser, NAME)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    args = parse_args(argv)
    common.set_threads(args.threads)
    defaults = get_cfg()
    add_training_harness_config(defaults)
    ceiling, jump = defaults.HEALTH.LOSS_CEILING, defaults.HEALTH.LOSS_JUMP_FACTOR
    output = common.REPO / "output" / ("quality_ab_tiny" if args.tiny else "quality_ab")
    study = quality_ab.Study(
        settings=quality_arms.TINY_SETTINGS if args.tiny else quality_arms.SETTINGS,
        arms=dict(quality_arms.ARMS),
        pretrains=quality_arms.TINY_PRETRAINS if args.tiny else quality_arms.PRETRAINS,
        schedule=quality_ab.TINY_SCHEDULE if args.tiny else quality_ab.SCHEDULE,
        output=output.resolve(),
    )
    results = []
    for spec in args.runs:
        setting, arm, seed = spec.split("/")
        if study.settings[setting].pretrain:
            weights = quality_ab.pretrain_dir(study, study.settings[setting].pretrain)
            if not (weights / "model_final.pth").is_file():
                sys.exit(f"loss_margin: {spec} starts from {weights}/model_final.pth, which "
                         "benchmarks/quality_ab.py writes first (--settings finetune)")
        with tempfile.TemporaryDirectory() as run_dir:
            command = quality_ab.run_command(study, quality_ab.Run(setting, arm, int(seed)),
                                             Path(run_dir))
            start = time.perf_counter()
            losses = step_losses(command, Path(run_dir))
        results.append({"run": spec, "seconds": time.perf_counter() - start,
                        **summarize(losses, ceiling, jump)})

    rows = [[r["run"], r["steps"], f"{r['first_total']:.3g}", f"{r['median_total']:.3g}",
             f"{r['max_total']:.3g} (it {r['max_at']}, {r['max_term']} {r['max_term_value']:.3g})",
             f"{r['max_jump']:.3g} ({r['max_jump_unfloored']:.3g})",
             f"{r['ceiling_margin']:.3g}x", f"{r['jump_margin']:.3g}x"] for r in results]
    body = common.markdown_table(
        ["run (setting/arm/seed)", "steps", "first total", "median total",
         "largest total (iteration, largest term)",
         "largest jump, floored at 1 (unfloored)",
         f"below LOSS_CEILING {ceiling:g}", f"below LOSS_JUMP_FACTOR {jump:g}"], rows)
    print(body)
    notes = ["A jump is a step's total divided by the largest total of the steps before it; "
             f"the rule divides by at least JUMP_REFERENCE_FLOOR = {JUMP_REFERENCE_FLOOR:g} "
             "(health/divergence.py)."]
    common.publish(args, NAME, "Healthy runs against the finite-explosion stop (loss_margin.py)",
                   body, {"runs": results, "ceiling": ceiling, "jump_factor": jump}, __file__,
                   argv, notes, tiny=args.tiny)
    return results


if __name__ == "__main__":
    main()
