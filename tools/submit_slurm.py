#!/usr/bin/env python
"""
Submit train_net.py as one SLURM job with submitit: one task per node, requeued with --resume
when it reaches its time limit or is preempted, until it has trained to SOLVER.MAX_ITER.

Usage:
  python tools/submit_slurm.py --config-file configs/swin_balanced.yaml --nodes 2 \\
      --gpus-per-node 8 --partition PART --time 4320 [--account A] [--qos Q] [--constraint C] \\
      [--job-dir jobs/NAME] [--resume] [--eval-only] [KEY VALUE ...]

Every node runs ``train_net.py`` itself (the same main and launch as by hand) with --num-gpus,
--num-machines, --machine-rank and --dist-url taken from the job (reliability/submitit_job.py says
how the requeue works). Trailing KEY VALUE pairs override the config, as for train_net.py.
--cluster local runs the job on this machine through submitit's local executor (one node, no
SLURM), which is how the tests run it. Prints the job id, the log files, OUTPUT_DIR and the
commands to follow the job.
"""

import argparse
import shlex
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO / "train_net.py"
CLUSTERS = ("slurm", "local")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("the run (as train_net.py)")
    run.add_argument("--config-file", required=True, type=Path)
    run.add_argument("--resume", action="store_true",
                     help="continue from OUTPUT_DIR/last_checkpoint from the first attempt on")
    run.add_argument("--eval-only", action="store_true")
    run.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    job = parser.add_argument_group("the job")
    job.add_argument("--nodes", type=int, default=1)
    job.add_argument("--gpus-per-node", type=int, default=8,
                     help="GPUs (training processes) per node (default 8)")
    job.add_argument("--cpus-per-gpu", type=int, default=10,
                     help="CPU cores per GPU for the data loaders (default 10)")
    job.add_argument("--mem-gb", type=int, default=None, help="memory per node (default: SLURM's)")
    job.add_argument("--time", type=int, default=4320,
                     help="time limit of one attempt in minutes (default 4320 = 3 days)")
    job.add_argument("--partition", default=None)
    job.add_argument("--account", default=None)
    job.add_argument("--qos", default=None)
    job.add_argument("--constraint", default=None, help="e.g. volta32gb")
    job.add_argument("--comment", default=None)
    job.add_argument("--exclude", default=None, help="nodes not to use")
    job.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                     help="any other #SBATCH option, e.g. --sbatch mail-type=END (repeatable)")
    job.add_argument("--signal-delay", type=int, default=120,
                     help="seconds between SLURM's warning signal and the kill: time to stop at a "
                          "step boundary and save (default 120)")
    job.add_argument("--max-requeues", type=int, default=20,
                     help="how many time-outs the job may be requeued after (default 20; "
                          "preemptions do not count)")
    job.add_argument("--job-name", default=None, help="default: the config's file name")
    job.add_argument("--job-dir", type=Path, default=None,
                     help="submitit's folder: scripts, pickles, logs (default jobs/<job name>)")
    job.add_argument("--cluster", choices=CLUSTERS, default="slurm",
                     help="slurm (default), or local: this machine, one node, no SLURM")
    args = parser.parse_args(argv)
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    return args


class SubmitError(Exception):
    """A problem with the request: one line for the user, no traceback."""


def _sbatch_options(pairs: Sequence[str]) -> Dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SubmitError(f"--sbatch {pair!r}: expected KEY=VALUE, e.g. mail-type=END")
        out[key.lstrip("-").replace("-", "_")] = value
    return out


def train_args(args: argparse.Namespace) -> List[str]:
    """train_net.py's arguments, without those each node sets (reliability/submitit_job.py)."""
    out = ["--config-file", str(args.config_file.resolve())]
    out += ["--resume"] if args.resume else []
    out += ["--eval-only"] if args.eval_only else []
    return out + list(args.opts)


def _output_dir(args: argparse.Namespace) -> str:
    from training_harness.config import load_project_config

    try:
        cfg = load_project_config(str(args.config_file), args.opts)
    except Exception as e:  # yacs: unknown key, wrong type, odd number of overrides
        raise SubmitError(f"{args.config_file}: {type(e).__name__}: {e}") from None
    return str(Path(cfg.OUTPUT_DIR).resolve())


def build_executor(args: argparse.Namespace, job_dir: Path, job_name: str):
    import submitit

    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
    if args.cluster == "slurm" and missing:
        raise SubmitError(f"{' and '.join(missing)} not on PATH: this is not a SLURM login node "
                          "(--cluster local runs the job on this machine)")
    if args.cluster == "local" and args.nodes != 1:
        raise SubmitError(f"--cluster local runs on one node, got --nodes {args.nodes}")
    for name in ("nodes", "gpus_per_node", "time", "signal_delay"):
        if getattr(args, name) < 1:
            raise SubmitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    executor = submitit.AutoExecutor(folder=str(job_dir / "%j"), cluster=args.cluster,
                                     slurm_max_num_timeout=args.max_requeues)
    params = dict(name=job_name, nodes=args.nodes, tasks_per_node=1,
                  timeout_min=args.time, cpus_per_task=args.cpus_per_gpu * args.gpus_per_node)
    if args.cluster == "slurm":
        additional = {k: v for k, v in (("account", args.account), ("qos", args.qos),
                                        ("constraint", args.constraint),
                                        ("comment", args.comment), ("exclude", args.exclude))
                      if v is not None}
        additional.update(_sbatch_options(args.sbatch))
        params.update(gpus_per_node=args.gpus_per_node, slurm_signal_delay_s=args.signal_delay,
                      slurm_additional_parameters=additional)
        if args.partition:
            params["slurm_partition"] = args.partition
        if args.mem_gb:
            params["mem_gb"] = args.mem_gb
    else:
        import torch  # the local executor shows the job only the GPUs it asks for

        if torch.cuda.is_available():
            params["gpus_per_node"] = args.gpus_per_node
    executor.update_parameters(**params)
    return executor


def main(argv: Optional[Sequence[str]] = None):
    args = parse_args(argv)
    try:
        if not args.config_file.is_file():
            raise SubmitError(f"--config-file {args.config_file} does not exist")
        output_dir = _output_dir(args)
        job_name = args.job_name or args.config_file.stem
        job_dir = (args.job_dir or REPO / "jobs" / job_name).resolve()
        executor = build_executor(args, job_dir, job_name)
    except SubmitError as e:
        print(f"submit_slurm: {e}", file=sys.stderr)
        sys.exit(2)

    from training_harness.reliability.submitit_job import TrainingJob

    job = executor.submit(TrainingJob(str(TRAIN_NET), train_args(args), args.gpus_per_node,
                                      output_dir, stop_timeout_s=max(args.signal_delay - 30, 10)))
    stdout, stderr = job.paths.stdout, job.paths.stderr
    print(f"Submitted job {job.job_id} ({args.nodes} node(s) x {args.gpus_per_node} GPU(s), "
          f"{args.cluster})")
    print(f"  job folder:  {job.paths.folder}")
    print(f"  logs:        {stdout} and {stderr} (task 0)")
    print(f"  OUTPUT_DIR:  {output_dir} (log.txt, metrics.json, checkpoints)")
    print(f"  follow:      tail -f {shlex.quote(str(stderr))} {shlex.quote(output_dir)}/log.txt")
    if args.cluster == "slurm":
        print(f"  status:      squeue -j {job.job_id}; cancel: scancel {job.job_id}")
    return job


if __name__ == "__main__":
    main()
