"""
What every benchmark script shares: where results go, how a result names the code and the machine
it was measured on, markdown tables, the BENCHMARKS.md sections, interleaved timing, and counting
the host-device synchronizations of a code path.

Results: ``benchmarks/results/<name>.md`` and ``<name>.json``, both with the command, the commit
and the machine. ``BENCHMARKS.md`` holds one section per script between
``<!-- begin:<name> -->`` and ``<!-- end:<name> -->``; ``update_benchmarks_md`` replaces only that.
"""

import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"  # tracked: written with --update-md only
OUTPUT_RESULTS_DIR = REPO / "output" / "benchmarks"  # git-ignored: the default
BENCHMARKS_MD = REPO / "BENCHMARKS.md"

# The Python-level ways of waiting for the device (as tests/conftest.py's refuse_host_sync).
_SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero")


# -- what a result was measured with --


def git_commit() -> str:
    """The checked-out commit (12 hex digits), "+dirty" when tracked files differ from it; the
    benchmarks' own outputs (BENCHMARKS.md, benchmarks/results/) do not count, so that every
    script of one measuring session records the same clean commit."""
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                         f":(exclude){BENCHMARKS_MD.name}", ":(exclude)benchmarks/results"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> Dict[str, object]:
    """The hardware and software a measurement ran on."""
    info: Dict[str, object] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import detectron2

        info["detectron2"] = detectron2.__version__
    except ImportError:
        info["detectron2"] = None
    return info


def describe_machine(info: Dict[str, object]) -> str:
    gpu = f", GPU {info['cuda']}" if info.get("cuda") else ", no GPU"
    return (
        f"{info['cpu']} ({info['cpu_count']} logical CPUs){gpu}; Python {info['python']}, "
        f"torch {info['torch']}, detectron2 {info['detectron2']}"
    )


def command_line(script: str, argv: Optional[Sequence[str]] = None) -> str:
    """The command that reproduces a run of ``script`` (its __file__) with ``argv`` (None: the
    process's own arguments), relative to the repository root."""
    path = Path(script).resolve()
    try:
        name = str(path.relative_to(REPO))
    except ValueError:
        name = str(path)
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", name, *args])


# -- tables and result files --


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def add_output_arguments(parser, name: str) -> None:
    """The options every benchmark shares: where its tables go."""
    parser.add_argument("--results-dir", type=Path,
                        help=f"write {name}.md/.json here (default: output/benchmarks; with "
                        "--update-md: benchmarks/results; with --tiny: nowhere)")
    parser.add_argument("--update-md", action="store_true",
                        help="write the tracked benchmarks/results/ files and replace this "
                        "script's section of BENCHMARKS.md")


def results_dir(args, tiny: bool = False) -> Optional[Path]:
    """Where a script writes its .md/.json: --results-dir; else the tracked benchmarks/results/
    with --update-md only; else output/benchmarks/ (git-ignored); nowhere for a tiny run."""
    if args.results_dir is not None:
        return args.results_dir
    if args.update_md:
        return RESULTS_DIR
    return None if tiny else OUTPUT_RESULTS_DIR


def write_results(
    name: str,
    title: str,
    body: str,
    data: Dict[str, object],
    command: str,
    results_dir: Path,
    notes: Sequence[str] = (),
) -> str:
    """
    Write ``results_dir/<name>.md`` (title, provenance, ``body``) and ``<name>.json`` (``data``
    plus the same provenance). Returns the markdown, which is also BENCHMARKS.md's section.
    """
    info = machine()
    provenance = {
        "command": command,
        "commit": git_commit(),
        "machine": info,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    markdown = "\n".join(
        [
            f"### {title}",
            "",
            f"Command: `{command}`  ",
            f"Commit: `{provenance['commit']}` · {provenance['date']}  ",
            f"Machine: {describe_machine(info)}",
            "",
            body,
            *([""] + [f"- {n}" for n in notes] if notes else []),
            "",
        ]
    )
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.md").write_text(markdown)
    payload = {**provenance, **data}
    (results_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return markdown


def publish(args, name: str, title: str, body: str, data: Dict[str, object], script: str,
            argv: Optional[Sequence[str]], notes: Sequence[str] = (), tiny: bool = False) -> None:
    """
    The end of every benchmark: write ``<name>.md``/``.json`` where :func:`results_dir` says
    (nowhere for a tiny run without --results-dir) and, with --update-md, replace the section of
    BENCHMARKS.md. ``script`` and ``argv`` give the command line that is recorded.
    """
    folder = results_dir(args, tiny=tiny)
    if folder is None:
        return
    markdown = write_results(name, title, body, data, command_line(script, argv), folder, notes)
    if args.update_md:
        update_benchmarks_md(name, markdown)


def update_benchmarks_md(name: str, markdown: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the section between BENCHMARKS.md's markers for ``name`` (append it if absent)."""
    begin, end = f"<!-- begin:{name} -->", f"<!-- end:{name} -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)


# -- timing --


def set_threads(threads: Optional[int]) -> int:
    """torch.set_num_threads(threads) when given; returns the number of threads in use."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def interleaved_medians(
    fns: Dict[str, Callable[[], None]],
    repeats: int,
    warmup: int = 1,
    before_each: Optional[Callable[[str], None]] = None,
    device: Optional[torch.device] = None,
) -> Dict[str, Dict[str, object]]:
    """
    Median seconds of each function, run in alternating order (A B, B A, ...) so that drifts of
    the machine (other processes, clocks) hit all of them alike. ``before_each(name)`` runs
    untimed before every call (e.g. to restore identical weights). Returns {name: {"median": s,
    "times": [s, ...]}}.
    """
    names = list(fns)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for i in range(warmup + repeats):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            if before_each is not None:
                before_each(name)
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fns[name]()
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {n: {"median": statistics.median(t), "times": t} for n, t in times.items()}


# -- host-device synchronizations --


@contextlib.contextmanager
def count_python_syncs() -> Iterator[Counter]:
    """
    Inside, count the calls of the Python-level ways of waiting for the device (Tensor.item,
    tolist, bool, float, int, nonzero and torch.nonzero), by name, and let them run. On the
    CPU this is the only visible sign of a path that would synchronize on a GPU. Calls nested
    inside a counted call (e.g. nonzero inside item) are counted too.
    """
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in _SYNC_METHODS}
    original_nonzero = torch.nonzero

    def counting(name: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    try:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, counting(name, fn))
        torch.nonzero = counting("torch.nonzero", original_nonzero)
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        torch.nonzero = original_nonzero


@contextlib.contextmanager
def count_cuda_syncs() -> Iterator[List[str]]:
    """
    Inside, CUDA's synchronization debug mode is "warn" and each synchronizing call is recorded
    (its warning message) in the yielded list. Only meaningful on a CUDA device.
    """
    found: List[str] = []
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        # "always": the same call site synchronizing twice must count twice.
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            found.extend(
                str(w.message) for w in caught if "synchroniz" in str(w.message).lower()
            )
