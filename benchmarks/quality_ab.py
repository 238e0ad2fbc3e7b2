"""
Quality A/B on the synthetic shapes: detectron2's stock heads, stock heads with image
rebalancing, and the balanced heads with their loss options, same tiny Swin backbone, data,
schedule and seeds. The settings and arms are defined in quality_arms.py.

    python benchmarks/quality_ab.py --probe         # 1-2 min: s/iteration, 1 vs 2 jobs, estimate
    python benchmarks/quality_ab.py --list          # the settings and arms, no training
    python benchmarks/quality_ab.py                 # the final table (every setting, 4 arms, 5 seeds)
    python benchmarks/quality_ab.py --settings severe --arms stock design_defaults --seeds 0 1
    python benchmarks/quality_ab.py --update-md     # ... and replace its section of BENCHMARKS.md
    python benchmarks/quality_ab.py --versus stock_rfs   # every arm also paired against stock_rfs
    python benchmarks/quality_ab.py --tiny          # seconds: a few iterations (the test suite)

Each run is ``train_net.py`` in a subprocess with a CPU demo config
(quick_schedules/swin_tiny_{stock,balanced}_demo.yaml) and overrides for data, schedule, SEED,
health checks, the arm and OUTPUT_DIR (one folder per run under --output-dir). A run whose folder
holds a result.json made from the same resolved config and threads is not run again, so an
interrupted study continues where it stopped, and a study can be spread over sessions (config
keys added to the project since a run was made count as keeping their defaults, which are the
behaviour that run had: new options are off by default). Runs go
--jobs at a time, each with --threads-per-job threads (OMP_NUM_THREADS): two processes that each
use all cores slow each other down many times over. The fine-tune setting first trains (once)
the detector it starts from.

From each run's metrics.json: the final COCO bbox/segm AP and AP50 ("no predictions", which
COCOEvaluator reports as NaN, counts as 0), and the health monitor's detection checks
(health/monitor.py, every HEALTH.PERIOD iterations on the first HEALTH.NUM_IMAGES val images, and
once before training): detections per image at HEALTH.MAIN_THRESHOLD before training, the
lowest after HEALTH.WARMUP_ITERS, the value at the last check, how many of those checks found no
detection, *collapsed* = the monitor's collapse rule (HEALTH.PATIENCE consecutive checks at 0 or
below HEALTH.COLLAPSE_FRACTION x the best earlier one, capped at the objects per check image;
health/collapse.py, count_collapses) applied to the logged checks, and the gradient share of each
loss term on the backbone at the checks (health/grad_share/*, health/grad_shares.py). Results are parsed from metrics.json anew each time,
also for reused runs.
"""

import argparse
import gzip
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
from functools import lru_cache
from pathlib import Path, PurePath
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file
import common  # noqa: E402
import quality_arms  # noqa: E402
from quality_arms import ARMS, PRETRAINS, SETTINGS, TINY_SETTINGS, Arm, Setting  # noqa: E402

from balanced_rcnn.evaluation.frequency_groups import frequency_groups
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from training_harness.config import add_training_harness_config, load_project_config
from training_harness.data import BUILTIN_SYNTHETIC
from training_harness.errors import EXIT_COLLAPSE, EXIT_NON_FINITE
from training_harness.health.check_images import check_records
from training_harness.health.collapse import count_collapses, objects_per_image
from training_harness.health.grad_shares import GRAD_SHARE_PREFIX
from training_harness.health.step_measures import FOREGROUND_SHARES

NAME = "quality_ab"
TRAIN_NET = common.REPO / "train_net.py"
CONFIGS = {
    "stock": common.REPO / "configs/quick_schedules/swin_tiny_stock_demo.yaml",
    "balanced": common.REPO / "configs/quick_schedules/swin_tiny_balanced_demo.yaml",
}
# The health monitor's scalars (health/monitor.py): detections per image at the main threshold
# of each check, before training, and the number of collapses it reported so far.
DETS_SCALAR = "health/dets_per_image"
START_SCALAR = "health/start_dets_per_image"
COLLAPSES_SCALAR = "health/num_collapses"
AP_KEYS = ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50")
# Every evaluation's AP by class frequency and image-level metrics at TEST.DEPLOYMENT_SCORE_THRESH
# (evaluation/); absent from runs made before they existed. NaN stays NaN (not 0): a group
# without a class, or a run with no predictions (then every image-level metric is 0 anyway).
GROUP_KEYS = ("bbox/APr", "bbox/APc", "bbox/APf")
IMAGE_LEVEL_KEYS = ("image_level/false_alarm_images", "image_level/object_images_detected",
                    "image_level/recall50", "image_level/dets_per_empty_image")
LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask")
# The final table: stock, stock with image rebalancing, the design's form and what ships
# (configs/swin_balanced.yaml: the balanced heads with stock's normalization, weights 1, and half
# the sampled images holding objects).
FINAL_ARMS = ("stock", "stock_rfs", "design", "samples_share")
BASELINES = ("stock", "stock_rfs")  # "the better of stock and stock with image rebalancing"


@dataclass(frozen=True)
class Schedule:
    iters: int
    batch: int
    warmup: int  # SOLVER.WARMUP_ITERS (the configs' cosine decay follows)
    health_period: int  # a detection check every this many iterations (>= 20: each is logged)
    health_warmup: int  # checks before this many iterations are not judged
    health_images: int


