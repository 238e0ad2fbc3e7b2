"""Every tool that writes files checks its output folder before doing any work
(reliability/tool_outputs.py): a file where a folder is expected, a folder it cannot write, or a
file it would write over one of its inputs is refused with one line naming the option and path."""

import gc
import os
from pathlib import Path

import pytest
from training_harness.reliability.tool_outputs import prepare_output_folder

from conftest import TINY_CONFIG, load_tool


def test_a_new_folder_is_created_and_an_existing_one_kept(tmp_path: Path):
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "old.txt").write_text("x")
    assert prepare_output_folder(tmp_path / "a" / "b", "--output", ["r.json"], {}) == \
        tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()
    prepare_output_folder(tmp_path / "kept", "--output", ["r.json"], {})
    assert (tmp_path / "kept" / "old.txt").read_text() == "x"


def test_a_file_where_the_folder_should_be_is_refused(tmp_path: Path):
    (tmp_path / "preds.json").write_text("{}")
    with pytest.raises(ValueError) as info:
        prepare_output_folder(tmp_path / "preds.json", "--output", [], {})
    assert str(info.value) == f"--output {tmp_path / 'preds.json'} is a file, not a folder"
    with pytest.raises(ValueError) as info:
        prepare_output_folder(tmp_path / "preds.json" / "sub", "--output", [], {})
    assert str(info.value) == (f"--output {tmp_path / 'preds.json' / 'sub'} cannot be created: "
                               "Not a directory")


def test_writing_over_an_input_is_refused_through_links_too(tmp_path: Path):
    (tmp_path / "out").mkdir()
    config = tmp_path / "out" / "report.json"
    config.write_text("SEED: 1\n")
    os.symlink(tmp_path / "out", tmp_path / "link")
    for folder in (tmp_path / "out", tmp_path / "link"):
        with pytest.raises(ValueError) as info:
            prepare_output_folder(folder, "--output", ["report.json", "report.png"],
                                  {"--config-file": config, "--weights": None})
        assert str(info.value) == (f"--output {folder}: the report.json written there would "
                                   f"overwrite the --config-file {config}; choose another "
                                   "--output")
    assert config.read_text() == "SEED: 1\n"


def test_a_folder_that_cannot_be_written_is_refused(tmp_path: Path, monkeypatch):
    folder = tmp_path / "read_only"
    folder.mkdir()
    # Root writes everywhere, so the permission is denied the way os.access reports it.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != folder)
    with pytest.raises(ValueError) as info:
        prepare_output_folder(folder, "--output", [], {})
    assert str(info.value) == f"--output {folder} is not writable by this user"


@pytest.mark.parametrize("tool, argv, option", [
    ("predict", ["--weights", "{weights}", "--input", "{images}", "--output", "{taken}"],
     "--output"),
    ("export_model", ["--weights", "{weights}", "--output", "{taken}"], "--output"),
    ("analyze_data", ["--output", "{taken}"], "--output"),
    ("demo", ["--output-dir", "{taken}"], "--output-dir"),
])
def test_each_tool_refuses_a_file_as_its_output_before_any_work(repo_root, tmp_path, capsys,
                                                                 tool, argv, option):
    taken = tmp_path / "results.json"
    taken.write_text("[]")
    (tmp_path / "images").mkdir()
    (tmp_path / "weights.pth").write_bytes(b"never read: the output is checked first")
    argv = [a.format(weights=tmp_path / "weights.pth", images=tmp_path / "images", taken=taken)
            for a in argv]
    with pytest.raises(SystemExit) as info:
        load_tool(tool).main(["--config-file", str(repo_root / "configs" / TINY_CONFIG),
                                     *argv])
    message = str(info.value.code) + capsys.readouterr().err
    assert f"{option} {taken} is a file, not a folder" in message
    assert taken.read_text() == "[]"
    assert gc.isenabled()  # analyze_data pauses the collector while it works, and only then


def test_plot_metrics_refuses_a_file_as_its_output(repo_root, tmp_path):
    (tmp_path / "metrics.json").write_text('{"iteration": 0, "total_loss": 1.0}\n')
    (tmp_path / "plots").write_text("x")
    with pytest.raises(SystemExit) as info:
        load_tool("plot_metrics").main([str(tmp_path / "metrics.json")])
    assert info.value.code == (f"plot_metrics: error: --output-dir {tmp_path / 'plots'} is a "
                               "file, not a folder")
