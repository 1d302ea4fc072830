"""Where a run's numbers come from: the code, the libraries, the machine and the data bytes.

Pure Python (no TensorFlow import at module level), so the records can be read and
checked without the framework.
"""

import datetime
import os
import platform
import subprocess
import time

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# CPU features that decide how fast the mixed-precision path can be.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
# The share of the machine's CPU other processes may use during a timed fit before its wall
# time stops being a speed figure (MachineShare).
SHARED_MACHINE = 0.10


def utc_now():
    """``2026-12-01T22:30:05Z``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def code_version(root=PACKAGE_ROOT):
    """``{"commit": sha, "dirty": bool}`` of the git checkout holding the package, or
    ``{"commit": None, "dirty": None}`` outside one (an installed wheel, say)."""
    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                              timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def library_versions():
    """Python and the numerical libraries a run used (those already imported)."""
    import sys

    versions = {"python": platform.python_version()}
    for name in ("tensorflow", "keras", "numpy", "tensorflow_datasets"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", None)
    return versions


def cpu_description():
    """``{"model": ..., "family": "26/2", "cores": n, "flags": [...]}`` from
    ``/proc/cpuinfo`` (Linux). The family and model numbers tell CPU generations apart where
    the model name does not (a virtual machine's "AMD EPYC")."""
    model, flags, numbers = platform.processor() or platform.machine(), set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() in ("cpu family", "model"):
                    numbers.setdefault(key.strip(), value.strip())
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    family = "/".join(numbers[k] for k in ("cpu family", "model") if k in numbers) or None
    return {"model": model, "family": family, "cores": os.cpu_count(),
            "flags": [flag for flag in CPU_FLAGS if flag in flags]}


def machine_busy_seconds(stat_path="/proc/stat"):
    """CPU seconds all processes have spent busy since boot, summed over cores (Linux's
    ``/proc/stat``: user, nice, system, irq, softirq and steal; ``None`` where unreadable).
    Steal counts: time a hypervisor gave to another guest is time this run did not get."""
    try:
        with open(stat_path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class MachineShare:
    """How much of the machine's CPU other processes used while this one worked: a wall
    time measured beside other work is not a speed figure, and the record should say so.

    Example::

        share = MachineShare()
        model.fit(...)
        share.others()  # 0.02 on an otherwise idle machine; None off Linux

    Args:
        stat_path: the kernel's CPU counters (``/proc/stat``).
        own_children: count the CPU time of child processes this one started and waited
            for as its own (a benchmark that times work in children), not as others'.
    """

    def __init__(self, stat_path="/proc/stat", own_children=False):
        self.stat_path = stat_path
        self.own_children = own_children
        self.start = self._sample()

    def _sample(self):
        own = time.process_time()
        if self.own_children:  # children this process started and waited for are its own
            times = os.times()
            own += times.children_user + times.children_system
        return machine_busy_seconds(self.stat_path), own, time.monotonic()

    def others(self):
        """The fraction of the machine's CPU time (cores × wall time since construction)
        that processes other than this one used, in [0, 1]; ``None`` where the machine's
        busy time cannot be read."""
        (busy0, own0, wall0), (busy1, own1, wall1) = self.start, self._sample()
        if busy0 is None or busy1 is None or wall1 <= wall0:
            return None
        others = (busy1 - busy0) - (own1 - own0)
        return min(max(others / ((wall1 - wall0) * (os.cpu_count() or 1)), 0.0), 1.0)


def timed_on_shared_machine(metrics):
    """True where a run's record says other processes used ``SHARED_MACHINE`` or more of
    the CPU during its fit (False where it does not say: runs recorded before the measure)."""
    share = metrics.get("cpu_share_of_other_processes")
    return share is not None and share >= SHARED_MACHINE


def has_bfloat16_instructions():
    """True on a CPU with bfloat16 matrix instructions (AVX-512 BF16 or AMX)."""
    flags = cpu_description()["flags"]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def has_gpu():
    """True where an NVIDIA GPU is visible to this process (its device node, and
    ``CUDA_VISIBLE_DEVICES`` not hiding it), checked without starting TensorFlow."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset") in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidia0")