# Sized for 2 CPU cores, 2 runs at a time with 1 thread each (about 0.3 s per iteration at
# 128 px, batch 4): 3.4-5.4 minutes a run, measured.
# The tiny Swin's AP on the mild data stays low until iteration 400-600 and then jumps; 800
# iterations keep a margin, so that the A/B does not compare two models that have not learned.
SCHEDULE = Schedule(iters=800, batch=4, warmup=50, health_period=50, health_warmup=100,
                    health_images=16)
TINY_SCHEDULE = Schedule(iters=6, batch=2, warmup=2, health_period=2, health_warmup=2,
                         health_images=4)


@dataclass(frozen=True)
class Run:
    setting: str
    arm: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.setting}_{self.arm}_s{self.seed}"


@dataclass(frozen=True)
class Study:
    """Everything a run's command depends on."""

    settings: Dict[str, Setting]
    arms: Dict[str, Arm]
    pretrains: Dict[str, quality_arms.Pretrain]
    schedule: Schedule
    output: Path
    archive: Optional[Path] = None  # RUNS_ARCHIVE, or None: run folders only


def run_overrides(study: Study, setting: Setting, arm: Arm, seed: int, run_dir: Path,
                  iters: Optional[int] = None) -> List[str]:
    schedule = study.schedule
    opts = {
        "DATASETS.TRAIN": f"('{setting.train}',)",
        "DATASETS.TEST": f"('{setting.test}',)",
        # Deliberate (quality_arms.py): the empty images are the imbalance under test.
        "DATALOADER.FILTER_EMPTY_ANNOTATIONS": "False",
        "MODEL.ROI_HEADS.NUM_CLASSES": str(setting.num_classes),
        "INPUT.MIN_SIZE_TRAIN": f"({setting.image_side},)",
        "INPUT.MIN_SIZE_TEST": str(setting.image_side),
        "SOLVER.MAX_ITER": str(iters or schedule.iters),
        "SOLVER.IMS_PER_BATCH": str(schedule.batch),
        "SOLVER.WARMUP_ITERS": str(schedule.warmup),
        "SOLVER.CHECKPOINT_PERIOD": str(10 * (iters or schedule.iters)),  # only model_final
        "HEALTH.PERIOD": str(schedule.health_period),
        "HEALTH.WARMUP_ITERS": str(schedule.health_warmup),
        "HEALTH.NUM_IMAGES": str(schedule.health_images),
        "HEALTH.CHECK_AT_START": "True",
        "HEALTH.ACTION": "warn",  # keep training: the final AP of a collapsed run counts
        "SEED": str(seed),
        "OUTPUT_DIR": str(run_dir),
    }
    if setting.pretrain:
        opts["MODEL.WEIGHTS"] = str(pretrain_dir(study, setting.pretrain) / "model_final.pth")
    opts.update(dict(setting.overrides))
    opts.update(dict(arm.overrides))
    return [x for kv in opts.items() for x in kv]


def pretrain_dir(study: Study, key: str) -> Path:
    return study.output / study.pretrains[key].name


def run_command(study: Study, run: Run, run_dir: Path) -> List[str]:
    arm = study.arms[run.arm]
    return [sys.executable, str(TRAIN_NET), "--config-file", str(CONFIGS[arm.heads]),
            *run_overrides(study, study.settings[run.setting], arm, run.seed, run_dir)]


def pretrain_command(study: Study, key: str) -> List[str]:
    pre = study.pretrains[key]
    arm = study.arms[pre.arm]
    opts = run_overrides(study, study.settings[pre.setting], arm, pre.seed,
                         pretrain_dir(study, key), iters=pre.iters)
    return [sys.executable, str(TRAIN_NET), "--config-file", str(CONFIGS[arm.heads]), *opts]


def resolved_config(cmd: List[str]) -> Dict[str, object]:
    """The full config a train_net.py command line trains with, {dotted key: value} without
    OUTPUT_DIR: what makes two runs the same (a changed default or config file makes them
    differ)."""
    config_file, opts = cmd[3], cmd[4:]
    cfg = load_project_config(config_file, opts)
    flat: Dict[str, object] = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif f"{prefix}{key}" != "OUTPUT_DIR":
                flat[f"{prefix}{key}"] = value

    walk(cfg, "")
    return json.loads(json.dumps(flat))  # tuples as lists, as read back from result.json


def _unused_keys(config: Dict[str, object]) -> List[str]:
    """Key prefixes that nothing reads in this config: the balanced heads' options with stock
    heads, a sampler's options with another sampler."""
    unused = []
    heads = (config.get("MODEL.PROPOSAL_GENERATOR.NAME"), config.get("MODEL.ROI_HEADS.NAME"),
             config.get("MODEL.ROI_MASK_HEAD.NAME"))
    if not any(str(h).startswith("Balanced") for h in heads):
        unused.append("MODEL.BALANCED_LOSS.")
    sampler = config.get("DATALOADER.SAMPLER_TRAIN")
    if sampler not in ("ObjectShareTrainingSampler", "ClassAwareObjectShareTrainingSampler"):
        unused.append("DATALOADER.OBJECT_IMAGE_SHARE")
    if sampler not in ("RepeatFactorTrainingSampler", "ClassAwareObjectShareTrainingSampler"):
        unused += ["DATALOADER.REPEAT_THRESHOLD", "DATALOADER.REPEAT_SQRT"]
    return unused


def _comparable(key: str, value: object) -> object:
    # A fine-tune's MODEL.WEIGHTS is <study output>/<pretraining run>/model_final.pth: the run
    # folder and file say which pretraining it starts from, the output folder only where the
    # study ran (another clone, another session), so an archived run stays reusable.
    if key == "MODEL.WEIGHTS" and value:
        return PurePath(str(value)).parts[-2:]
    return value


