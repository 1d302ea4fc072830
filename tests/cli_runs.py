"""run.py as a user runs it, for the tests: a subprocess with the CI environment."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "experiments", "run.py")


def run_cli(*args, env=None, cwd=None):
    """run.py with ``args``; without far-away images (minutes of the suite) unless a test
    gives ``--far-ood``."""
    far = () if "--far-ood" in args else ("--far-ood", "none")
    return subprocess.run([sys.executable, RUN, *args, *far], capture_output=True, text=True,
                          env={**os.environ, "CI": "1", **(env or {})}, cwd=cwd, timeout=600)
