"""The benchmark scripts in their tiny modes (they must keep working), and their shared helpers:
result parsing, BENCHMARKS.md sections, counting host synchronizations."""

import importlib.util
import json
import math
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import harness_cfg

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    """One folder for the synthetic datasets of every test here (the tiny ones: < 1 s)."""
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture
def one_thread(monkeypatch, datasets_root):
    """One torch thread (restored after), small datasets in a temporary folder."""
    monkeypatch.setenv("BALANCED_RCNN_DATASETS", str(datasets_root))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# -- helpers (no training) --


def test_parse_metrics_counts_zero_checks_after_warmup():
    quality_ab = _load("quality_ab")
    records = [
        {"iteration": 49, "health/dets_per_image": 0.0, "health/num_collapses": 0},  # warm-up
        {"iteration": 99, "health/dets_per_image": 3.5, "health/num_collapses": 0},
        {"iteration": 149, "health/dets_per_image": 0.0, "health/num_collapses": 0},
        {"iteration": 199, "health/dets_per_image": 1.0, "health/num_collapses": 0},
        {"iteration": 200, "bbox/AP": float("nan"), "bbox/AP50": float("nan"),
         "segm/AP": float("nan"), "segm/AP50": float("nan")},
    ]
    parsed = quality_ab.parse_metrics(records, health_warmup=100)
    assert parsed["lowest_dets_per_image"] == 0.0 and parsed["last_dets_per_image"] == 1.0
    assert (parsed["zero_checks"], parsed["judged_checks"]) == (1, 3)
    # One check at 0 is not a collapse: only the monitor's verdict (PATIENCE checks) is.
    assert not parsed["collapsed"]
    assert parsed["no_predictions"] and parsed["bbox/AP"] == 0.0  # NaN = no predictions = 0
    assert len(parsed["health_checks"]) == 4


def test_parse_metrics_ignores_warmup_zero_and_reads_monitor_collapses():
    quality_ab = _load("quality_ab")
    records = [
        {"iteration": 49, "health/dets_per_image": 0.0},
        {"iteration": 99, "health/dets_per_image": 2.0},
        {"iteration": 100, "bbox/AP": 12.5, "bbox/AP50": 30.0, "segm/AP": 11.0,
         "segm/AP50": 28.0},
    ]
    parsed = quality_ab.parse_metrics(records, health_warmup=100)
    assert not parsed["collapsed"] and parsed["lowest_dets_per_image"] == 2.0
    assert parsed["bbox/AP"] == 12.5 and not parsed["no_predictions"]
    records[1]["health/num_collapses"] = 1
    assert quality_ab.parse_metrics(records, health_warmup=100)["collapsed"]


def test_quality_ab_refuses_a_weight_without_its_pair(capsys):
    with pytest.raises(SystemExit):
        _load("quality_ab").parse_args(["--ab-balanced", "3"])
    assert "--ab-balanced '3': expected POS:BBOX, two numbers, e.g. 1:1 or 3:0.25" in (
        capsys.readouterr().err
    )


def test_update_benchmarks_md_replaces_only_its_section(tmp_path):
    common = _load("common")
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# B\n<!-- begin:a -->\nold a\n<!-- end:a -->\ntail\n")
    common.update_benchmarks_md("a", "new a", path)
    common.update_benchmarks_md("b", "new b", path)
    text = path.read_text()
    assert "old a" not in text and "new a" in text and text.count("new a") == 1
    assert text.index("new a") < text.index("tail") < text.index("new b")