def same_config(stored: Dict[str, object], current: Dict[str, object]) -> bool:
    """Every key of the stored run that the run reads has the same value now; keys added since,
    and keys nothing reads (the balanced heads' options in a stock run, say), are ignored."""
    unused = tuple(_unused_keys(current))
    return all(k.startswith(unused)
               or (k in current and _comparable(k, current[k]) == _comparable(k, v))
               for k, v in stored.items())


def plan_runs(settings: Sequence[str], arms: Sequence[str], seeds: Sequence[int]) -> List[Run]:
    """Seed-major, so that a partial study already pairs the arms."""
    return [Run(s, arm, seed) for seed in seeds for s in settings for arm in arms]


def parse_weight_pair(text: str) -> Tuple[float, float]:
    """"POS:BBOX" (e.g. "3:0.25") of --ab-balanced."""
    try:
        pos, bbox = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ab-balanced {text!r}: expected POS:BBOX, two numbers, e.g. 1:1 or 3:0.25"
        ) from None
    return pos, bbox


# -- one run: reuse, parse --


def read_metrics(metrics_json: Path) -> List[dict]:
    return [json.loads(line) for line in metrics_json.read_text().splitlines() if line.strip()]


@lru_cache(maxsize=None)
def _check_objects(dataset: str, num_images: int, object_images_only: bool) -> float:
    return objects_per_image(check_records(DatasetCatalog.get(dataset), num_images,
                                           object_images_only))


def collapse_rule(config: Dict[str, object]) -> dict:
    """The health monitor's collapse rule as a run's resolved config sets it, with the
    ground-truth objects per check image."""
    dataset = config.get("HEALTH.DATASET") or (config.get("DATASETS.TEST") or [""])[0]
    objects = _check_objects(dataset, int(config["HEALTH.NUM_IMAGES"]),
                             bool(config.get("HEALTH.OBJECT_IMAGES_ONLY", False))) if dataset else 0.0
    # Runs made before the confident and no-foreground rules are judged by their defaults.
    defaults = _health_defaults()
    score = float(config.get("HEALTH.CONFIDENT_SCORE", defaults.CONFIDENT_SCORE))
    return {"warmup_iters": int(config["HEALTH.WARMUP_ITERS"]),
            "fraction": float(config["HEALTH.COLLAPSE_FRACTION"]),
            "patience": int(config["HEALTH.PATIENCE"]), "objects": objects,
            "confident_fraction": float(config.get("HEALTH.CONFIDENT_FRACTION",
                                                   defaults.CONFIDENT_FRACTION)),
            "confident_after_iters": round(float(config.get(
                "HEALTH.CONFIDENT_AFTER", defaults.CONFIDENT_AFTER)) * int(
                config["SOLVER.MAX_ITER"])),
            "confident_scalar": f"{DETS_SCALAR}@{float(config.get('TEST.DEPLOYMENT_SCORE_THRESH', 0.5)) if score == -1 else score:g}"}


@lru_cache(maxsize=1)
def _health_defaults():
    cfg = get_cfg()
    add_training_harness_config(cfg)
    return cfg.HEALTH


def rule_checks(records: List[dict], confident_scalar: str
                ) -> List[Tuple[int, float, Optional[float], bool]]:
    """The logged checks as the monitor's rules read them: (iteration, detections per image,
    confident detections per image, starved). Starved is judged on the writer's 20-step medians
    of the foreground shares between two checks (the monitor counts single steps): their median
    is 0."""
    out, previous = [], -1
    for check in (r for r in records if DETS_SCALAR in r):
        period = [r for r in records if previous < r["iteration"] <= check["iteration"]]
        starved = any(
            statistics.median(values) == 0
            for values in ([r[k] for r in period if k in r] for k in FOREGROUND_SHARES) if values)
        out.append((check["iteration"], check[DETS_SCALAR], check.get(confident_scalar), starved))
        previous = check["iteration"]
    return out


def rule_flags(records: List[dict], rule: dict) -> Dict[str, int]:
    """Collapses by each rule alone (the others neutralized) on a run's logged checks."""
    checks = rule_checks(records, rule["confident_scalar"])
    rule = {k: v for k, v in rule.items() if k != "confident_scalar"}
    return {"confident": count_collapses([(it, math.inf, c) for it, _, c, _ in checks], **rule),
            "no_foreground": count_collapses([(it, math.inf, None, s) for it, _, _, s in checks],
                                             **rule)}


