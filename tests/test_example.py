"""The keras.io-style example runs as documented, on a generated image folder."""

import ast
import os
import subprocess
import sys

import pytest
from synthetic import write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "arcface_own_backbone.py")


def test_example_has_the_keras_io_header():
    with open(EXAMPLE) as f:
        header = f.read().split('"""')[1]
    for field in ("Title:", "Author:", "Date created:", "Last modified:", "Description:",
                  "Accelerator:"):
        assert f"\n{field} " in header, field


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["class folders", "train and test"])
def test_example_trains_inspects_and_exports(tmp_path, layout):
    split = layout == "train and test"
    data = write_image_folder(tmp_path / "images", num_classes=3, per_class=40, size=64,
                              test_per_class=5 if split else None)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, EXAMPLE, data, str(out)], capture_output=True,
                            text=True, env={**os.environ, "EPOCHS": "8"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = ast.literal_eval(next(line for line in result.stdout.splitlines()
                                   if line.startswith("{")))
    assert scores["accuracy"] >= 0.8  # 3 colour classes; chance is 1/3
    assert 0.0 < scores["theta_y_mean"] < 90.0
    metadata = (out / "logs" / "projector" / "metadata.tsv").read_text().splitlines()
    assert metadata[0].startswith("class\tlabel\tpredicted") and len(metadata) == 1 + 24
    assert (out / "saved_model" / "saved_model.pb").exists()
    served = next(line for line in result.stdout.splitlines() if line.startswith("served:"))
    assert "class_" in served
    # train/ and test/: the classes are the class folders, never "train" and "test".
    assert "'train'" not in served and "'test'" not in served