def test_git_commit_is_dirty_for_code_changes_only(tmp_path, monkeypatch):
    common = _load("common")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    files = ["BENCHMARKS.md", "benchmarks/results/a.md", "train.py"]
    for name in files:
        (tmp_path / name).write_text("v1\n")

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("add", *files)
    git("commit", "-qm", "v1")
    monkeypatch.setattr(common, "REPO", tmp_path)
    monkeypatch.setattr(common, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    clean = common.git_commit()
    assert len(clean) == 12 and "+" not in clean
    (tmp_path / "BENCHMARKS.md").write_text("v2\n")  # what the scripts themselves write
    (tmp_path / "benchmarks/results/a.md").write_text("v2\n")
    assert common.git_commit() == clean
    (tmp_path / "train.py").write_text("v2\n")
    assert common.git_commit() == clean + "+dirty"


def test_count_python_syncs_counts_and_restores():
    common = _load("common")
    x = torch.tensor([1.0, 0.0])
    original = torch.Tensor.item
    with common.count_python_syncs() as counts:
        x.sum().item()
        x.tolist()
        torch.nonzero(x)
    assert counts["item"] == 1 and counts["tolist"] == 1 and counts["torch.nonzero"] == 1
    assert torch.Tensor.item is original


# -- tiny modes --


def test_bench_step_tiny(one_thread, tmp_path, capsys):
    results = _load("bench_step").main(
        ["--tiny", "--threads", "1", "--device", "cpu", "--results-dir", str(tmp_path)]
    )
    assert [r["config"] for r in results] == ["tiny", "swin-t"]
    for r in results:
        for kind in ("train_step", "inference"):
            assert r[kind]["stock"]["median"] > 0 and r[kind]["balanced"]["median"] > 0
        assert r["inference_equal"] and r["detections_compared"] > 0
        syncs = r["loss_path_syncs"]
        # The counter sees stock detectron2's float() logging; the balanced heads never wait.
        assert sum(sum(c.values()) for c in syncs["stock"].values()) > 0
        assert sum(sum(c.values()) for c in syncs["balanced"].values()) == 0
    out = capsys.readouterr().out
    assert "| config | pass | stock ms | balanced ms | balanced/stock |" in out
    assert "without host synchronization: yes" in out
    data = json.loads((tmp_path / "bench_step.json").read_text())
    assert data["commit"] and data["machine"]["cpu_count"] and data["threads"] == 1
    assert "Command: `python benchmarks/bench_step.py --tiny" in (
        tmp_path / "bench_step.md"
    ).read_text()


def test_bench_losses_writes_markdown_and_json(one_thread, tmp_path):
    _load("bench_losses").main(["--tiny", "--repeats", "1", "--results-dir", str(tmp_path)])
    text = (tmp_path / "bench_losses.md").read_text()
    assert "| head | pass | stock ms | balanced ms | balanced/stock |" in text
    rows = json.loads((tmp_path / "bench_losses.json").read_text())["results_ms"]
    assert {(r["head"], r["pass"]) for r in rows} >= {("all", "fwd+bwd"), ("rpn", "forward")}


def test_bench_image_check_tiny(tmp_path):
    result = _load("bench_image_check").main(["--tiny", "--results-dir", str(tmp_path)])
    assert result["files"] == 4 and result["header_check_us"] > 0 and result["read_image_ms"] > 0
    assert "| 4 | 48x32 JPEG |" in (tmp_path / "bench_image_check.md").read_text()


def test_loss_margin_tiny_measures_every_step(one_thread, tmp_path):
    results = _load("loss_margin").main(["--tiny", "--runs", "sparse/stock/0",
                                         "--results-dir", str(tmp_path)])
    [r] = results
    assert r["steps"] == 6  # the tiny schedule's iterations, one value each
    # An untrained model's first step holds the run's largest total, far below the limits.
    assert 1.0 < r["first_total"] < 10.0 and r["ceiling_margin"] > 100
    assert r["jump_margin"] > 10
    assert "| sparse/stock/0 | 6 |" in (tmp_path / "loss_margin.md").read_text()


def test_quality_ab_tiny_runs_tabulates_and_resumes(one_thread, datasets_root, tmp_path, capsys):
    quality_ab = _load("quality_ab")
    argv = ["--tiny", "--settings", "severe", "many", "finetune",
            "--arms", "samples_cshare", "--ab-balanced", "3:0.25",
            "--output-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
    results = quality_ab.main(argv)
    assert set(results) == {f"{s}_{a}_s0" for s in ("severe", "many", "finetune")
                            for a in ("samples_cshare", "balanced_w3_b0.25")}
    for r in results.values():
        assert r["status"] == "ok" and r["evaluated"], r
        assert r["health_checks"] and r["lowest_dets_per_image"] is not None
        assert r["start_dets_per_image"] is not None  # HEALTH.CHECK_AT_START
        assert all(not math.isnan(r[k]) for k in quality_ab.AP_KEYS)
        assert all(r[k] is not None for k in quality_ab.IMAGE_LEVEL_KEYS + ("bbox/APf",))
        assert set(r["grad_shares"]) == set(quality_ab.LOSS_NAMES)
        assert sum(r["grad_shares"].values()) == pytest.approx(1.0, abs=1e-3)

    def config(run):
        return (tmp_path / "runs" / run / "config.yaml").read_text()

    # Every balanced arm sets every key it depends on, whatever the config file says.
    assert "ROI_CLS_POS_WEIGHT: 3.0" in config("severe_balanced_w3_b0.25_s0")
    assert "RPN_LOSS_BBOX_WEIGHT: 0.25" in config("severe_balanced_w3_b0.25_s0")
    assert "REG_NORMALIZER: positives" in config("severe_balanced_w3_b0.25_s0")
    cshare = config("many_samples_cshare_s0")
    assert "SAMPLER_TRAIN: ClassAwareObjectShareTrainingSampler" in cshare
    assert "REPEAT_THRESHOLD: 1.0" in cshare and "OBJECT_IMAGE_SHARE: 0.5" in cshare
    assert "REG_NORMALIZER: samples" in cshare and "ROI_LOSS_BBOX_WEIGHT: 1.0" in cshare
    assert "FILTER_EMPTY_ANNOTATIONS: false" in config("severe_samples_cshare_s0")
    assert "NUM_CLASSES: 20" in cshare
    # The fine-tune starts from the pretraining run, trained once, with 2 new classes.
    pretrain = tmp_path / "runs" / "pretrain_mild_stock_4it_s0" / "model_final.pth"
    assert pretrain.is_file()
    finetune = config("finetune_samples_cshare_s0")
    assert f"WEIGHTS: {pretrain}" in finetune and "NUM_CLASSES: 2" in finetune
    text = (tmp_path / "results" / "quality_ab_tiny.md").read_text()
    assert "| severe | samples + class-aware share 0.5 | 1 |" in text
    assert "| finetune | samples + class-aware share 0.5 | 1 |" in text
    assert "| many | balanced POS 3, BBOX 0.25 | 1 |" in text
    assert "bbox AP differences paired by seed" in text
    assert "| setting | arm | loss_rpn_cls | loss_rpn_loc | loss_cls | loss_box_reg | loss_mask |" in (
        text)
    # The tiny val set's first 4 images (the check images) hold these objects.
    val = json.loads((datasets_root / "synthetic_shapes_tiny_val" / "annotations.json").read_text())
    first = sorted(image["id"] for image in val["images"])[:4]
    objects = sum(a["image_id"] in first for a in val["annotations"]) / 4
    assert f"The check images hold {objects:.2f} (severe)" in text
    capsys.readouterr()

    again = quality_ab.main(argv)  # every result is reused: no training
    out = capsys.readouterr().out
    assert "7 of 7 runs already done; 0 to run" in out  # 6 runs and the pretraining
    assert {k: v["bbox/AP"] for k, v in again.items()} == {
        k: v["bbox/AP"] for k, v in results.items()
    }
    # --reuse-only trains nothing: seed 1 was never run.
    partial = quality_ab.main(argv + ["--seeds", "0", "1", "--reuse-only"])
    out = capsys.readouterr().out
    assert "7 of 13 runs done; --reuse-only: 6 not run" in out
    assert partial["severe_samples_cshare_s1"]["status"] == "not run (--reuse-only)"
    assert partial["severe_samples_cshare_s0"]["bbox/AP"] == \
        results["severe_samples_cshare_s0"]["bbox/AP"]
    assert not (tmp_path / "runs" / "severe_samples_cshare_s1").exists()
    # --versus pairs every arm against the one named, by seed (read anew from each run's
    # metrics.json: two of them given known final APs).
    def set_final_ap(run, ap):
        path = tmp_path / "runs" / run / "metrics.json"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        final = next(r for r in reversed(records) if "bbox/AP" in r)
        final["bbox/AP"] = ap
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        results[run]["bbox/AP"] = ap

    set_final_ap("severe_samples_cshare_s0", 10.0)
    set_final_ap("severe_balanced_w3_b0.25_s0", 17.5)
    quality_ab.main(argv + ["--reuse-only", "--versus", "samples_cshare"])
    text = (tmp_path / "results" / "quality_ab_tiny.md").read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "minus the better baseline" in line)
    header, table = lines[start], lines[start:lines.index("", start)]
    assert header.endswith("| minus samples + class-aware share 0.5 | bbox APr minus samples + "
                           "class-aware share 0.5 |")
    column = header.split(" | ").index("minus samples + class-aware share 0.5")
    for setting in ("severe", "many", "finetune"):
        row = next(line for line in table
                   if line.startswith(f"| {setting} | balanced POS 3, BBOX 0.25 |"))
        diff = (results[f"{setting}_balanced_w3_b0.25_s0"]["bbox/AP"]
                - results[f"{setting}_samples_cshare_s0"]["bbox/AP"])
        assert row.split(" | ")[column].endswith(f"({diff:+.1f})"), row
    assert (results["severe_balanced_w3_b0.25_s0"]["bbox/AP"]
            - results["severe_samples_cshare_s0"]["bbox/AP"]) == 7.5  # the loop read "(+7.5)"
    assert next(line for line in table if line.startswith("| severe | samples + class-aware")
                ).split(" | ")[column] == "-"
    with pytest.raises(SystemExit, match=r"--versus stock: not one of --arms "
                                         r"\(samples_cshare balanced_w3_b0.25\)"):
        quality_ab.main(argv + ["--reuse-only", "--versus", "stock"])


def test_every_balanced_arm_sets_every_balanced_loss_key_and_copy_paste(tmp_path, capsys):
    """Whatever a config file's MODEL.BALANCED_LOSS and copy-paste say, no arm inherits them:
    each balanced arm's command sets every one (read from the commands quality_ab.py would
    run)."""
    quality_ab = _load("quality_ab")
    arms = [name for name, arm in quality_ab.ARMS.items() if arm.heads == "balanced"]
    quality_ab.main(["--tiny", "--settings", "severe", "--arms", *arms, "--dry-run",
                     "--output-dir", str(tmp_path)])
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()
                if "train_net.py" in line]
    assert len(commands) == len(arms)
    # Every loss option; not EPS (a division guard) or SYNC_NORMALIZERS (a multi-GPU option).
    keys = {f"MODEL.BALANCED_LOSS.{k}" for k in harness_cfg().MODEL.BALANCED_LOSS} - {
        "MODEL.BALANCED_LOSS.EPS", "MODEL.BALANCED_LOSS.SYNC_NORMALIZERS"}

    def options(command):  # train_net.py --config-file FILE KEY VALUE ...
        start = command.index("--config-file") + 2
        return dict(zip(command[start::2], command[start + 1::2]))

    for command in commands:
        assert keys <= set(options(command)), command
    opts = options(commands[arms.index("samples_adaptive")])
    assert opts["MODEL.BALANCED_LOSS.ADAPTIVE_POS_WEIGHT"] == "True"
    assert opts["MODEL.BALANCED_LOSS.REG_NORMALIZER"] == "samples"
    # Nor copy-paste, which the shipped configs turn on: only the arms named for it paste.
    pasting = {arm for arm, command in zip(arms, commands)
               if options(command)["INPUT.COPY_PASTE.PROBABILITY"] != "0.0"}
    assert pasting == {"samples_share_paste", "samples_cshare_paste", "samples_cshare_paste_0.1",
                       "samples_cshare_paste_0.25", "samples_cshare_paste_0.75"}
    # The sweep's shipped-rule arms differ from the shipped rule in OBJECT_IMAGE_SHARE alone.
    shipped = options(commands[arms.index("samples_cshare_paste")])
    swept = options(commands[arms.index("samples_cshare_paste_0.75")])
    assert {k for k in shipped if shipped[k] != swept[k]} == {"DATALOADER.OBJECT_IMAGE_SHARE",
                                                              "OUTPUT_DIR"}
    assert (shipped["DATALOADER.OBJECT_IMAGE_SHARE"], swept["DATALOADER.OBJECT_IMAGE_SHARE"]) == \
        ("0.5", "0.75")