def parse_metrics(records: List[dict], health_warmup: int, rule: Optional[dict] = None,
                  num_classes: int = 0) -> dict:
    """The final AP and the health checks of one run (see the module docstring). ``rule``
    (:func:`collapse_rule`): judge the logged checks by the monitor's rule as it is now; None:
    the collapses the monitor reported while training."""
    final = next((r for r in reversed(records) if "bbox/AP" in r), {})
    ap = {}
    for key in AP_KEYS:
        value = final.get(key)
        ap[key] = 0.0 if value is None or math.isnan(value) else float(value)
    checks = [(r["iteration"], r[DETS_SCALAR]) for r in records if DETS_SCALAR in r]
    # The monitor judges a check made at `iteration` when iteration + 1 >= its warm-up.
    judged = [d for it, d in checks if it + 1 >= health_warmup]
    logged = max((r.get(COLLAPSES_SCALAR, 0) for r in records), default=0)
    collapses = logged if rule is None else count_collapses(
        checks, **{k: v for k, v in rule.items()
                   if k in ("warmup_iters", "fraction", "patience", "objects")})
    flags = rule_flags(records, rule) if rule is not None else {}
    start = next((r[START_SCALAR] for r in records if START_SCALAR in r), None)
    shares: Dict[str, List[float]] = {}
    for r in records:
        for key, value in r.items():
            if key.startswith(GRAD_SHARE_PREFIX):
                shares.setdefault(key[len(GRAD_SHARE_PREFIX):], []).append(value)
    extra = {k: (float(final[k]) if final.get(k) is not None else None)
             for k in GROUP_KEYS + IMAGE_LEVEL_KEYS}
    if bool(final) and math.isnan(final.get("bbox/AP", 0.0)) and num_classes:
        # No predictions: the AP of every group that has classes is 0 (2 classes: no rare one).
        groups = frequency_groups([0] * num_classes)
        extra.update({f"bbox/{g}": 0.0 for g, members in groups.items() if members})
    return {
        **ap,
        **extra,
        "evaluated": bool(final),
        "no_predictions": bool(final) and math.isnan(final.get("bbox/AP", 0.0)),
        "health_checks": checks,
        "judged_checks": len(judged),
        "zero_checks": sum(d == 0 for d in judged),
        "start_dets_per_image": start,
        "lowest_dets_per_image": min(judged) if judged else None,
        "last_dets_per_image": checks[-1][1] if checks else None,
        "monitor_collapses": int(logged),  # as reported while training
        "collapsed": collapses > 0,
        # The confident and no-foreground rules, each alone (None: not judged).
        "flagged_confident": flags.get("confident", 0) > 0 if flags else None,
        "flagged_no_foreground": flags.get("no_foreground", 0) > 0 if flags else None,
        # Mean over the checks of each term's gradient share on the backbone.
        "grad_shares": {k: statistics.mean(v) for k, v in shares.items()},
    }


def _spec(cmd: List[str], threads: int) -> dict:
    # What makes a result reusable: the same resolved config (not the interpreter path, not the
    # output folder) and threads.
    return {"config": resolved_config(cmd), "threads": threads}


def _num_classes(spec: dict) -> int:
    return int(spec["config"].get("MODEL.ROI_HEADS.NUM_CLASSES", 0))


def load_result(run_dir: Path, spec: dict, schedule: Schedule) -> Optional[dict]:
    path = run_dir / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    stored = result.get("spec", {})
    if stored.get("threads") != spec["threads"] or not same_config(stored.get("config", {}),
                                                                   spec["config"]):
        return None
    return {**result, **parse_metrics(read_metrics(run_dir / "metrics.json"),
                                      schedule.health_warmup, collapse_rule(spec["config"]),
                                      _num_classes(spec))}


# Finished runs kept in git (result.json and metrics.json, gzipped, a few kB each), so that a
# study spread over sessions on fresh clones reuses them as it reuses a run folder; the
# pretraining runs are not kept (the fine-tune needs their model_final.pth).
RUNS_ARCHIVE = common.REPO / "benchmarks" / "results" / "runs"


def archive_run(archive: Optional[Path], name: str, run_dir: Path) -> None:
    if archive is None or name.startswith("pretrain_"):
        return
    archive.mkdir(parents=True, exist_ok=True)
    data = {"result": json.loads((run_dir / "result.json").read_text()),
            "metrics": read_metrics(run_dir / "metrics.json")}
    with gzip.open(archive / f"{name}.json.gz", "wt") as f:
        json.dump(data, f)


def restore_run(archive: Optional[Path], name: str, run_dir: Path) -> None:
    """Lay out an archived run's result.json and metrics.json in an empty ``run_dir``."""
    path = archive / f"{name}.json.gz" if archive else None
    if path is None or not path.is_file() or (run_dir.exists() and any(run_dir.iterdir())):
        return  # nothing archived, or a folder in use (a finished or an interrupted run)
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in data["metrics"]))
    (run_dir / "result.json").write_text(json.dumps(data["result"], indent=2) + "\n")


