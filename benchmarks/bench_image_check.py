#!/usr/bin/env python
"""
The cost of refusing misread image types (data/images.py): the training and evaluation mapper
reads each file's header once more before detectron2's ``read_image`` decodes it. Times both on
the same JPEG files, interleaved in each round, and prints the medians and their ratio.

    python benchmarks/bench_image_check.py --update-md
    python benchmarks/bench_image_check.py --tiny   # what the tests run
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
from detectron2.data.detection_utils import read_image

from training_harness.data.images import check_image_mode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file
import common  # noqa: E402

NAME = "bench_image_check"


def per_file_seconds(files: Sequence[str], fn, rounds: int) -> float:
    """The median over ``rounds`` of the mean time of ``fn`` per file."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for f in files:
            fn(f)
        times.append((time.perf_counter() - start) / len(files))
    return statistics.median(times)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=50)
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="4 small files, 1 round")
    common.add_output_arguments(parser, NAME)
    args = parser.parse_args(argv)
    if args.tiny:
        args.files, args.size, args.rounds = 4, (32, 48), 1
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        files = []
        for i in range(args.files):
            path = f"{folder}/{i}.jpg"
            cv2.imwrite(path, rng.integers(0, 255, (*args.size, 3), np.uint8))
            files.append(path)
        check, read = [], []
        for _ in range(args.rounds):  # interleaved: both see the same machine state
            check.append(per_file_seconds(files, check_image_mode, 1))
            read.append(per_file_seconds(files, lambda f: read_image(f, format="BGR"), 1))
    result = {"files": args.files, "size": list(args.size), "rounds": args.rounds,
              "header_check_us": 1e6 * statistics.median(check),
              "read_image_ms": 1e3 * statistics.median(read)}
    result["ratio"] = result["header_check_us"] / 1e3 / result["read_image_ms"]
    body = common.markdown_table(
        ["files", "image", "header check", "read_image (decode)", "check / read"],
        [[args.files, f"{args.size[1]}x{args.size[0]} JPEG",
          f"{result['header_check_us']:.0f} us", f"{result['read_image_ms']:.2f} ms",
          f"{result['ratio']:.3f}"]])
    print(body)
    common.publish(args, NAME, "Image type check vs decoding (bench_image_check.py)", body,
                   result, __file__, argv,
                   ["Medians over rounds of the mean per file; files in the page cache (a warm "
                    "local disk)."], tiny=args.tiny)
    return result


if __name__ == "__main__":
    main()
