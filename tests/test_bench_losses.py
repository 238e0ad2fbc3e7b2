"""benchmarks/bench_losses.py runs (tiny inputs) and prints balanced/stock ratios."""

import importlib.util
import re
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_losses.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_losses", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_benchmark_prints_the_ratios(capsys):
    results = _load_benchmark().main(["--tiny", "--repeats", "1"])
    out = capsys.readouterr().out
    assert re.search(r"^head\s+pass\s+stock ms\s+balanced ms\s+balanced/stock$", out, re.M), out
    for head in ("rpn", "roi_box", "roi_box_nostats", "mask", "all"):
        for mode in ("forward", "fwd+bwd"):
            row = re.search(
                rf"^{head}\s+{re.escape(mode)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M
            )
            assert row, (head, mode, out)
            stock_ms, balanced_ms = results[head, mode]
            assert stock_ms > 0 and balanced_ms > 0
            assert float(row.group(3)) == pytest.approx(balanced_ms / stock_ms, abs=0.006)
    assert re.search(r"^flush\s+-\s+[\d.]+\s+-$", out, re.M), out
    # "all" is the three losses; the diagnostic row without statistics is not one of them.
    for mode in ("forward", "fwd+bwd"):
        assert results["all", mode][0] == pytest.approx(
            sum(results[h, mode][0] for h in ("rpn", "roi_box", "mask"))
        )
