"""The CPU thread choice of mspcnn/runtime.py: bounds of the automatic choice, explicit values, and
the error for a bad value."""
import os
import subprocess
import sys

import pytest
import torch

from mspcnn import runtime
from mspcnn.runtime import configure_threads, free_cores, machine_record, machine_text


def test_free_cores_is_within_the_machine():
    free, cpus, busy = free_cores(window=0.05)
    assert 1 <= free <= cpus
    assert busy >= 0.0


def test_a_busy_core_is_seen():
    """A process spinning on one core must be counted: the automatic choice leaves it its core."""
    free_quiet, cpus, _ = free_cores(window=0.2)
    if cpus < 2:
        pytest.skip("needs 2 cores")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time
        time.sleep(0.3)
        _, _, busy = free_cores(window=0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy >= 0.7, busy


def test_explicit_and_bad_values():
    before = torch.get_num_threads()
    try:
        assert configure_threads("1").startswith("1 threads")
        assert torch.get_num_threads() == 1
        for bad in ("0", "-2", "many", 1.5j):
            with pytest.raises(ValueError, match="positive integer"):
                configure_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_the_log_line_names_the_openmp_wait_policy():
    code = "from mspcnn.runtime import configure_threads; print(configure_threads(1))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "OpenMP waits: OpenMP's default" in out
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, OMP_WAIT_POLICY="PASSIVE"),
                         capture_output=True, text=True, check=True).stdout
    assert "OpenMP waits: passive (OMP_WAIT_POLICY)" in out


def _auto_line(env_overrides, drop=("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")):
    code = "import torch; from mspcnn.runtime import configure_threads; print(configure_threads()); " \
           "print(torch.get_num_threads())"
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run([sys.executable, "-c", code], env=dict(env, **env_overrides), capture_output=True,
                          text=True)


def test_auto_takes_omp_num_threads_when_the_environment_sets_it():
    """Processes meant to give the same numbers (one process against data-parallel workers, both
    started with OMP_NUM_THREADS=1) must not each measure the machine and choose differently: a 1- and
    a 2-thread run reduce in other orders, and a comparison of their weights then fails."""
    out = _auto_line({"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    line, n = out.stdout.splitlines()
    assert line.startswith("1 threads (OMP_NUM_THREADS)") and n == "1"
    bad = _auto_line({"OMP_NUM_THREADS": "lots"})
    assert bad.returncode != 0 and "OMP_NUM_THREADS must be a positive integer" in bad.stderr
    # an explicit count still wins over the environment
    code = "from mspcnn.runtime import configure_threads; print(configure_threads(2))"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("2 threads (given)")


def test_auto_shares_the_free_cores_among_the_local_workers():
    out = _auto_line({"LOCAL_WORLD_SIZE": str(4 * (os.cpu_count() or 1))})
    assert out.returncode == 0, out.stderr
    line, n = out.stdout.splitlines()
    assert line.startswith("1 threads (auto:") and "workers" in line and n == "1"


def test_machine_record_names_what_the_arithmetic_depends_on(monkeypatch):
    """The processor, PyTorch's kernel instruction set, its version and threads; one log line from
    it, also from an older record that lacks keys; no GPU keys on the CPU."""
    record = machine_record("cpu")
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["torch"] == torch.__version__ and record["threads"] == torch.get_num_threads()
    assert isinstance(record["cpu"], str) and record["cpu"] and "gpu" not in record
    assert machine_text(record) == (f"{record['cpu']} ({record['cpu_capability']}), torch {torch.__version__}, "
                                    f"{torch.get_num_threads()} threads")
    assert machine_text({"cpu": "X"}) == "X (?), torch ?, ? threads"
    assert machine_text({**record, "gpu": "G", "cuda": "12.8"}).endswith(", G (CUDA 12.8)")
    # without /proc/cpuinfo (another system): what platform knows
    def no_file(*a, **k):
        raise OSError("no such file")
    monkeypatch.setattr("builtins.open", no_file)
    assert runtime.cpu_model() == (runtime.platform.processor() or runtime.platform.machine() or "unknown")
