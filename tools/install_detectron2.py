#!/usr/bin/env python
"""
Install detectron2 into the running Python environment, unless it is already importable.

detectron2 publishes no wheels and is not on PyPI under its own name. Sources, in order:

1. A source the user names with ``--source`` or the ``DETECTRON2_SOURCE`` environment variable:
   a local detectron2 checkout (a directory) or a pip-installable git URL
   (``git+https://github.com/facebookresearch/detectron2.git``). pip builds it, including the
   compiled CUDA/C++ ops when a compiler (and CUDA) is present.
2. Default, for machines that reach only PyPI: the ``sal-detectron2==0.7.2`` wheel, a mid-2024
   upstream detectron2 tree plus a ``_C`` extension built for CPython 3.10. It is verified
   against a pinned sha256, repackaged as a pure-Python ``py3-none-any`` wheel without ``_C``
   (which nothing in this project uses) and without its stray top-level ``tools`` package, then
   installed with pip so that ``pip show`` and ``pip uninstall`` know it.
   ``--wheel FILE`` uses a local copy of that wheel instead of downloading it.

Exit status: 0 when detectron2 is importable afterwards, 1 with one line on stderr otherwise.
"""
import argparse
import base64
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_DISTRIBUTION = "sal-detectron2==0.7.2"
DEFAULT_WHEEL_SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
SOURCE_ENV_VAR = "DETECTRON2_SOURCE"


class InstallError(RuntimeError):
    """A failure the user can act on; printed as one line, without a traceback."""


def log(message: str) -> None:
    print(f"[install_detectron2] {message}", flush=True)


def run_pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    log("running: " + " ".join(command))
    result = subprocess.run(command)
    if result.returncode != 0:
        raise InstallError(f"'pip {' '.join(args)}' failed with exit status {result.returncode}")


def importable_detectron2() -> str | None:
    """The location of an importable detectron2, or None."""
    spec = importlib.util.find_spec("detectron2")
    if spec is None:
        return None
    return spec.origin or ", ".join(spec.submodule_search_locations or [])


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_default_wheel(directory: Path) -> Path:
    # The wheel is tagged cp310; asking for that Python version lets pip fetch it on 3.11.
    run_pip(
        "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.10",
        "--dest", str(directory), DEFAULT_DISTRIBUTION,
    )
    wheels = sorted(directory.glob("*.whl"))
    if len(wheels) != 1:
        raise InstallError(f"expected one wheel from 'pip download {DEFAULT_DISTRIBUTION}', got {wheels}")
    return wheels[0]


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _is_dropped(name: str) -> bool:
    # The CPython-3.10 extension cannot load elsewhere, and a top-level "tools" package in
    # site-packages would shadow any project's own tools/.
    return name.startswith("detectron2/_C") or name.startswith("tools/")


def repack_as_pure_python(wheel: Path, expected_sha256: str, out_dir: Path) -> Path:
    """Verify ``wheel`` and rebuild it without compiled parts, tagged py3-none-any."""
    actual = sha256_of(wheel)
    if actual != expected_sha256:
        raise InstallError(
            f"{wheel} has sha256 {actual}, expected {expected_sha256}; refusing to install it"
        )
    distribution, version = wheel.name.split("-")[:2]
    repacked = out_dir / f"{distribution}-{version}-py3-none-any.whl"
    out_dir.mkdir(parents=True, exist_ok=True)
    removed, record = [], []
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(repacked, "w", zipfile.ZIP_DEFLATED) as target:
        names = source.namelist()
        (record_name,) = [n for n in names if n.endswith(".dist-info/RECORD")]
        for name in names:
            if name == record_name:
                continue
            if _is_dropped(name):
                removed.append(name)
                continue
            data = source.read(name)
            if name.endswith(".dist-info/WHEEL"):
                data = _pure_python_wheel_metadata(data.decode()).encode()
            target.writestr(name, data)
            record.append(_record_line(name, data))
        record.append(f"{record_name},,")
        target.writestr(record_name, "\n".join(record) + "\n")
    log(f"repacked {wheel.name} -> {repacked.name} (removed {len(removed)} files: the _C extension and tools/)")
    return repacked


def _pure_python_wheel_metadata(text: str) -> str:
    lines = [l for l in text.splitlines() if not l.startswith(("Root-Is-Purelib:", "Tag:"))]
    return "\n".join(lines + ["Root-Is-Purelib: true", "Tag: py3-none-any"]) + "\n"


def install_from_source(source: str) -> None:
    if os.path.isdir(source):
        if not any((Path(source) / name).is_file() for name in ("setup.py", "pyproject.toml")):
            raise InstallError(f"detectron2 source directory '{source}' has no setup.py or pyproject.toml")
        # No build isolation: detectron2's setup.py imports the already installed torch.
        run_pip("install", "--no-build-isolation", source)
    elif source.startswith(("git+", "http://", "https://")):
        url = source if source.startswith("git+") else "git+" + source
        run_pip("install", "--no-build-isolation", url)
    else:
        raise InstallError(
            f"detectron2 source '{source}' is neither an existing directory nor a git URL"
        )


def install_default(wheel: Path | None, expected_sha256: str) -> None:
    with tempfile.TemporaryDirectory(prefix="install_detectron2_") as tmp:
        tmp_dir = Path(tmp)
        if wheel is None:
            wheel = download_default_wheel(tmp_dir / "download")
        elif not wheel.is_file():
            raise InstallError(f"wheel file '{wheel}' does not exist")
        repacked = repack_as_pure_python(wheel, expected_sha256, tmp_dir / "repacked")
        run_pip("install", str(repacked))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source", default=os.environ.get(SOURCE_ENV_VAR) or None,
        help=f"a detectron2 checkout or git URL (default: ${SOURCE_ENV_VAR}, else {DEFAULT_DISTRIBUTION})",
    )
    parser.add_argument("--wheel", type=Path, help=f"a local copy of the {DEFAULT_DISTRIBUTION} wheel")
    parser.add_argument("--sha256", default=DEFAULT_WHEEL_SHA256, help="expected sha256 of that wheel")
    parser.add_argument("--force", action="store_true", help="install even if detectron2 is importable")
    args = parser.parse_args(argv)

    location = importable_detectron2()
    if location and not args.force:
        log(f"detectron2 is already importable ({location}); leaving it alone")
        return 0
    try:
        if args.source:
            log(f"installing detectron2 from {args.source}")
            install_from_source(args.source)
        else:
            log(f"installing detectron2 from PyPI's {DEFAULT_DISTRIBUTION} wheel (pure Python, no _C)")
            install_default(args.wheel, args.sha256)
    except (InstallError, zipfile.BadZipFile) as e:
        print(
            f"[install_detectron2] error: could not install detectron2: {str(e).rstrip('.')}. Name another source with "
            f"--source or ${SOURCE_ENV_VAR} (a detectron2 checkout or git URL).",
            file=sys.stderr,
        )
        return 1
    importlib.invalidate_caches()
    location = importable_detectron2()
    if location is None:
        print("[install_detectron2] error: pip finished but detectron2 is still not importable", file=sys.stderr)
        return 1
    log(f"detectron2 installed at {location}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
