"""
Quality A/B on the synthetic shapes: detectron2's stock RPN/ROI heads vs the balanced heads, same
tiny Swin backbone, data, schedule and seeds; plus a POS_WEIGHT sweep of the balanced heads.

    python benchmarks/quality_ab.py --probe         # 1-2 min: s/iteration, 1 vs 2 jobs, estimate
    python benchmarks/quality_ab.py                 # the A/B and the sweep (15 runs, ~33 min)
    python benchmarks/quality_ab.py --update-md     # ... and replace its section of BENCHMARKS.md
    python benchmarks/quality_ab.py --tiny          # seconds: a few iterations (the test suite)

Settings (both keep the images without objects, DATALOADER.FILTER_EMPTY_ANNOTATIONS False: with
True detectron2 drops them and the imbalance this measures disappears):

- mild: synthetic_shapes_train / _val (10% empty images, objects 12-60 px in 192-px images,
  classes equally frequent), resized to 128 px as in the CPU demo;
- severe: synthetic_shapes_rare_train / _val (80% empty images, objects 8-20 px in 128-px
  images, class frequencies 0.7 / 0.2 / 0.1).

Each run is ``train_net.py`` in a subprocess with the CPU demo configs
(quick_schedules/swin_tiny_{stock,balanced}_demo.yaml) and overrides for data, schedule, SEED,
health checks and OUTPUT_DIR (one folder per run under --output-dir). A run whose folder holds a
result.json made with the same command line and threads is not run again, so an interrupted A/B
continues where it stopped. Runs go --jobs at a time, each with --threads-per-job threads
(OMP_NUM_THREADS): two processes that each use all cores slow each other down many times over.

The balanced heads run with the weights given by --ab-balanced, one A/B arm per POS:BBOX pair:
POS sets MODEL.BALANCED_LOSS.RPN_CLS_POS_WEIGHT and ROI_CLS_POS_WEIGHT, BBOX sets
RPN_LOSS_BBOX_WEIGHT and ROI_LOSS_BBOX_WEIGHT (the demo config's own values are overridden).
The default, 1:1, is the design's defaults (configs/swin_balanced.yaml); 3:0.25 is what the CPU
demo config ships (6 more runs, about 15 minutes). The sweep sets POS to each --sweep value with
BBOX 1, on the severe setting, with --sweep-seed; a sweep run that is also an A/B run runs once.

From each run's metrics.json: the final COCO bbox/segm AP and AP50 ("no predictions", which
COCOEvaluator reports as NaN, counts as 0), and the health monitor's detection checks
(engine/health.py, every HEALTH.PERIOD iterations on the first HEALTH.NUM_IMAGES val images):
the lowest detections per image at HEALTH.MAIN_THRESHOLD after HEALTH.WARMUP_ITERS, the value
at the last check, how many of those checks found no detection, and *collapsed* = the monitor
reported a collapse (HEALTH.PATIENCE consecutive checks at 0 or far below their best). Results
are parsed from metrics.json anew each time, also for reused runs.
"""

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file
import common  # noqa: E402
from balanced_rcnn.data import BUILTIN_SYNTHETIC
from detectron2.data import DatasetCatalog
from balanced_rcnn.engine.health import EXIT_COLLAPSE, EXIT_NON_FINITE

NAME = "quality_ab"
TRAIN_NET = common.REPO / "train_net.py"
CONFIGS = {
    "stock": common.REPO / "configs/quick_schedules/swin_tiny_stock_demo.yaml",
    "balanced": common.REPO / "configs/quick_schedules/swin_tiny_balanced_demo.yaml",
}
# The health monitor's scalars (engine/health.py): detections per image at the main threshold
# of each check, and the number of collapses it reported so far.
DETS_SCALAR = "health/dets_per_image"
COLLAPSES_SCALAR = "health/num_collapses"
AP_KEYS = ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50")


@dataclass(frozen=True)
class Setting:
    train: str
    test: str
    image_side: int  # INPUT.MIN_SIZE_TRAIN / MIN_SIZE_TEST


