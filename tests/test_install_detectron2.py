"""
tools/install_detectron2.py, each path, without network: a throw-away virtual environment is the
target, and small packages made here stand in for detectron2 (a wheel laid out like PyPI's
sal-detectron2, a source checkout, a git repository).
"""
import hashlib
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALLER = REPO / "tools" / "install_detectron2.py"
STAND_IN_VERSION = "0.0.1"


def _offline_env(tmp_path: Path) -> dict:
    """Environment in which pip can reach no package index at all."""
    empty = tmp_path / "no-links"
    empty.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty),
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _run_installer(python: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), str(INSTALLER), *args], env=env, capture_output=True,
                          text=True, timeout=300)


def _import_detectron2(python: Path) -> str:
    result = subprocess.run([str(python), "-c", "import detectron2; print(detectron2.__version__)"],
                            capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


@pytest.fixture(scope="module")
def target_python(tmp_path_factory) -> Path:
    """A fresh virtual environment without detectron2."""
    root = tmp_path_factory.mktemp("target-venv")
    venv.EnvBuilder(with_pip=True).create(root)
    return root / "bin" / "python"


@pytest.fixture
def clean_target(target_python, tmp_path):
    """The target environment, with no detectron2 before and after the test."""
    env = _offline_env(tmp_path)
    uninstall = [str(target_python), "-m", "pip", "uninstall", "-y", "-q", "sal-detectron2", "detectron2"]
    subprocess.run(uninstall, env=env, capture_output=True)
    assert _import_detectron2(target_python) == ""
    yield target_python, env
    subprocess.run(uninstall, env=env, capture_output=True)


def _stand_in_pypi_wheel(directory: Path) -> Path:
    """A wheel laid out like sal_detectron2-0.7.2-cp310-none-any.whl: CPython-3.10 tags, a _C
    extension and a stray top-level tools package."""
    dist_info = "sal_detectron2-0.7.2.dist-info"
    files = {
        "detectron2/__init__.py": f'__version__ = "{STAND_IN_VERSION}"\n',
        "detectron2/_C.cpython-310-x86_64-linux-gnu.so": "\x7fELF not loadable here",
        "tools/__init__.py": "",
        f"{dist_info}/METADATA": "Metadata-Version: 2.1\nName: sal-detectron2\nVersion: 0.7.2\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\n"
                              "Tag: cp310-cp310-linux_x86_64\n",
        f"{dist_info}/top_level.txt": "detectron2\ntools\n",
    }
    path = directory / "sal_detectron2-0.7.2-cp310-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
        wheel.writestr(f"{dist_info}/RECORD", "")  # rewritten by the installer
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_default_source_repacks_verified_wheel_and_installs_it_with_pip(clean_target, tmp_path):
    python, env = clean_target
    wheel = _stand_in_pypi_wheel(tmp_path)
    result = _run_installer(python, env, "--wheel", str(wheel), "--sha256", _sha256(wheel))
    assert result.returncode == 0, result.stderr
    assert "sal_detectron2-0.7.2-py3-none-any.whl" in result.stdout
    assert _import_detectron2(python) == STAND_IN_VERSION
    shown = subprocess.run([str(python), "-m", "pip", "show", "-f", "sal-detectron2"], env=env,
                           capture_output=True, text=True).stdout
    assert "Version: 0.7.2" in shown
    assert "detectron2/__init__.py" in shown
    assert "_C." not in shown and "tools/__init__.py" not in shown

    again = _run_installer(python, env)
    assert again.returncode == 0
    assert "already importable" in again.stdout and "leaving it alone" in again.stdout


def test_default_source_refuses_wheel_with_wrong_checksum(clean_target, tmp_path):
    python, env = clean_target
    wheel = _stand_in_pypi_wheel(tmp_path)
    result = _run_installer(python, env, "--wheel", str(wheel), "--sha256", "0" * 64)
    assert result.returncode == 1
    assert f"has sha256 {_sha256(wheel)}, expected {'0' * 64}; refusing to install it" in result.stderr
    assert "Traceback" not in result.stderr
    assert _import_detectron2(python) == ""


def test_default_source_without_network_fails_with_one_clear_message(clean_target):
    python, env = clean_target
    result = _run_installer(python, env)
    assert result.returncode == 1
    error_lines = [l for l in result.stderr.splitlines() if l.startswith("[install_detectron2] error")]
    assert error_lines == [
        "[install_detectron2] error: could not install detectron2: 'pip download --no-deps "
        "--only-binary=:all: --python-version 3.10 --dest "
        + error_lines[0].split("--dest ")[1].split(" ")[0]
        + " sal-detectron2==0.7.2' failed with exit status 1. Name another source with --source "
        "or $DETECTRON2_SOURCE (a detectron2 checkout or git URL)."
    ]
    assert "Traceback" not in result.stderr


# A PEP 517 backend kept inside the stand-in checkout, so pip can build it with
# --no-build-isolation and no network (the target's bundled setuptools cannot build wheels).
_IN_TREE_BACKEND = """
import base64, hashlib, zipfile

VERSION = open("VERSION").read().strip()
DIST_INFO = f"detectron2-{VERSION}.dist-info"


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = f"detectron2-{VERSION}-py3-none-any.whl"
    files = {
        "detectron2/__init__.py": open("detectron2/__init__.py", "rb").read(),
        f"{DIST_INFO}/METADATA": f"Metadata-Version: 2.1\\nName: detectron2\\nVersion: {VERSION}\\n".encode(),
        f"{DIST_INFO}/WHEEL": b"Wheel-Version: 1.0\\nGenerator: stand-in\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
    }
    record = []
    with zipfile.ZipFile(f"{wheel_directory}/{name}", "w") as wheel:
        for path, data in files.items():
            wheel.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(data)}")
        wheel.writestr(f"{DIST_INFO}/RECORD", "\\n".join(record + [f"{DIST_INFO}/RECORD,,"]) + "\\n")
    return name
"""


def _stand_in_checkout(directory: Path, version: str) -> Path:
    checkout = directory / "detectron2-checkout"
    (checkout / "detectron2").mkdir(parents=True)
    (checkout / "detectron2" / "__init__.py").write_text(f'__version__ = "{version}"\n')
    (checkout / "VERSION").write_text(version)
    (checkout / "_backend.py").write_text(_IN_TREE_BACKEND)
    (checkout / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "_backend"\nbackend-path = ["."]\n'
    )
    return checkout


def test_user_named_directory_source_via_environment_variable(clean_target, tmp_path):
    python, env = clean_target
    checkout = _stand_in_checkout(tmp_path, "0.0.2")
    result = _run_installer(python, {**env, "DETECTRON2_SOURCE": str(checkout)})
    assert result.returncode == 0, result.stderr
    assert f"installing detectron2 from {checkout}" in result.stdout
    assert _import_detectron2(python) == "0.0.2"


def test_user_named_git_url_source(clean_target, tmp_path):
    python, env = clean_target
    checkout = _stand_in_checkout(tmp_path, "0.0.3")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(checkout)]
    for command in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "stand-in"]):
        subprocess.run(git + command, check=True)
    result = _run_installer(python, env, "--source", f"git+file://{checkout}")
    assert result.returncode == 0, result.stderr
    assert _import_detectron2(python) == "0.0.3"


def test_source_that_is_neither_directory_nor_url_fails_clearly(clean_target):
    python, env = clean_target
    result = _run_installer(python, env, "--source", "/no/such/detectron2")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "[install_detectron2] error: could not install detectron2: detectron2 source "
        "'/no/such/detectron2' is neither an existing directory nor a git URL. Name another "
        "source with --source or $DETECTRON2_SOURCE (a detectron2 checkout or git URL)."
    )


def test_project_environment_has_detectron2_from_pip():
    shown = subprocess.run([sys.executable, "-m", "pip", "show", "sal-detectron2", "detectron2"],
                           capture_output=True, text=True).stdout
    assert "Name: " in shown
    import detectron2  # noqa: F401
    import balanced_rcnn  # noqa: F401
