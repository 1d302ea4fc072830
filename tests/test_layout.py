"""The layout: a library that imports nothing from the runner beside it, registers what
its exports name, no import cycle, no module a reader cannot hold."""

import glob
import os
import re
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


IMPORT_REGISTERS = r"""
import sys

import numpy as np
import tfmargin, keras
print("MODULES", sorted(m for m in sys.modules if m.startswith(("tensorflow_datasets",
                                                                "tensorboard", "tfmargin.runner",
                                                                "tfmargin.data"))))
model = keras.saving.load_model(sys.argv[1])
print("LOADED", type(model).__name__, model.count_params())
"""


def test_import_registers_every_class_a_saved_model_names_and_pulls_in_no_runner(tmp_path):
    """``import tfmargin`` then plain ``keras.saving.load_model`` loads an airbench
    classifier (its whitening layer included), quietly, without the runner's modules."""
    import tfmargin

    model = tfmargin.MarginClassifier("airbench93", 3, embedding_dim=0)
    model.adapt(np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)))
    model.save(tmp_path / "m.keras")
    done = subprocess.run([sys.executable, "-c", IMPORT_REGISTERS, str(tmp_path / "m.keras")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MODULES []" in done.stdout
    assert f"LOADED MarginClassifier {model.count_params()}" in done.stdout
    assert "I0000" not in done.stderr and "oneDNN" not in done.stderr, done.stderr


def test_the_library_imports_nothing_from_the_runner():
    """The layout's boundary: no module of tfmargin outside tfmargin/runner imports it."""
    import ast
    import glob

    for path in glob.glob(os.path.join(ROOT, "tfmargin", "*.py")):
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("tfmargin.runner") for n in names), path


def test_no_module_of_the_repository_imports_itself_back():
    """The import graph of tfmargin/, experiments/ and benchmarks/ (imports anywhere in a
    module, function bodies included) has no cycle."""
    import ast

    modules = {}
    for path in glob.glob(os.path.join(ROOT, "tfmargin", "**", "*.py"), recursive=True):
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        modules[name] = path
    for folder in ("experiments", "benchmarks"):  # scripts import each other by bare name
        for path in glob.glob(os.path.join(ROOT, folder, "*.py")):
            modules[os.path.basename(path)[:-3]] = path
    graph = {}
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}

    def visit(name, path):
        for target in graph[name]:
            assert target not in path, " -> ".join([*path, target])
            visit(target, (*path, target))

    for name in graph:
        visit(name, (name,))


def test_no_module_is_over_500_lines():
    """A module a reader can hold: the package, the scripts, the benchmarks and the tests."""
    paths = [path for folder in ("tfmargin", "experiments", "benchmarks", "tests")
             for path in glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)]
    sizes = {}
    for path in paths:
        with open(path) as f:
            sizes[os.path.relpath(path, ROOT)] = sum(1 for _ in f)
    assert len(sizes) > 40
    assert {path: n for path, n in sizes.items() if n > 500} == {}


def test_every_relative_link_of_the_documents_names_a_file_that_exists():
    """A link in the README, the changelog or docs/ to a file of the repository (not a web
    address) resolves from the document's own folder."""
    documents = [os.path.join(ROOT, name) for name in ("README.md", "CHANGELOG.md")]
    documents += glob.glob(os.path.join(ROOT, "docs", "*.md"))
    links, broken = 0, []
    for document in documents:
        with open(document) as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            links += 1
            if not os.path.exists(os.path.join(os.path.dirname(document), target)):
                broken.append(f"{os.path.relpath(document, ROOT)} -> {target}")
    assert links > 20
    assert broken == []