@dataclass(frozen=True)
class Schedule:
    iters: int
    batch: int
    warmup: int  # SOLVER.WARMUP_ITERS (the configs' cosine decay follows)
    health_period: int  # a detection check every this many iterations (>= 20: each is logged)
    health_warmup: int  # checks before this many iterations are not judged
    health_images: int


SETTINGS = {
    "mild": Setting("synthetic_shapes_train", "synthetic_shapes_val", 128),
    "severe": Setting("synthetic_shapes_rare_train", "synthetic_shapes_rare_val", 128),
}
TINY_SETTINGS = {
    name: Setting("synthetic_shapes_tiny_train", "synthetic_shapes_tiny_val", 64)
    for name in SETTINGS
}
# Sized for 2 CPU cores, 2 runs at a time with 1 thread each (about 0.3 s per iteration at
# 128 px, batch 4): measured, 21 runs (--ab-balanced 1:1 3:0.25) in 46 minutes, 3.4-5.4 minutes
# a run, so the default 15 in about 33.
# The tiny Swin's AP on the mild data stays low until iteration 400-600 and then jumps; 800
# iterations keep a margin, so that the A/B does not compare two models that have not learned.
SCHEDULE = Schedule(iters=800, batch=4, warmup=50, health_period=50, health_warmup=100,
                    health_images=16)
TINY_SCHEDULE = Schedule(iters=6, batch=2, warmup=2, health_period=2, health_warmup=2,
                         health_images=4)


@dataclass(frozen=True)
class Run:
    setting: str
    heads: str  # "stock" or "balanced"
    seed: int
    # Balanced only: RPN_CLS_POS_WEIGHT = ROI_CLS_POS_WEIGHT, RPN_ = ROI_LOSS_BBOX_WEIGHT.
    pos_weight: Optional[float] = None
    bbox_weight: Optional[float] = None

    @property
    def arm(self) -> str:
        """The heads and, for the balanced ones, their weights: one A/B row each."""
        if self.heads != "balanced":
            return self.heads
        return f"balanced POS {self.pos_weight:g}, BBOX {self.bbox_weight:g}"

    @property
    def name(self) -> str:
        weights = ""
        if self.heads == "balanced":
            weights = f"_w{self.pos_weight:g}"
            weights += f"_b{self.bbox_weight:g}" if self.bbox_weight != 1 else ""
        return f"{self.setting}_{self.heads}{weights}_s{self.seed}"

    def overrides(self, setting: Setting, schedule: Schedule, output_dir: Path) -> List[str]:
        opts = {
            "DATASETS.TRAIN": f"('{setting.train}',)",
            "DATASETS.TEST": f"('{setting.test}',)",
            # Deliberate (module docstring): the empty images are the imbalance under test.
            "DATALOADER.FILTER_EMPTY_ANNOTATIONS": "False",
            "INPUT.MIN_SIZE_TRAIN": f"({setting.image_side},)",
            "INPUT.MIN_SIZE_TEST": str(setting.image_side),
            "SOLVER.MAX_ITER": str(schedule.iters),
            "SOLVER.IMS_PER_BATCH": str(schedule.batch),
            "SOLVER.WARMUP_ITERS": str(schedule.warmup),
            "SOLVER.CHECKPOINT_PERIOD": str(10 * schedule.iters),  # only model_final
            "HEALTH.PERIOD": str(schedule.health_period),
            "HEALTH.WARMUP_ITERS": str(schedule.health_warmup),
            "HEALTH.NUM_IMAGES": str(schedule.health_images),
            "HEALTH.ACTION": "warn",  # keep training: the final AP of a collapsed run counts
            "SEED": str(self.seed),
            "OUTPUT_DIR": str(output_dir),
        }
        if self.heads == "balanced":
            # str(float): "2.0", not "2", which yacs refuses for a float key.
            opts["MODEL.BALANCED_LOSS.RPN_CLS_POS_WEIGHT"] = str(float(self.pos_weight))
            opts["MODEL.BALANCED_LOSS.ROI_CLS_POS_WEIGHT"] = str(float(self.pos_weight))
            opts["MODEL.BALANCED_LOSS.RPN_LOSS_BBOX_WEIGHT"] = str(float(self.bbox_weight))
            opts["MODEL.BALANCED_LOSS.ROI_LOSS_BBOX_WEIGHT"] = str(float(self.bbox_weight))
        return [x for kv in opts.items() for x in kv]


