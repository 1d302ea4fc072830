import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402  (after the backend is chosen above)
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same Python, NumPy and backend seeds, so a test that trains
    sees the same run on every try instead of depending on the tests before it."""
    keras.utils.set_random_seed(0)