def finish(name: str, run_dir: Path, spec: dict, returncode: int, seconds: float,
           schedule: Schedule) -> dict:
    # train_net.py's exit codes when the health monitor stops a run (docs/reliability.md, "Exit codes").
    status = {0: "ok", EXIT_NON_FINITE: "non-finite", EXIT_COLLAPSE: "stopped: collapse"}.get(
        returncode, f"failed ({returncode})")
    metrics = run_dir / "metrics.json"
    parsed = {}
    if metrics.exists():
        parsed = parse_metrics(read_metrics(metrics), schedule.health_warmup,
                               collapse_rule(spec["config"]), _num_classes(spec))
    result = {"name": name, "status": status, "seconds": seconds, "commit": common.git_commit(),
              "spec": spec, **parsed}
    if status == "ok":  # only finished runs are reused; others run again next time
        (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    else:
        log = (run_dir / "stdout.log").read_text()[-3000:]
        print(f"  {name}: {status}; end of {run_dir / 'stdout.log'}:\n{log}", flush=True)
    return result


# -- running --


@dataclass
class _Job:
    name: str
    run_dir: Path
    cmd: List[str]
    spec: dict
    after: Optional[str] = None  # the job whose model this one starts from
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


def execute(jobs_todo: List[Tuple[str, Path, List[str], Optional[str]]], schedule: Schedule,
            jobs: int, threads: int, reuse_only: bool = False,
            archive: Optional[Path] = None) -> Dict[str, dict]:
    """
    Run (or reuse) every (name, folder, command, name of the job it must wait for or None),
    ``jobs`` at a time, in order except that a job waits for its predecessor; {name: result}.
    With ``reuse_only`` nothing is trained: the runs without a result are reported as not run.
    ``archive``: a folder of finished runs (RUNS_ARCHIVE) to reuse from and add to.
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONUNBUFFERED="1")
    results: Dict[str, dict] = {}
    todo: List[_Job] = []
    for name, run_dir, cmd, after in jobs_todo:
        spec = _spec(cmd, threads)
        restore_run(archive, name, run_dir)
        done = load_result(run_dir, spec, schedule)
        if done is not None:
            results[name] = done
        else:
            todo.append(_Job(name, run_dir, cmd, spec, after))
    # A run others start from (the fine-tune's pretraining) is not trained when every run that
    # starts from it is done already (e.g. restored from the archive).
    predecessors = {after for *_, after in jobs_todo if after}
    needed = {job.after for job in todo if job.after}
    for job in [j for j in todo if j.name in predecessors - needed]:
        todo.remove(job)
        results[job.name] = {"name": job.name, "status": "not needed", "seconds": 0.0}
    if reuse_only:
        for job in todo:
            results[job.name] = {"name": job.name, "status": "not run (--reuse-only)",
                                 "seconds": 0.0}
        print(f"{len(jobs_todo) - len(todo)} of {len(jobs_todo)} runs done; --reuse-only: "
              f"{len(todo)} not run", flush=True)
        return results
    print(f"{len(results)} of {len(jobs_todo)} runs already done; {len(todo)} to run, {jobs} at "
          f"a time, {threads} thread(s) each", flush=True)
    running: List[_Job] = []
    start, finished = time.perf_counter(), 0

    def ready(job: _Job) -> bool:
        return job.after is None or results.get(job.after, {}).get("status") == "ok"

    try:
        while todo or running:
            for job in [j for j in todo if j.after and results.get(j.after, {}).get("status",
                                                                                      "ok") != "ok"]:
                todo.remove(job)  # what it starts from failed
                results[job.name] = {"name": job.name, "status": f"skipped: {job.after} failed",
                                     "seconds": 0.0}
            while len(running) < jobs and any(ready(j) for j in todo):
                job = next(j for j in todo if ready(j))
                todo.remove(job)
                running.append(job)
                job.start(env)
            if not running:
                break  # left: jobs waiting for ones that cannot finish
            time.sleep(0.2)
            for job in [j for j in running if j.proc.poll() is not None]:
                job.log.close()
                running.remove(job)
                result = finish(job.name, job.run_dir, job.spec, job.proc.returncode,
                                time.perf_counter() - job.began, schedule)
                results[job.name] = result
                if result["status"] == "ok":
                    archive_run(archive, job.name, job.run_dir)
                finished += 1
                elapsed = time.perf_counter() - start
                left = len(todo) + len(running)
                print(f"  [{finished}/{finished + left}] {job.name}: {result['status']}, "
                      f"{result['seconds'] / 60:.1f} min; elapsed {elapsed / 60:.1f} min, about "
                      f"{elapsed / finished * left / 60:.0f} min to go", flush=True)
    finally:
        # Interrupted (Ctrl-C, SIGTERM): no training process outlives this one.
        for job in running:
            job.proc.terminate()
            job.proc.wait()
            job.log.close()
    return results


def execute_study(study: Study, runs: List[Run], jobs: int, threads: int,
                  reuse_only: bool = False) -> Dict[str, dict]:
    """The pretraining runs the fine-tune settings need first, then the runs (those that start
    from a pretraining run wait for it; the others go on meanwhile). Returns the runs' results."""
    needed = sorted({study.settings[r.setting].pretrain for r in runs} - {None})
    todo = [(study.pretrains[k].name, pretrain_dir(study, k), pretrain_command(study, k), None)
            for k in needed]
    for r in runs:
        key = study.settings[r.setting].pretrain
        todo.append((r.name, study.output / r.name, run_command(study, r, study.output / r.name),
                     study.pretrains[key].name if key else None))
    # The runs without a predecessor first, so that no core waits while a pretraining runs.
    todo.sort(key=lambda job: job[3] is not None)
    results = execute(todo, study.schedule, jobs, threads, reuse_only, study.archive)
    for key in needed:
        pre = results.pop(study.pretrains[key].name)
        if pre["status"] not in ("ok", "not needed") and not reuse_only:
            print(f"pretraining {pre['name']} failed: the runs that start from it were skipped",
                  file=sys.stderr)
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


def _finite(results: List[dict], key: str) -> List[float]:
    return [r[key] for r in results if r.get(key) is not None and math.isfinite(r[key])]


def _dets(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _lowest(results: List[dict]) -> str:
    values = [r["lowest_dets_per_image"] for r in results
              if r.get("lowest_dets_per_image") is not None]
    return f"{min(values):.2f}" if values else "-"


def _start(results: List[dict]) -> str:
    values = [r["start_dets_per_image"] for r in results
              if r.get("start_dets_per_image") is not None]
    return f"{statistics.mean(values):.2f}" if values else "-"


def _group_row(label: List[str], group: List[dict]) -> List[str]:
    ok = [r for r in group if r["status"] == "ok"]
    not_run = sum(1 for r in group if r["status"].startswith("not run"))
    failed = len(group) - len(ok) - not_run
    cells = [_mean_std([r[k] for r in ok]) for k in AP_KEYS]
    cells += [_mean_std(_finite(ok, k)) for k in ("bbox/APr", "image_level/false_alarm_images",
                                                   "image_level/recall50")]
    collapsed = sum(1 for r in ok if r["collapsed"])
    runs = (f"{len(ok)}" + (f" (+{failed} failed)" if failed else "")
            + (f" (+{not_run} not run)" if not_run else ""))
    last = " / ".join(_dets(r.get("last_dets_per_image")) for r in ok) or "-"
    zeros = f"{sum(r['zero_checks'] for r in ok)}/{sum(r['judged_checks'] for r in ok)}"
    return [*label, runs, *cells, _start(ok), _lowest(ok), last, zeros,
            f"{collapsed}/{len(ok)}", _flag_count(ok, "flagged_confident"),
            _flag_count(ok, "flagged_no_foreground")]


def _flag_count(results: List[dict], key: str) -> str:
    judged = [r[key] for r in results if r.get(key) is not None]
    return f"{sum(judged)}/{len(judged)}" if judged else "-"


def _by_seed(runs: List[Run], results: Dict[str, dict], setting: str) -> Dict[int, Dict[str, dict]]:
    """{seed: {arm: result}} of the finished runs of one setting."""
    out: Dict[int, Dict[str, dict]] = {}
    for r in runs:
        if r.setting == setting and results[r.name]["status"] == "ok":
            out.setdefault(r.seed, {})[r.arm] = results[r.name]
    return out


def _paired(by_seed: Dict[int, Dict[str, dict]], arm: str, reference: str,
            key: str = "bbox/AP") -> List[float]:
    pairs = [_finite([p[arm], p[reference]], key) for _, p in sorted(by_seed.items())
             if arm in p and reference in p]
    return [a - b for a, b in (pair for pair in pairs if len(pair) == 2)]


def _diff_cell(diffs: List[float]) -> str:
    if not diffs:
        return "-"
    per_seed = ", ".join(f"{d:+.1f}" for d in diffs)
    return f"{_mean_std(diffs)} ({per_seed})"


def render(study: Study, runs: List[Run], results: Dict[str, dict], threads: int,
           jobs: int, versus: Optional[str] = None) -> Tuple[str, List[str]]:
    """The tables and their notes; ``versus``: an arm every other arm is also paired against
    (bbox AP and APr), as in a sweep against the shipped value."""
    schedule = study.schedule
    metric_headers = ["bbox AP", "bbox AP50", "segm AP", "segm AP50", "bbox APr",
                      "false-alarm images", "recall50", "dets/img before",
                      "lowest dets/img", "last dets/img", "checks at 0", "collapsed",
                      "confident rule", "no-foreground rule"]
    settings = list(dict.fromkeys(r.setting for r in runs))
    arms = list(dict.fromkeys(r.arm for r in runs))
    rows, diff_rows, share_rows = [], [], []
    for setting in settings:
        by_seed = _by_seed(runs, results, setting)
        for arm in arms:
            group = [results[r.name] for r in runs if (r.setting, r.arm) == (setting, arm)]
            rows.append(_group_row([setting, study.arms[arm].label], group))
            ok = [g for g in group if g["status"] == "ok" and g.get("grad_shares")]
            if ok:
                share_rows.append([setting, study.arms[arm].label] + [
                    f"{statistics.mean(g['grad_shares'].get(n, 0.0) for g in ok):.2f}"
                    for n in LOSS_NAMES])
        # The better baseline of this setting: the one with the higher mean bbox AP.
        means = {b: statistics.mean(p[b]["bbox/AP"] for p in by_seed.values() if b in p)
                 for b in BASELINES if any(b in p for p in by_seed.values())}
        best = max(means, key=means.get) if means else None
        for arm in arms:
            if arm == "stock":
                continue
            versus_best = best and best != arm
            diff_rows.append([setting, study.arms[arm].label,
                              _diff_cell(_paired(by_seed, arm, "stock")),
                              study.arms[best].label if best else "-",
                              _diff_cell(_paired(by_seed, arm, best)) if versus_best else "-",
                              _diff_cell(_paired(by_seed, arm, best, "bbox/APr"))
                              if versus_best else "-"] + ([
                                  _diff_cell(_paired(by_seed, arm, versus, key))
                                  if arm != versus else "-" for key in ("bbox/AP", "bbox/APr")]
                                  if versus else []))
    body = common.markdown_table(["setting", "arm", "runs", *metric_headers], rows)
    if diff_rows:
        body += ("\n\nbbox AP differences paired by seed (mean ± std, then each seed):\n\n"
                 + common.markdown_table(["setting", "arm", "minus stock", "better baseline",
                                          "minus the better baseline",
                                          "bbox APr minus the better baseline"] + (
                                              [f"minus {study.arms[versus].label}",
                                               f"bbox APr minus {study.arms[versus].label}"]
                                              if versus else []), diff_rows))
    if share_rows:
        body += ("\n\nGradient share of each loss term on the backbone + FPN (mean over the "
                 "checks and seeds; health/grad_shares.py):\n\n"
                 + common.markdown_table(["setting", "arm", *LOSS_NAMES], share_rows))
    minutes = sum(r["seconds"] for r in results.values()) / 60
    commits = sorted({r.get("commit", "unknown") for r in results.values()})
    notes = [
        "Arms: " + "; ".join(f"**{study.arms[a].label}**: {study.arms[a].about}" for a in arms)
        + " (quality_arms.py).",
        f"AP: mean ± sample std over seeds (COCO, percent; a run with no predictions counts 0). "
        f"dets/img before: detections per image at the health monitor's main threshold (score "
        f"0.05) before training, mean over seeds; lowest dets/img: the lowest over the checks "
        f"after iteration {schedule.health_warmup} (every {schedule.health_period} iterations on "
        f"the first {schedule.health_images} val images) and over the seeds; last dets/img: at "
        f"the last check, per seed; checks at 0: checks after the warm-up that found no "
        f"detection, all seeds together; collapsed: runs with a collapse by the health monitor's "
        f"rule (HEALTH.PATIENCE 3 consecutive checks at 0 or below 5% of the best earlier check, "
        f"capped at the objects per check image), applied to the logged checks; confident rule: "
        f"runs the monitor's confident rule alone flags (health/collapse.py: from half the "
        f"schedule on, 3 consecutive checks with detections at score >= 0.5 below 0.1 x the "
        f"objects per check image); no-foreground rule: runs flagged by that rule alone (3 "
        f"consecutive checks after whose period the logged median foreground share of the "
        f"sampled anchors or ROIs is 0); bbox APr: the "
        f"bbox AP of the rarest third of the classes by training images (evaluation/"
        f"frequency_groups.py; 2-class settings have no rare class); false-alarm images: "
        f"images without objects with a detection at score >= 0.5, recall50: objects found at "
        f"IoU 0.5 by a detection of their class at score >= 0.5, both in percent over all val "
        f"images (evaluation/image_level.py); the per-run table "
        f"also gives what the monitor reported while training, where it differs. The check images "
        f"hold " + ", ".join(
            f"{objects_per_check_image(study.settings[s], schedule):.2f} ({s})" for s in settings
        ) + " ground-truth objects per image.",
        f"Schedule: {schedule.iters} iterations, batch {schedule.batch}, AdamW lr 8e-4 with "
        f"{schedule.warmup} warm-up iterations and cosine decay (the CPU demo configs); "
        f"{jobs} run(s) at a time, {threads} thread(s) each; the runs took {minutes:.0f} "
        f"minutes together (sum of their durations); trained at commit(s) {', '.join(commits)}.",
    ]
    return body, notes


def _collapsed(result: dict) -> str:
    verdict = "yes" if result.get("collapsed") else "no"
    logged = result.get("monitor_collapses")
    if logged is not None and (logged > 0) != bool(result.get("collapsed")):
        verdict += f" (reported while training: {'yes' if logged else 'no'})"
    return verdict


def _flag(value: Optional[bool]) -> str:
    return "-" if value is None else ("yes" if value else "no")


def per_run_table(results: Dict[str, dict]) -> str:
    rows = [[name, r["status"], *(f"{r.get(k, 0):.1f}" for k in AP_KEYS),
             *(_mean_std(_finite([r], k)) for k in ("bbox/APr", "image_level/false_alarm_images",
                                                    "image_level/recall50")),
             _dets(r.get("start_dets_per_image")), _dets(r.get("lowest_dets_per_image")),
             _dets(r.get("last_dets_per_image")),
             f"{r.get('zero_checks', 0)}/{r.get('judged_checks', 0)}",
             _collapsed(r), _flag(r.get("flagged_confident")),
             _flag(r.get("flagged_no_foreground")), f"{r['seconds'] / 60:.1f}"]
            for name, r in results.items()]
    return common.markdown_table(
        ["run", "status", *AP_KEYS, "bbox/APr", "false-alarm images", "recall50",
         "dets/img before", "lowest dets/img", "last dets/img",
         "checks at 0", "collapsed", "confident rule", "no-foreground rule", "minutes"],
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
    checks = schedule.iters // schedule.health_period + 1
    val_images = BUILTIN_SYNTHETIC[setting.test].num_images
    return (checks * schedule.health_images + val_images) * INFERENCE_S_PER_IMAGE


def probe(study: Study, iters: int, planned_runs: int,
          modes: Sequence[Tuple[int, int]] = ((1, 2), (2, 1))) -> Dict[str, dict]:
    """
    Two short training runs (mild and severe; no evaluation, no checks) in each of ``modes``
    ((jobs, threads per job); default: one after the other with 2 threads each, then both at
    once with 1 thread each). Prints s/iteration and, for both modes, the estimated duration
    of the planned runs: each probe run plus its remaining iterations plus the checks' and
    evaluation's inference (INFERENCE_S_PER_IMAGE).
    """
    print(f"1-min load average before the probe: {os.getloadavg()[0]:.2f} (another process on "
          "the CPUs distorts both modes, the 2-thread one most)", flush=True)
    short = replace(study.schedule, iters=iters)
    runs = [Run("mild", "design_defaults", 0), Run("severe", "stock", 0)]
    no_eval = ["DATASETS.TEST", "()", "HEALTH.PERIOD", "0"]
    report = {}
    for jobs, threads in modes:
        mode = f"{jobs} job(s) x {threads} thread(s)"
        folder = study.output / f"probe_j{jobs}_t{threads}"
        shutil.rmtree(folder, ignore_errors=True)  # always measured anew
        probe_study = replace(study, schedule=short, output=folder)
        todo = [(r.name, folder / r.name,
                 run_command(probe_study, r, folder / r.name) + no_eval, None) for r in runs]
        start = time.perf_counter()
        results = execute(todo, short, jobs, threads)
        wall = time.perf_counter() - start
        if any(r["status"] != "ok" for r in results.values()):
            raise RuntimeError(f"probe runs failed ({mode}); see {folder}/*/stdout.log")
        per_iter = [_seconds_per_iter(folder / r.name) for r in runs]
        full = [results[r.name]["seconds"] + (study.schedule.iters - iters) * p
                + _eval_allowance(study.settings[r.setting], study.schedule)
                for r, p in zip(runs, per_iter)]
        # jobs at a time; runs of the two settings take about as long.
        estimate = math.ceil(planned_runs / jobs) * statistics.mean(full)
        report[mode] = {"wall_s": wall, "s_per_iter": per_iter, "run_s": full,
                        "estimate_s": estimate}
        print(f"{mode}: 2 runs of {iters} iterations in {wall:.0f} s; s/iteration "
              f"{', '.join(f'{p:.3f}' for p in per_iter)} (mild, severe); a full run of "
              f"{study.schedule.iters} iterations ~{statistics.mean(full) / 60:.1f} min; "
              f"{planned_runs} runs ~{estimate / 60:.0f} min", flush=True)
    best = min(report, key=lambda m: report[m]["estimate_s"])
    print(f"faster: {best}; 1-min load average now: {os.getloadavg()[0]:.2f}")
    return report


# -- command line --


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help=f"{TINY_SCHEDULE.iters} iterations on the tiny datasets, 1 seed")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS),
                        help=f"default: {' '.join(FINAL_ARMS)} (the final table)")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 2 3 4 (--tiny: 0)")
    parser.add_argument("--ab-balanced", nargs="+", type=parse_weight_pair, default=[],
                        metavar="POS:BBOX",
                        help="more arms: the design's normalization with POS_WEIGHT and "
                        "LOSS_BBOX_WEIGHT of both heads, e.g. 1:1 or 3:0.25")
    parser.add_argument("--versus", choices=list(ARMS), metavar="ARM",
                        help="also pair every arm against this one (one of --arms), e.g. the "
                        "shipped value in a sweep")
    parser.add_argument("--iters", type=int, help=f"default {SCHEDULE.iters}")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--threads-per-job", type=int, default=1, help="default 1")
    parser.add_argument("--output-dir", type=Path,
                        help="run folders (default output/quality_ab, --tiny: ..._tiny)")
    parser.add_argument("--name", default=NAME,
                        help=f"name of the results files and BENCHMARKS.md section ({NAME})")
    common.add_output_arguments(parser, NAME)
    parser.add_argument("--list", action="store_true", help="print settings and arms, then stop")
    parser.add_argument("--probe", action="store_true",
                        help="only time 2 short runs both ways and estimate the plan")
    parser.add_argument("--probe-iters", type=int, default=50)
    parser.add_argument("--probe-modes", nargs="+", default=["1x2", "2x1"],
                        help="JOBSxTHREADS pairs the probe compares (default: 1x2 2x1)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--reuse-only", action="store_true",
                        help="train nothing: tabulate the finished runs, list the others as not run")
    return parser.parse_args(argv)