def test_quality_ab_reuse_needs_the_same_resolved_config():
    quality_ab = _load("quality_ab")
    stored = {"HEALTH.PERIOD": 50, "SOLVER.MAX_ITER": 800}
    assert quality_ab.same_config(stored, {**stored, "HEALTH.NEW_KEY": True})  # a key added
    assert not quality_ab.same_config(stored, {**stored, "SOLVER.MAX_ITER": 900})
    assert not quality_ab.same_config(stored, {"SOLVER.MAX_ITER": 800})  # a key removed
    # Keys nothing reads: the balanced heads' options with stock heads, a sampler's options with
    # another sampler.
    stock = {"MODEL.PROPOSAL_GENERATOR.NAME": "RPN", "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
             "MODEL.ROI_MASK_HEAD.NAME": "MaskRCNNConvUpsampleHead",
             "DATALOADER.SAMPLER_TRAIN": "TrainingSampler", "DATALOADER.OBJECT_IMAGE_SHARE": 0.5,
             "MODEL.BALANCED_LOSS.REG_NORMALIZER": "positives", "SOLVER.MAX_ITER": 800}
    changed = {**stock, "MODEL.BALANCED_LOSS.REG_NORMALIZER": "samples",
               "DATALOADER.OBJECT_IMAGE_SHARE": 0.7}
    assert quality_ab.same_config(stock, changed)
    balanced = {**stock, "MODEL.PROPOSAL_GENERATOR.NAME": "BalancedRPN"}
    assert not quality_ab.same_config(balanced, {**changed, "MODEL.PROPOSAL_GENERATOR.NAME":
                                                 "BalancedRPN"})
    share = {**stock, "DATALOADER.SAMPLER_TRAIN": "ObjectShareTrainingSampler"}
    assert not quality_ab.same_config(share, {**share, "DATALOADER.OBJECT_IMAGE_SHARE": 0.7})
    # The class-aware share reads both the share and RFS's threshold.
    cshare = {**stock, "DATALOADER.SAMPLER_TRAIN": "ClassAwareObjectShareTrainingSampler",
              "DATALOADER.REPEAT_THRESHOLD": 1.0}
    assert not quality_ab.same_config(cshare, {**cshare, "DATALOADER.OBJECT_IMAGE_SHARE": 0.7})
    assert not quality_ab.same_config(cshare, {**cshare, "DATALOADER.REPEAT_THRESHOLD": 0.5})
    # A fine-tune names its pretraining run by path: a study in another folder is the same run,
    # another pretraining run or file is not.
    finetune = {"MODEL.WEIGHTS": "/a/output/quality_ab/"
                                 "pretrain_mild_stock_1500it_s0/model_final.pth"}
    assert quality_ab.same_config(finetune, {"MODEL.WEIGHTS": "/clone/output/quality_ab/"
                                             "pretrain_mild_stock_1500it_s0/model_final.pth"})
    assert not quality_ab.same_config(finetune, {"MODEL.WEIGHTS": "/a/output/quality_ab/"
                                                 "pretrain_mild_stock_1500it_s1/model_final.pth"})
    assert not quality_ab.same_config(finetune, {"MODEL.WEIGHTS": "/a/output/quality_ab/"
                                                 "pretrain_mild_stock_1500it_s0/model_0000999.pth"})
    assert not quality_ab.same_config(finetune, {"MODEL.WEIGHTS": ""})


