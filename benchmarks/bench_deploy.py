"""
Inference speed of one model run eagerly, as TorchScript (traced) and with ONNX Runtime, on this
machine, in one run (ratios to eager).

    python benchmarks/bench_deploy.py                # the CPU demo's model, 128 px, 20 repeats
    python benchmarks/bench_deploy.py --tiny         # seconds: what the test suite runs

The model is the CPU demo's (configs/quick_schedules/swin_tiny_balanced_demo.yaml, random init:
speed does not depend on the weights) with SCORE_THRESH_TEST 0, so every image keeps its 100
detections and the mask head runs on all of them (the slowest case). All three run the same
image tensor through the exported interface of training_harness/deploy.py (DetectionOutputs: no
resizing, no postprocessing), alternating (A B C, C B A, ...), one thread each unless --threads;
medians are compared. Export times are printed too.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from training_harness import GuardedTrainer
from training_harness.config import load_project_config
from training_harness.deploy import DetectionOutputs, export, load_exported

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file
import common  # noqa: E402

NAME = "bench_deploy"
CONFIG = "configs/quick_schedules/swin_tiny_balanced_demo.yaml"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="64-px image, 2 repeats")
    parser.add_argument("--repeats", type=int, help="timed repetitions (default 20; --tiny 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    common.add_output_arguments(parser, NAME)
    args = parser.parse_args(argv)
    threads = common.set_threads(args.threads)
    side = 64 if args.tiny else 128
    repeats = args.repeats or (2 if args.tiny else 20)

    cfg = load_project_config(str(common.REPO / CONFIG),
                              ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = GuardedTrainer.build_model(cfg).eval()
    image = torch.rand(3, side, side, generator=torch.Generator().manual_seed(0)) * 255
    eager = DetectionOutputs(model)
    runners = {"eager": torch.no_grad()(lambda: eager(image))}
    export_s = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, suffix in (("torchscript", "ts"), ("onnx", "onnx")):
            start = time.perf_counter()
            path = export(model, image, fmt, "tracing", Path(tmp) / f"model.{suffix}")
            export_s[fmt] = time.perf_counter() - start
            run = load_exported(path)
            runners[fmt] = lambda run=run: run(image)
        timings = common.interleaved_medians(runners, repeats, warmup=2)
    eager_ms = timings["eager"]["median"] * 1e3
    rows = [[name, f"{t['median'] * 1e3:.1f}", f"{t['median'] * 1e3 / eager_ms:.3f}",
             "-" if name == "eager" else f"{export_s[name]:.1f}"]
            for name, t in timings.items()]
    body = common.markdown_table(["runtime", "ms per image", "/ eager", "export s"], rows)
    notes = [f"{side}x{side} image, 100 detections with masks, {threads} thread(s), median of "
             f"{repeats} interleaved repetitions; torch {torch.__version__}"]
    print(body + "\n\n" + "\n".join(f"- {n}" for n in notes))
    data = {"timings_ms": {k: v["median"] * 1e3 for k, v in timings.items()},
            "export_s": export_s, "image_side": side, "threads": threads, "repeats": repeats}
    common.publish(args, NAME, "Inference: eager vs TorchScript vs ONNX Runtime (bench_deploy.py)",
                   body, data, __file__, argv, notes, tiny=args.tiny)
    return data


if __name__ == "__main__":
    main()