def plan_runs(settings: Sequence[str], seeds: Sequence[int],
              ab_balanced: Sequence[Tuple[float, float]], sweep: Sequence[float],
              sweep_seed: int) -> Tuple[List[Run], List[Run]]:
    """(A/B runs, sweep runs); seed-major, so that a partial A/B already pairs the arms."""
    arms = [("stock", None, None)] + [("balanced", pos, bbox) for pos, bbox in ab_balanced]
    ab = [Run(s, heads, seed, pos, bbox)
          for seed in seeds for s in settings for heads, pos, bbox in arms]
    swept = [Run("severe", "balanced", sweep_seed, w, 1.0) for w in sweep]
    return ab, swept


def parse_weight_pair(text: str) -> Tuple[float, float]:
    """"POS:BBOX" (e.g. "3:0.25") of --ab-balanced."""
    try:
        pos, bbox = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ab-balanced {text!r}: expected POS:BBOX, two numbers, e.g. 1:1 or 3:0.25"
        ) from None
    return pos, bbox


# -- one run: command, reuse, parse --


def command(run: Run, setting: Setting, schedule: Schedule, run_dir: Path) -> List[str]:
    return [sys.executable, str(TRAIN_NET), "--config-file", str(CONFIGS[run.heads]),
            *run.overrides(setting, schedule, run_dir)]


def read_metrics(metrics_json: Path) -> List[dict]:
    return [json.loads(line) for line in metrics_json.read_text().splitlines() if line.strip()]


def parse_metrics(records: List[dict], health_warmup: int) -> dict:
    """The final AP and the health checks of one run (see the module docstring)."""
    final = next((r for r in reversed(records) if "bbox/AP" in r), {})
    ap = {}
    for key in AP_KEYS:
        value = final.get(key)
        ap[key] = 0.0 if value is None or math.isnan(value) else float(value)
    checks = [(r["iteration"], r[DETS_SCALAR]) for r in records if DETS_SCALAR in r]
    # The monitor judges a check made at `iteration` when iteration + 1 >= its warm-up.
    judged = [d for it, d in checks if it + 1 >= health_warmup]
    collapses = max((r.get(COLLAPSES_SCALAR, 0) for r in records), default=0)
    return {
        **ap,
        "evaluated": bool(final),
        "no_predictions": bool(final) and math.isnan(final.get("bbox/AP", 0.0)),
        "health_checks": checks,
        "judged_checks": len(judged),
        "zero_checks": sum(d == 0 for d in judged),
        "lowest_dets_per_image": min(judged) if judged else None,
        "last_dets_per_image": checks[-1][1] if checks else None,
        "monitor_collapses": int(collapses),
        "collapsed": collapses > 0,
    }


def _spec(cmd: List[str], threads: int) -> dict:
    # What makes a result reusable: the same overrides (not the interpreter path) and threads.
    return {"command": cmd[1:], "threads": threads}


def load_result(run_dir: Path, spec: dict, schedule: Schedule) -> Optional[dict]:
    path = run_dir / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("spec") != spec:
        return None
    return {**result, **parse_metrics(read_metrics(run_dir / "metrics.json"),
                                      schedule.health_warmup)}