def test_archived_runs_are_restored_into_an_empty_run_folder(tmp_path):
    quality_ab = _load("quality_ab")
    run = tmp_path / "runs" / "sparse_stock_s0"
    run.mkdir(parents=True)
    records = [{"iteration": 99, "health/dets_per_image": 1.5}, {"iteration": 799, "bbox/AP": 3.0}]
    (run / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "result.json").write_text(json.dumps({"name": "sparse_stock_s0", "status": "ok"}))
    archive = tmp_path / "archive"
    quality_ab.archive_run(archive, "sparse_stock_s0", run)
    quality_ab.archive_run(archive, "pretrain_mild_stock_1500it_s0", run)  # never archived
    assert sorted(p.name for p in archive.iterdir()) == ["sparse_stock_s0.json.gz"]
    fresh = tmp_path / "fresh" / "sparse_stock_s0"
    quality_ab.restore_run(archive, "sparse_stock_s0", fresh)
    assert quality_ab.read_metrics(fresh / "metrics.json") == records
    assert json.loads((fresh / "result.json").read_text())["status"] == "ok"
    quality_ab.restore_run(archive, "severe_stock_s0", tmp_path / "fresh" / "severe_stock_s0")
    assert not (tmp_path / "fresh" / "severe_stock_s0").exists()  # nothing archived


