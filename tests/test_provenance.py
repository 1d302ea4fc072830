"""What a run records of where it ran: the commit, the CPU, and whether other processes
shared the machine."""

import os
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "experiments", "run.py")


def test_a_run_records_the_commit_of_the_code_it_imported(monkeypatch):
    """A sweep trains run after run in one process; a checkout that moves on meanwhile must not
    be recorded as the code of its later runs."""
    import types

    from tfmargin.runner import provenance, train

    monkeypatch.setattr(provenance, "code_version",
                        lambda root=None: {"commit": "moved-on", "dirty": False})
    record = train.provenance_record(types.SimpleNamespace(fingerprint="abc"))
    assert record["code"] == train.CODE_AT_IMPORT and record["code"]["commit"] != "moved-on"
    assert record["data_fingerprint"] == "abc"


def test_cpu_description_reads_model_family_and_the_bfloat16_flags(monkeypatch, tmp_path):
    """A virtual machine's CPU can be named just "AMD EPYC": family and model numbers tell
    its generation; only the flags that decide the precision are kept."""
    import builtins

    from tfmargin.runner import provenance

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
                       "flags\t\t: fpu avx2 avx512f avx512_bf16 sse2\n\nprocessor\t: 1\n"
                       "cpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(
        cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
    description = provenance.cpu_description()
    assert description["model"] == "AMD EPYC" and description["family"] == "26/2"
    assert description["flags"] == ["avx2", "avx512f", "avx512_bf16"]
    assert provenance.has_bfloat16_instructions()


def test_machine_busy_seconds_reads_the_busy_fields_of_proc_stat(tmp_path):
    """user + nice + system + irq + softirq + steal, in clock ticks; idle and iowait not."""
    from tfmargin.runner import provenance

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 20 30 5000 70 4 6 10 0 0\ncpu0 50 10 15 2500 35 2 3 5 0 0\n")
    ticks = os.sysconf("SC_CLK_TCK")
    assert provenance.machine_busy_seconds(str(stat)) == pytest.approx(170 / ticks)
    assert provenance.machine_busy_seconds(str(tmp_path / "missing")) is None
    assert provenance.MachineShare(str(tmp_path / "missing")).others() is None


def test_machine_share_counts_only_other_processes_time(tmp_path, monkeypatch):
    """Over 10 s of wall on 2 cores (20 CPU seconds), the machine was busy 12 s, 4 of them
    this process's own: others used 8 / 20."""
    from tfmargin.runner import provenance

    ticks = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    clock = {"own": 3.0, "wall": 100.0}
    monkeypatch.setattr(provenance.time, "process_time", lambda: clock["own"])
    monkeypatch.setattr(provenance.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(provenance.os, "cpu_count", lambda: 2)
    stat.write_text(f"cpu  {100 * ticks} 0 0 0 0 0 0 0 0 0\n")
    share = provenance.MachineShare(str(stat))
    stat.write_text(f"cpu  {112 * ticks} 0 0 0 0 0 0 0 0 0\n")
    clock.update(own=7.0, wall=110.0)
    assert share.others() == pytest.approx(0.4)


def test_machine_share_can_count_waited_for_children_as_its_own(tmp_path, monkeypatch):
    """The same 12 busy seconds, 4 of them this process's and 5 its children's: others used
    3 / 20 when children are its own, 8 / 20 when they are not."""
    from tfmargin.runner import provenance

    ticks = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    clock = {"own": 3.0, "children": 1.0, "wall": 100.0}
    monkeypatch.setattr(provenance.time, "process_time", lambda: clock["own"])
    monkeypatch.setattr(provenance.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(provenance.os, "times", lambda: os.times_result(
        (0.0, 0.0, clock["children"] - 0.5, 0.5, 0.0)))
    monkeypatch.setattr(provenance.os, "cpu_count", lambda: 2)
    stat.write_text(f"cpu  {100 * ticks} 0 0 0 0 0 0 0 0 0\n")
    shares = [provenance.MachineShare(str(stat), own_children=True),
              provenance.MachineShare(str(stat))]
    stat.write_text(f"cpu  {112 * ticks} 0 0 0 0 0 0 0 0 0\n")
    clock.update(own=7.0, children=6.0, wall=110.0)
    assert [share.others() for share in shares] == pytest.approx([0.15, 0.4])


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_machine_share_sees_another_process_burning_a_core():
    """A busy loop in a child process takes one core while this process waits for it: at
    least 0.9 of a core's share of the machine is others' time."""
    from tfmargin.runner import provenance

    share = provenance.MachineShare()
    subprocess.run([sys.executable, "-c", "import time\nend = time.time() + 1.5\n"
                    "while time.time() < end: pass"], check=True, timeout=60)
    others = share.others()
    assert 0.9 / os.cpu_count() <= others <= 1.0, others


def test_on_a_gpu_the_run_says_its_budget_was_chosen_for_a_cpu(monkeypatch):
    """The standard recipe's 5 epochs were chosen by time on 2 CPU cores; with no GPU
    measurement to choose another budget by, a run on a GPU says so before training."""
    import types

    from tfmargin.runner import provenance, train
    from tfmargin.runner.config import RunConfig

    monkeypatch.setattr(provenance, "has_gpu", lambda: True)
    data = types.SimpleNamespace(sizes={"train": 45000, "val": 5000, "test": 10000},
                                 class_names=[str(i) for i in range(10)], notes=[],
                                 num_classes=10, train_size=45000)
    strategy = types.SimpleNamespace(extended=types.SimpleNamespace(
        worker_devices=["/job:localhost/replica:0/task:0/device:GPU:0"]))
    lines = train.describe_run(RunConfig(dataset="d").resolved(), data, strategy, 128)
    assert "  note: the standard recipe's 5 epochs were chosen for 2 CPU cores " \
        "(docs/recipe.md); a GPU affords more: --epochs" in lines
    assert lines[2].endswith("over GPU:0")


def test_tensorflow_starts_with_its_own_cpu_allocator_unless_the_environment_says(
        monkeypatch):
    """The best-fit allocator is read when TensorFlow starts: set by default, a value
    already in the environment kept, and the run's record says which one it trained with."""
    from tfmargin import quiet
    from tfmargin.runner import train

    monkeypatch.delenv("TF_CPU_ALLOCATOR_USE_BFC", raising=False)
    quiet.set_start_up_defaults()
    assert os.environ["TF_CPU_ALLOCATOR_USE_BFC"] == "true"
    assert train.provenance_record(types.SimpleNamespace(fingerprint="f"))["machine"][
        "cpu_allocator"] == "tensorflow-bfc"
    monkeypatch.setenv("TF_CPU_ALLOCATOR_USE_BFC", "false")
    quiet.set_start_up_defaults()
    assert os.environ["TF_CPU_ALLOCATOR_USE_BFC"] == "false"
    assert train.provenance_record(types.SimpleNamespace(fingerprint="f"))["machine"][
        "cpu_allocator"] == "malloc"
