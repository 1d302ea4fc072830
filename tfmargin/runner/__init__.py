"""The experiment runner beside the library: a run's configuration, recipes, training,
evaluation, provenance and command line (``experiments/run.py``, ``experiments/sweep.py``).

Nothing in the library (``tfmargin`` outside this package) imports it, and ``import
tfmargin`` does not load it.
"""