def test_tracked_results_are_written_with_update_md_only(tmp_path):
    common = _load("common")
    args = type("Args", (), {"results_dir": None, "update_md": False})
    assert common.results_dir(args) == common.OUTPUT_RESULTS_DIR  # git-ignored output/
    assert common.results_dir(args, tiny=True) is None
    args.update_md = True
    assert common.results_dir(args) == common.RESULTS_DIR  # benchmarks/results, tracked
    args.results_dir = tmp_path
    assert common.results_dir(args) == tmp_path
    assert "/output/" in (common.REPO / ".gitignore").read_text().split()


def test_bench_preflight_tiny_times_the_report_and_the_summary(one_thread, tmp_path):
    from coco_builders import forgetting_datasets

    with forgetting_datasets() as registered:
        registered.append("bench_train")  # the json it registers in this process too
        result = _load("bench_preflight").main(["--tiny", "--results-dir", str(tmp_path)])
    assert (result["images"], result["boxes"], result["summary_images"]) == (2000, 14000, 1000)
    assert result["report_s"] > 0 and result["summary_s"] > 0
    # 5% of the generated images are empty; the first 1000 records hold about as many.
    assert result["summary"].startswith("Pre-flight: 1000 training images, ")
    assert "| `tools/analyze_data.py`, end to end (new process) | 2000 | 14000 |" in (
        tmp_path / "bench_preflight.md").read_text()


