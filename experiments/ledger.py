"""The results ledger: ``results/runs/<run>/``, each reported run's small files.

``runs/`` is the ignored working area (checkpoints, TensorBoard logs, exports); the ledger
keeps what a document is generated from, so the figures survive the machine that made them.
"""

import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEDGER = os.path.join(ROOT, "results", "runs")
LEDGER_FILES = ("config.json", "metrics.json", "log.csv", "test_predictions.npz")


def is_recorded(name, ledger=LEDGER):
    """Whether the run called ``name`` finished and is in the ledger."""
    return os.path.exists(os.path.join(ledger, name, "metrics.json"))


def record(run_dir, ledger=LEDGER):
    """Copy one finished run's small files into the ledger; False if it is not finished or
    already there (a recorded run is never overwritten). The files are copied into a
    temporary directory renamed into place, so a crash never leaves a run half recorded
    (``metrics.json``, which marks it recorded, never stands without the others)."""
    from tfmargin.atomic import atomic_directory

    name = os.path.basename(os.path.normpath(run_dir))
    if (not os.path.exists(os.path.join(run_dir, "metrics.json")) or os.path.islink(run_dir)
            or is_recorded(name, ledger)):
        return False
    with atomic_directory(os.path.join(ledger, name)) as target:
        for file in LEDGER_FILES:
            if os.path.exists(os.path.join(run_dir, file)):
                shutil.copy2(os.path.join(run_dir, file), os.path.join(target, file))
    return True


def collect(source, ledger=LEDGER):
    """Copy each finished run under ``source`` into the ledger; returns the names copied."""
    return [name for name in sorted(os.listdir(source))
            if record(os.path.join(source, name), ledger)]
