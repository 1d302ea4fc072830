"""The documents promise only what exists: every flag they name, the first run they show."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SCRIPTS = ("experiments/run.py", "experiments/sweep.py", "experiments/report.py",
           "experiments/predict.py", "experiments/make_glyphs.py",
           "experiments/make_cifar10_jpeg.py", "benchmarks/bench.py", "benchmarks/goals.py",
           "experiments/served_scores.py", "experiments/studies.py",
           "experiments/head_recipes.py")


# Flags of other programs the documents show (tensorboard, pip, pytest).
OTHER_TOOLS = {"--logdir", "--index-url", "--port", "--host"}


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def documents():
    return [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs",
                                                                            "*.md")))]


def known_flags():
    """Every flag of every script's --help, each script run in this process (the suite has
    TensorFlow loaded already; a process per script would start it nine times)."""
    import contextlib
    import io
    import runpy
    from unittest import mock

    flags = set(OTHER_TOOLS)
    for script in SCRIPTS:
        path, out = os.path.join(ROOT, script), io.StringIO()
        with mock.patch.object(sys, "argv", [path, "--help"]), \
                mock.patch.object(sys, "path", [os.path.dirname(path), *sys.path]), \
                contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            runpy.run_path(path, run_name="__main__")
        assert exit_.value.code in (0, None), (script, out.getvalue()[-2000:])
        flags |= set(FLAG.findall(out.getvalue()))
    return flags


def test_every_flag_the_documents_name_exists():
    known = known_flags()
    assert {"--backbone", "--loss", "--classes", "--mixed-precision", "--no-mixed-precision",
            "--heads", "--collect", "--check", "--sections"} <= known
    missing = {}
    for path in documents():
        with open(path) as f:
            for number, line in enumerate(f, 1):
                for flag in set(FLAG.findall(line)) - known:
                    missing.setdefault(flag, f"{os.path.relpath(path, ROOT)}:{number}")
    assert not missing, missing


def test_readme_is_a_front_page():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert len(text.splitlines()) <= 160
    assert "python experiments/first_run.py" in text.split("## Install")[1].split("##")[0]


@pytest.mark.slow
def test_the_first_run_trains_evaluates_and_exports_and_says_where(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "first_run.py")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "CI": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "wrote a generated image folder to data/glyphs10" in out
    name = next(line.split(":")[0] for line in out.splitlines() if ": test top-1 " in line)
    assert f"run directory: runs/{name}" in out and f"export: saved_models/{name}" in out
    assert f"tensorboard --logdir runs/{name}/logs" in out
    assert f"python experiments/predict.py saved_models/{name} IMAGE.jpg" in out
    assert (tmp_path / "saved_models" / name / "savedmodel" / "saved_model.pb").exists()
    assert os.listdir(tmp_path / "runs" / name / "logs" / "projector")
    assert "I0000" not in done.stderr and "cuInit" not in done.stderr
    # A temperature stopped at its bound is said, not served silently.
    with open(tmp_path / "runs" / name / "metrics.json") as f:
        at_bound = json.load(f)["calibration"]["temperature_at_bound"]
    assert ("note: the temperature fit stopped at its bound" in out) == at_bound


def test_every_measured_figure_of_performance_md_is_in_a_committed_benchmark_output():
    """docs/performance.md quotes the benchmark; each decimal figure it gives must appear
    in one of the benchmark outputs committed beside it (docs/benchmarks/)."""
    with open(os.path.join(ROOT, "docs", "performance.md")) as f:
        text = f.read()
    outputs = ""
    for path in glob.glob(os.path.join(ROOT, "docs", "benchmarks", "*.md")):
        with open(path) as f:
            outputs += f.read()
    assert outputs, "no benchmark output under docs/benchmarks/"
    figures = set(re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", text))
    missing = sorted(f for f in figures if f not in outputs)
    assert not missing, missing


def test_the_code_runs_on_the_python_it_declares():
    """vermin finds the oldest Python each construct and standard-library name needs;
    none may need more than pyproject.toml's requires-python (datetime.UTC needed 3.11)."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        floor = re.search(r'requires-python = ">=(\d+\.\d+)"', f.read()).group(1)
    vermin = os.path.join(os.path.dirname(sys.executable), "vermin")
    done = subprocess.run([vermin, "--no-tips", "--violations",
                           "--eval-annotations", f"-t={floor}-", "tfmargin", "experiments",
                           "benchmarks", "tests"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]


def test_the_goals_table_of_performance_md_is_the_benchmark_outputs(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "goals.py"),
                           "--check"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import goals
    finally:
        sys.path.pop(0)
    assert goals.cpu_type({"model": "Intel(R) Xeon(R) Processor", "flags": ["amx_bf16"]}) == \
        "Intel Xeon, AMX"
    assert goals.cpu_type({"model": "AMD EPYC", "flags": ["avx512_bf16"]}) == \
        "AMD EPYC, AVX-512 BF16"
    assert goals.cpu_type({"model": "AMD EPYC", "flags": ["avx2"]}) == "AMD EPYC, no bfloat16"
    # The runner-overhead goal reads the same network's row, not the stock network's (a
    # fraction of the work per image), whichever comes last in an output.
    rows = [{"name": f"mobilenetv2 run.py training / plain Keras ({label})", "value": value,
             "target": ">= 1.0", "passed": value >= 1.0}
            for label, value in (("same adapted network", 1.5), ("stock keras.applications",
                                                                  0.25))]
    output = {"machine": {"model": "AMD EPYC", "flags": []}, "rows": rows}
    (tmp_path / "2026-01-01-x.json").write_text(json.dumps(output))
    verdicts = goals.latest_verdicts(str(tmp_path))
    row, _ = verdicts["run.py training / a plain Keras script", "AMD EPYC, no bfloat16"]
    assert row["value"] == 1.5


def test_each_heads_served_score_is_the_development_runs_choice():
    """recipes.SERVED_SCORES is what experiments/served_scores.py chooses from the ledger."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "experiments",
                                                        "served_scores.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
