"""Start TensorFlow without its start-up chatter on the terminal, with the CPU allocator
that suits a training step.

TensorFlow takes a CPU step's tensors from the C library's ``malloc``, which maps every
tensor above a few tens of megabytes afresh and unmaps it when freed, so every page faults
in again on the next step; its own best-fit allocator keeps them. Measured on the main
command's MobileNetV2 step (``bench.py --sections allocator``, docs/performance.md) it is
the faster, so it is the default here: ``TF_CPU_ALLOCATOR_USE_BFC`` is read when TensorFlow
starts, and a value set before ``import tfmargin`` (``false``) is kept.

TensorFlow's native libraries print informational lines to the process's stderr
before its logging is initialised (oneDNN notices, "Could not find cuda drivers",
"failed call to cuInit ... (303)" on a machine without a GPU), so
``TF_CPP_MIN_LOG_LEVEL`` does not silence them. Here they are caught while the
library loads and its devices are listed; everything else that was printed is
passed on. ``TFMARGIN_VERBOSE=1`` shows it all.
"""

import contextlib
import os
import sys
import tempfile

# Start-up lines that are information, not errors, on a CPU-only or a GPU machine.
NOISE = ("WARNING: All log messages before absl::InitializeLog()", "port.cc",
         "cudart_stub.cc", "cpu_feature_guard.cc", "To enable the following instructions",
         "cuInit", "cuda_executor.cc", "cuda_dnn.cc", "cuda_fft.cc", "cuda_blas.cc",
         "computation placer already registered", "oneDNN custom operations")


def is_noise(line):
    return any(marker in line for marker in NOISE)


@contextlib.contextmanager
def native_stderr_filtered():
    """Capture file descriptor 2 inside the block; re-print what is not start-up noise."""
    if os.environ.get("TFMARGIN_VERBOSE"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not is_noise(line):
                    sys.stderr.write(line)


def set_start_up_defaults():
    """What TensorFlow reads only when it starts, where the environment does not say."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")


def cpu_allocator():
    """The CPU allocator TensorFlow starts (or started) with: ``"tensorflow-bfc"`` or
    ``"malloc"``, as TensorFlow reads ``TF_CPU_ALLOCATOR_USE_BFC``."""
    use_bfc = os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "").lower() in ("true", "1")
    return "tensorflow-bfc" if use_bfc else "malloc"


def import_keras():
    """``import keras`` quietly (with its backend, and TensorFlow's devices listed when that
    is the backend); returns the module."""
    set_start_up_defaults()
    with native_stderr_filtered():
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            # Physical, not logical: listing logical devices would start the runtime, after
            # which a multi-worker strategy can no longer configure its collective ops.
            tf.config.list_physical_devices()
    return keras


def import_tensorflow():
    """``import tensorflow`` with its devices listed, quietly; returns the module."""
    set_start_up_defaults()
    with native_stderr_filtered():
        import tensorflow as tf

        # Physical, not logical: listing logical devices would start the runtime, after which
        # a multi-worker strategy can no longer configure its collective ops.
        tf.config.list_physical_devices()
    return tf