def finish(run: Run, run_dir: Path, spec: dict, returncode: int, seconds: float,
           schedule: Schedule) -> dict:
    # train_net.py's exit codes when the health monitor stops a run (README, "Training health").
    status = {0: "ok", EXIT_NON_FINITE: "non-finite", EXIT_COLLAPSE: "stopped: collapse"}.get(
        returncode, f"failed ({returncode})")
    metrics = run_dir / "metrics.json"
    parsed = {}
    if metrics.exists():
        parsed = parse_metrics(read_metrics(metrics), schedule.health_warmup)
    result = {"run": asdict(run), "name": run.name, "status": status, "seconds": seconds,
              "spec": spec, **parsed}
    if status == "ok":  # only finished runs are reused; others run again next time
        (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    else:
        log = (run_dir / "stdout.log").read_text()[-3000:]
        print(f"  {run.name}: {status}; end of {run_dir / 'stdout.log'}:\n{log}", flush=True)
    return result


# -- running --


@dataclass
class _Job:
    run: Run
    run_dir: Path
    cmd: List[str]
    spec: dict
    proc: Optional[subprocess.Popen] = None
    log: Optional[object] = None
    began: float = 0.0

    def start(self, env: dict) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)  # no stale metrics.json lines
        self.run_dir.mkdir(parents=True)
        self.log = open(self.run_dir / "stdout.log", "w")
        self.began = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, cwd=common.REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)


