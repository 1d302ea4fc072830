"""The results ledger: ``results/runs/<run>/``, each reported run's small files.

``runs/`` is the ignored working area (checkpoints, TensorBoard logs, exports); the ledger
keeps what a document is generated from, so the figures survive the machine that made them.
"""

import glob
import json
import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEDGER = os.path.join(ROOT, "results", "runs")
LEDGER_FILES = ("config.json", "metrics.json", "log.csv", "test_predictions.npz")


def dataset_path_mismatch(dataset, ledger=LEDGER):
    """One line naming the path the ledger's runs of ``dataset``'s folder were trained with,
    where none was trained with ``dataset`` as given; None otherwise. A run's name hashes its
    ``--dataset`` as typed, so the same images under another path (absolute, or from another
    folder) would give every recorded run another name and train it again."""
    from tfmargin.runner.config import dataset_label

    label, paths = dataset_label(dataset), set()
    for path in glob.glob(os.path.join(ledger, "*", "config.json")):
        with open(path) as f:
            recorded = json.load(f)["dataset"]
        if dataset_label(recorded) == label:
            paths.add(recorded)
    if not paths or dataset in paths:
        return None
    return (f"the ledger's {label} runs were trained with --dataset "
            f"{' or '.join(sorted(paths))}, not {dataset}: a run's name holds the path as "
            "typed, so each would train again; pass that path (from the repository root)")


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