def _list(study: Study) -> None:
    for name, s in study.settings.items():
        extra = " ".join(f"{k} {v}" for k, v in s.overrides)
        print(f"setting {name}: train {s.train}, test {s.test}, {s.image_side} px, "
              f"{s.num_classes} classes" + (f", from {s.pretrain}" if s.pretrain else "")
              + (f", {extra}" if extra else ""))
    for name, arm in study.arms.items():
        print(f"arm {name} ({arm.heads} heads): {arm.label}: {arm.about}")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    arms = dict(ARMS)
    names = list(args.arms or FINAL_ARMS)
    for pos, bbox in args.ab_balanced:
        name, arm = quality_arms.weight_pair_arm(pos, bbox)
        arms[name] = arm
        names.append(name)
    names = list(dict.fromkeys(names))
    if args.versus and args.versus not in names:
        raise SystemExit(f"--versus {args.versus}: not one of --arms ({' '.join(names)})")
    schedule = TINY_SCHEDULE if args.tiny else SCHEDULE
    if args.iters:
        schedule = replace(schedule, iters=args.iters)
    output = (args.output_dir or common.REPO / "output" / (NAME + ("_tiny" if args.tiny else "")))
    study = Study(
        settings=TINY_SETTINGS if args.tiny else SETTINGS,
        arms=arms,
        pretrains=quality_arms.TINY_PRETRAINS if args.tiny else PRETRAINS,
        schedule=schedule,
        output=output.resolve(),
        # The study's own runs only: tiny runs, other schedules and probes are not kept.
        archive=None if args.tiny or args.iters or args.output_dir else RUNS_ARCHIVE,
    )
    seeds = args.seeds or ([0] if args.tiny else [0, 1, 2, 3, 4])
    runs = plan_runs(args.settings, names, seeds)

    if args.list:
        _list(study)
        return {}
    if args.probe:
        modes = [tuple(int(x) for x in m.split("x")) for m in args.probe_modes]
        return probe(study, args.probe_iters, len(runs), modes)
    if args.dry_run:
        for run in runs:
            print(shlex.join(run_command(study, run, study.output / run.name)))
        return {}

    results = execute_study(study, runs, args.jobs, args.threads_per_job, args.reuse_only)
    body, notes = render(study, runs, results, args.threads_per_job, args.jobs, args.versus)
    details = f"<details><summary>Every run</summary>\n\n{per_run_table(results)}\n\n</details>"
    print("\n" + body + "\n\n" + "\n".join(f"- {n}" for n in notes))
    data = {"tiny": args.tiny, "schedule": asdict(schedule),
            "settings": {k: asdict(study.settings[k]) for k in args.settings},
            "arms": {k: asdict(arms[k]) for k in names},
            "jobs": args.jobs, "threads_per_job": args.threads_per_job,
            "runs": results}
    common.publish(args, args.name + ("_tiny" if args.tiny else ""),
                   f"Quality A/B on synthetic shapes (quality_ab.py, {args.name})",
                   body + "\n\n" + details, data, __file__, argv, notes, tiny=args.tiny)
    failed = [n for n, r in results.items()
              if r["status"] != "ok" and not r["status"].startswith("not run")]
    if failed:
        print(f"{len(failed)} run(s) did not finish: {', '.join(failed)}", file=sys.stderr)
    return results


if __name__ == "__main__":
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the running trainings are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    main()