def execute(runs: List[Run], settings: Dict[str, Setting], schedule: Schedule, output: Path,
            jobs: int, threads: int, extra_opts: Sequence[str] = ()) -> Dict[str, dict]:
    """Run (or reuse) every run, ``jobs`` at a time (``extra_opts``: more overrides); returns
    {run name: result}."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONUNBUFFERED="1")
    results: Dict[str, dict] = {}
    todo: List[_Job] = []
    for run in runs:
        run_dir = output / run.name
        cmd = command(run, settings[run.setting], schedule, run_dir) + list(extra_opts)
        spec = _spec(cmd, threads)
        done = load_result(run_dir, spec, schedule)
        if done is not None:
            results[run.name] = done
        else:
            todo.append(_Job(run, run_dir, cmd, spec))
    print(f"{len(results)} of {len(runs)} runs already done; {len(todo)} to run, {jobs} at a time, "
          f"{threads} thread(s) each", flush=True)
    running: List[_Job] = []
    start, finished = time.perf_counter(), 0
    try:
        while todo or running:
            while todo and len(running) < jobs:
                running.append(todo.pop(0))
                running[-1].start(env)
            time.sleep(0.2)
            for job in [j for j in running if j.proc.poll() is not None]:
                job.log.close()
                running.remove(job)
                result = finish(job.run, job.run_dir, job.spec, job.proc.returncode,
                                time.perf_counter() - job.began, schedule)
                results[job.run.name] = result
                finished += 1
                elapsed = time.perf_counter() - start
                left = len(todo) + len(running)
                print(f"  [{finished}/{finished + left}] {job.run.name}: {result['status']}, "
                      f"{result['seconds'] / 60:.1f} min; elapsed {elapsed / 60:.1f} min, about "
                      f"{elapsed / finished * left / 60:.0f} min to go", flush=True)
    finally:
        # Interrupted (Ctrl-C, SIGTERM): no training process outlives this one.
        for job in running:
            job.proc.terminate()
            job.proc.wait()
            job.log.close()
    return results


# -- tables --


def objects_per_check_image(setting: Setting, schedule: Schedule) -> float:
    """Ground-truth objects per image on the health monitor's check images (the first
    ``health_images`` of the test set): what "dets/img" means for a model that finds them."""
    records = DatasetCatalog.get(setting.test)[: schedule.health_images]
    return sum(len(r["annotations"]) for r in records) / len(records)


def _mean_std(values: List[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _dets(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _lowest(results: List[dict]) -> str:
    values = [r["lowest_dets_per_image"] for r in results
              if r.get("lowest_dets_per_image") is not None]
    return f"{min(values):.2f}" if values else "-"


def _group_row(label: List[str], group: List[dict]) -> List[str]:
    ok = [r for r in group if r["status"] == "ok"]
    failed = len(group) - len(ok)
    cells = [_mean_std([r[k] for r in ok]) for k in AP_KEYS]
    collapsed = sum(1 for r in ok if r["collapsed"])
    runs = f"{len(ok)}" + (f" (+{failed} failed)" if failed else "")
    last = " / ".join(_dets(r.get("last_dets_per_image")) for r in ok) or "-"
    zeros = f"{sum(r['zero_checks'] for r in ok)}/{sum(r['judged_checks'] for r in ok)}"
    return [*label, runs, *cells, _lowest(ok), last, zeros, f"{collapsed}/{len(ok)}"]


def render(ab: List[Run], swept: List[Run], results: Dict[str, dict],
           settings_used: Dict[str, Setting], schedule: Schedule, threads: int,
           jobs: int) -> Tuple[str, List[str]]:
    metric_headers = ["bbox AP", "bbox AP50", "segm AP", "segm AP50",
                      "lowest dets/img", "last dets/img", "checks at 0", "collapsed"]
    rows, notes = [], []
    settings = list(dict.fromkeys(r.setting for r in ab))
    arms = list(dict.fromkeys(r.arm for r in ab))
    for setting in settings:
        for arm in arms:
            group = [results[r.name] for r in ab if (r.setting, r.arm) == (setting, arm)]
            rows.append(_group_row([setting, arm], group))
        # {seed: {arm: result}} of this setting: balanced − stock differences per seed.
        by_seed: Dict[int, Dict[str, dict]] = {}
        for r in ab:
            if r.setting == setting and results[r.name]["status"] == "ok":
                by_seed.setdefault(r.seed, {})[r.arm] = results[r.name]
        for arm in arms[1:]:
            diffs = [p[arm]["bbox/AP"] - p["stock"]["bbox/AP"]
                     for p in by_seed.values() if arm in p and "stock" in p]
            if diffs:
                notes.append(f"{setting}: bbox AP of {arm} minus stock, paired by seed: "
                             f"{_mean_std(diffs)} over {len(diffs)} seed(s)")
    body = common.markdown_table(["setting", "heads", "runs", *metric_headers], rows)
    if swept:
        sweep_rows = [_group_row([f"{r.pos_weight:g}", str(r.seed)], [results[r.name]])
                      for r in swept]
        body += ("\n\nPOS_WEIGHT sweep, severe setting, balanced heads (RPN_CLS_POS_WEIGHT and "
                 "ROI_CLS_POS_WEIGHT set together; BBOX weights 1):\n\n")
        body += common.markdown_table(["POS_WEIGHT", "seed", "runs", *metric_headers], sweep_rows)
    minutes = sum(r["seconds"] for r in results.values()) / 60
    notes += [
        f"AP: mean ± sample std over seeds (COCO, percent; a run with no predictions counts 0). "
        f"lowest dets/img: lowest detections per image at the health monitor's main threshold "
        f"(score 0.05) over the checks after iteration {schedule.health_warmup}, every "
        f"{schedule.health_period} iterations on the first {schedule.health_images} val images, "
        f"lowest over the seeds; last dets/img: at the last check, per seed; checks at 0: "
        f"checks after the warm-up that found no detection, all seeds together; collapsed: runs "
        f"in which the health monitor reported a collapse (HEALTH.PATIENCE 3 consecutive checks "
        f"at 0 or below 5% of the best earlier check). The check images hold " + ", ".join(
            f"{objects_per_check_image(settings_used[s], schedule):.2f} ({s})"
            for s in dict.fromkeys(r.setting for r in ab + swept)
        ) + " ground-truth objects per image.",
        f"Schedule: {schedule.iters} iterations, batch {schedule.batch}, AdamW lr 8e-4 with "
        f"{schedule.warmup} warm-up iterations and cosine decay (the CPU demo configs); "
        f"{jobs} run(s) at a time, {threads} thread(s) each; the runs took {minutes:.0f} "
        f"minutes together (sum of their durations).",
    ]
    return body, notes


def per_run_table(results: Dict[str, dict]) -> str:
    rows = [[name, r["status"], *(f"{r.get(k, 0):.1f}" for k in AP_KEYS),
             _dets(r.get("lowest_dets_per_image")), _dets(r.get("last_dets_per_image")),
             f"{r.get('zero_checks', 0)}/{r.get('judged_checks', 0)}",
             "yes" if r.get("collapsed") else "no", f"{r['seconds'] / 60:.1f}"]
            for name, r in results.items()]
    return common.markdown_table(
        ["run", "status", *AP_KEYS, "lowest dets/img", "last dets/img", "checks at 0",
         "collapsed", "minutes"],
        rows)


# -- the timing probe: s/iteration, and 1 job x 2 threads vs 2 jobs x 1 thread --

# Seconds per image of inference, 1 thread, 128 px, at most 100 detections per image: measured
# with train_net.py --eval-only on synthetic_shapes_val (0.087 s) with a barely trained model
# (the most detections, the slowest case). Used for the probe's evaluation/check allowance.
INFERENCE_S_PER_IMAGE = 0.09


def _seconds_per_iter(run_dir: Path) -> Optional[float]:
    """The last 20-iteration median of the trainer's iteration time (metrics.json "time")."""
    times = [r["time"] for r in read_metrics(run_dir / "metrics.json") if "time" in r]
    return times[-1] if times else None


