"""The command line: --help in groups with the registries' names, and bad flags or an
unreachable dataset as one line on stderr, exit 2."""

import os
import subprocess
import sys

import pytest
from cli_runs import ROOT, RUN, run_cli


@pytest.mark.parametrize("args,message", [
    (["--backbone", "vgg"], "unknown backbone 'vgg'; choose one of resnet18"),
    (["--dataset", "cifar-smal"], "Unknown dataset 'cifar-smal': not a TFDS name"),
    (["--dataset", "tfds:cifar-10"], "Unknown dataset 'cifar-10': not a TFDS name"),
    (["--margin", "3.2"], "margin for 'arcface' must be in [0, pi)"),
    (["--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
    (["--gelu", "tanh"], "unknown gelu 'tanh'; choose one of keras, fused"),
    (["--gelu", "fused"], "--gelu fused needs a backbone built with GELU (airbench94, "
                          "airbench93); mobilenetv2 has none"),
    (["--batchnorm", "sync"], "unknown batchnorm 'sync'; choose one of keras, fused"),
    (["--backbone", "tinycnn", "--batchnorm", "keras"],
     "--batchnorm keras needs a backbone built with BatchNorm (resnet18, mobilenetv2, "
     "efficientnetb0, airbench94, airbench93); tinycnn has none"),
])
def test_invalid_flags_exit_2_with_one_line(args, message, tmp_path):
    result = run_cli(*args, "--runs-dir", str(tmp_path))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("run.py: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) <= 2
    assert os.listdir(tmp_path) == []


def test_offline_cifar10_is_one_line_not_a_traceback(tmp_path):
    # A proxy on a closed loopback port: no traffic leaves the machine.
    closed = "http://127.0.0.1:9"
    result = run_cli("--runs-dir", str(tmp_path / "runs"),
                     env={"TFDS_DATA_DIR": str(tmp_path / "tfds"), "HTTP_PROXY": closed,
                          "HTTPS_PROXY": closed, "https_proxy": closed, "http_proxy": closed,
                          "NO_PROXY": "", "no_proxy": ""})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "Cannot download 'cifar10'" in error[0]
    assert "manual" in error[0] and "--dataset <folder>" in error[0]
    assert not os.path.exists(tmp_path / "runs")


def test_help_lists_the_registries_names():
    from tfmargin import names

    done = subprocess.run([sys.executable, RUN, "--help"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "COLUMNS": "400"})
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for table in (names.BACKBONES, names.HEADS, names.AUGMENTATIONS, names.MIXES,
                  names.STRATEGIES, names.OPTIMIZERS, names.EXPORT_FORMATS):
        for name in table:
            assert f"{name} (" in text or f" {name}," in text or f" {name} " in text, name
    assert "Nesterov momentum 0.9" not in text  # the recipe's, not every run's
    # In groups, and no flag shows an empty default.
    assert "(default: None)" not in text and "(default: )" not in text
    for group in ("data:", "model and head:", "training:", "evaluation and export:",
                  "run management:"):
        assert group in done.stdout
    sweep = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "sweep.py"),
                            "--help"], capture_output=True, text=True, timeout=60)
    assert "ce=<ce weight>" in " ".join(sweep.stdout.split())


@pytest.mark.parametrize("args", [["--help"], ["--epochs", "x"], ["--loss", "triplet"]])
def test_help_and_flag_errors_are_quiet(args):
    """No TensorFlow start-up notice before the help or the one-line error."""
    done = run_cli(*args)
    assert done.returncode == (0 if args == ["--help"] else 2)
    assert "I0000" not in done.stderr and "oneDNN" not in done.stderr, done.stderr
    if args != ["--help"]:
        assert done.stderr.count("\n") == 1 and "run.py: error: " in done.stderr
