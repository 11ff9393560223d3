"""The command-line shell: fast help, version, one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from brats_cnn import __version__
from brats_cnn.cli import main

SUBCOMMANDS = ("preprocess", "train", "segment", "evaluate", "benchmark", "demo")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "brats_cnn.cli", *args], capture_output=True, text=True)


def test_help_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


HEAVY_MODULES = ("torch", "numpy", "scipy", "SimpleITK", "nibabel", "matplotlib", "skimage", "yaml", "tqdm")


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["segment", "--help"]])
def test_help_imports_no_heavy_module(args):
    # what keeps --help fast (lazy imports: interpreter start-up plus typer); timing is for benchmarks
    code = ("import sys; from brats_cnn.cli import main; "
            f"rc = main({args!r}); print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules), rc)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip().splitlines()[-1] == "[] 0"


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"brats-cnn {__version__}"


def test_unknown_option_is_a_usage_error():
    result = run_cli("train", "--grade", "hgg", "--bogus")
    assert result.returncode == 2
    assert "No such option: --bogus" in result.stderr


def test_bad_config_override_is_one_line_exit_2(tmp_path):
    result = run_cli("train", "--grade", "hgg", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                     "--set", "train.epochs=abc")
    assert result.returncode == 2
    assert result.stderr.strip() == ("brats-cnn: error: --set: key 'train.epochs' must be int, got str 'abc'")
    assert "Traceback" not in result.stderr


def test_debug_shows_traceback(tmp_path):
    result = run_cli("--debug", "train", "--grade", "hgg", "--data", str(tmp_path), "--out",
                     str(tmp_path / "run"), "--set", "train.nope=1")
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "unknown config key 'train.nope'" in result.stderr


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name):
    result = run_cli(name, "--help")
    assert result.returncode == 0
    assert "Usage" in result.stdout


def test_atomic_outputs_follow_the_umask(tmp_path):
    import os
    import stat

    from brats_cnn.fsutil import write_json_atomic

    old = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "out.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