def _eval_allowance(setting: Setting, schedule: Schedule) -> float:
    """Seconds a full run spends on health checks and the final evaluation (estimated)."""
    checks = schedule.iters // schedule.health_period
    val_images = BUILTIN_SYNTHETIC[setting.test].num_images
    return (checks * schedule.health_images + val_images) * INFERENCE_S_PER_IMAGE


def probe(settings: Dict[str, Setting], schedule: Schedule, output: Path, iters: int,
          planned_runs: int, modes: Sequence[Tuple[int, int]] = ((1, 2), (2, 1))
          ) -> Dict[str, dict]:
    """
    Two short training runs (mild and severe; no evaluation, no checks) in each of ``modes``
    ((jobs, threads per job); default: one after the other with 2 threads each, then both at
    once with 1 thread each). Prints s/iteration and, for both
    modes, the estimated duration of the planned runs: each probe run plus its remaining
    iterations plus the checks' and evaluation's inference (INFERENCE_S_PER_IMAGE).
    """
    print(f"1-min load average before the probe: {os.getloadavg()[0]:.2f} (another process on "
          "the CPUs distorts both modes, the 2-thread one most)", flush=True)
    short = replace(schedule, iters=iters)
    runs = [Run("mild", "balanced", 0, 1.0, 1.0), Run("severe", "stock", 0)]
    no_eval = ["DATASETS.TEST", "()", "HEALTH.PERIOD", "0"]
    report = {}
    for jobs, threads in modes:
        mode = f"{jobs} job(s) x {threads} thread(s)"
        folder = output / f"probe_j{jobs}_t{threads}"
        shutil.rmtree(folder, ignore_errors=True)  # always measured anew
        start = time.perf_counter()
        results = execute(runs, settings, short, folder, jobs, threads, no_eval)
        wall = time.perf_counter() - start
        if any(r["status"] != "ok" for r in results.values()):
            raise RuntimeError(f"probe runs failed ({mode}); see {folder}/*/stdout.log")
        per_iter = [_seconds_per_iter(folder / r.name) for r in runs]
        full = [results[r.name]["seconds"] + (schedule.iters - iters) * p
                + _eval_allowance(settings[r.setting], schedule)
                for r, p in zip(runs, per_iter)]
        # jobs at a time; runs of the two settings take about as long.
        estimate = math.ceil(planned_runs / jobs) * statistics.mean(full)
        report[mode] = {"wall_s": wall, "s_per_iter": per_iter, "run_s": full,
                        "estimate_s": estimate}
        print(f"{mode}: 2 runs of {iters} iterations in {wall:.0f} s; s/iteration "
              f"{', '.join(f'{p:.3f}' for p in per_iter)} (mild, severe); a full run of "
              f"{schedule.iters} iterations ~{statistics.mean(full) / 60:.1f} min; "
              f"{planned_runs} runs ~{estimate / 60:.0f} min", flush=True)
    best = min(report, key=lambda m: report[m]["estimate_s"])
    print(f"faster: {best}; 1-min load average now: {os.getloadavg()[0]:.2f}")
    return report