def test_no_predictions_count_as_zero_ap_in_the_groups_that_have_classes():
    quality_ab = _load("quality_ab")
    records = [{"iteration": 799, "bbox/AP": float("nan"), "bbox/APr": float("nan"),
                "bbox/APc": float("nan"), "bbox/APf": float("nan")}]
    two = quality_ab.parse_metrics(records, health_warmup=100, num_classes=2)
    assert (two["bbox/APf"], two["bbox/APc"]) == (0.0, 0.0) and math.isnan(two["bbox/APr"])
    assert quality_ab.parse_metrics(records, health_warmup=100, num_classes=20)["bbox/APr"] == 0.0


def test_a_pretraining_whose_runs_are_all_done_is_not_trained(tmp_path, repo_root):
    import sys

    quality_ab = _load("quality_ab")
    cmd = [sys.executable, "train_net.py", "--config-file",
           str(repo_root / "configs/quick_schedules/swin_tiny_balanced_instant_test.yaml")]
    done = tmp_path / "finetune_s0"
    done.mkdir()
    (done / "result.json").write_text(json.dumps(
        {"name": "finetune_s0", "status": "ok", "seconds": 1.0,
         "spec": quality_ab._spec(cmd, 1)}))
    (done / "metrics.json").write_text(json.dumps({"iteration": 5, "bbox/AP": 1.0}) + "\n")
    results = quality_ab.execute([("pretrain", tmp_path / "pretrain", cmd, None),
                                  ("finetune_s0", done, cmd, "pretrain")],
                                 quality_ab.TINY_SCHEDULE, jobs=1, threads=1)
    assert results["pretrain"]["status"] == "not needed"
    assert results["finetune_s0"]["status"] == "ok" and results["finetune_s0"]["bbox/AP"] == 1.0
    assert not (tmp_path / "pretrain").exists()  # nothing was trained
    # An archived run is not laid over a folder in use.
    archive = tmp_path / "archive"
    quality_ab.archive_run(archive, "finetune_s0", done)
    (done / "metrics.json").write_text("")
    quality_ab.restore_run(archive, "finetune_s0", done)
    assert (done / "metrics.json").read_text() == ""


@pytest.mark.parametrize("demo, arm", [
    ("swin_tiny_balanced_sparse_demo.yaml", "samples_cshare_paste"),
    ("swin_tiny_stock_sparse_demo.yaml", "stock")])
def test_the_demo_configs_are_the_studys_sparse_runs(repo_root, tmp_path, demo, arm):
    """README quotes the study's sparse table (5 seeds) for what `make demo` gives: the demo
    trains exactly the seed-0 run of that arm, every resolved key equal."""
    quality_ab = _load("quality_ab")
    study = quality_ab.Study(settings=quality_ab.SETTINGS, arms=quality_ab.ARMS,
                             pretrains=quality_ab.PRETRAINS, schedule=quality_ab.SCHEDULE,
                             output=tmp_path)
    run = quality_ab.Run("sparse", arm, 0)
    in_study = quality_ab.resolved_config(quality_ab.run_command(study, run, tmp_path / run.name))
    config = str(repo_root / "configs" / "quick_schedules" / demo)
    assert quality_ab.resolved_config(["python", "train_net.py", "--config-file", config]) == (
        in_study)