# -- command line --


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help=f"{TINY_SCHEDULE.iters} iterations on synthetic_shapes_tiny, 1 seed")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 2 (--tiny: 0)")
    parser.add_argument("--ab-balanced", nargs="+", type=parse_weight_pair, default=[(1.0, 1.0)],
                        metavar="POS:BBOX",
                        help="one balanced arm of the A/B per pair: POS_WEIGHT and "
                        "LOSS_BBOX_WEIGHT of both heads (default 1:1, the design's defaults; "
                        "the CPU demo's: 3:0.25)")
    parser.add_argument("--sweep", nargs="*", type=float,
                        help="POS_WEIGHT values on the severe setting (default: 1 2 3 5; "
                        "--tiny: 1 2); none: no sweep")
    parser.add_argument("--sweep-seed", type=int, default=0)
    parser.add_argument("--iters", type=int, help=f"default {SCHEDULE.iters}")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--threads-per-job", type=int, default=1, help="default 1")
    parser.add_argument("--output-dir", type=Path,
                        help="run folders (default output/quality_ab, --tiny: ..._tiny)")
    common.add_output_arguments(parser, NAME)
    parser.add_argument("--probe", action="store_true",
                        help="only time 2 short runs both ways and estimate the A/B")
    parser.add_argument("--probe-iters", type=int, default=50)
    parser.add_argument("--probe-modes", nargs="+", default=["1x2", "2x1"],
                        help="JOBSxTHREADS pairs the probe compares (default: 1x2 2x1)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    settings = TINY_SETTINGS if args.tiny else SETTINGS
    schedule = TINY_SCHEDULE if args.tiny else SCHEDULE
    if args.iters:
        schedule = replace(schedule, iters=args.iters)
    seeds = args.seeds or ([0] if args.tiny else [0, 1, 2])
    sweep = args.sweep if args.sweep is not None else ([1.0, 2.0] if args.tiny else
                                                       [1.0, 2.0, 3.0, 5.0])
    output = (args.output_dir or common.REPO / "output" / (NAME + ("_tiny" if args.tiny else "")))
    output = output.resolve()
    ab, swept = plan_runs(args.settings, seeds, args.ab_balanced, sweep, args.sweep_seed)
    runs = list(dict.fromkeys(ab + swept))  # the sweep's A/B-weight run is the A/B's run

    if args.probe:
        modes = [tuple(int(x) for x in m.split("x")) for m in args.probe_modes]
        return probe(settings, schedule, output, args.probe_iters, len(runs), modes)
    if args.dry_run:
        for run in runs:
            print(shlex.join(command(run, settings[run.setting], schedule, output / run.name)))
        return {}

    results = execute(runs, settings, schedule, output, args.jobs, args.threads_per_job)
    body, notes = render(ab, swept, results, settings, schedule, args.threads_per_job, args.jobs)
    details = f"<details><summary>Every run</summary>\n\n{per_run_table(results)}\n\n</details>"
    print("\n" + body + "\n\n" + "\n".join(f"- {n}" for n in notes))
    results_dir = args.results_dir or (None if args.tiny else common.RESULTS_DIR)
    if results_dir is not None:
        name = NAME + ("_tiny" if args.tiny else "")
        data = {"tiny": args.tiny, "schedule": asdict(schedule),
                "settings": {k: asdict(settings[k]) for k in args.settings},
                "jobs": args.jobs, "threads_per_job": args.threads_per_job,
                "runs": results}
        markdown = common.write_results(
            name, "Quality A/B: balanced vs stock heads on synthetic shapes (quality_ab.py)",
            body + "\n\n" + details, data, common.command_line(__file__, argv), results_dir, notes)
        if args.update_md:
            common.update_benchmarks_md(name, markdown)
    failed = [n for n, r in results.items() if r["status"] != "ok"]
    if failed:
        print(f"{len(failed)} run(s) did not finish: {', '.join(failed)}", file=sys.stderr)
    return results


if __name__ == "__main__":
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the running trainings are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    main()
