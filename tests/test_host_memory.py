"""Host memory policy: glibc keeps freed CPU memory for reuse when asked, and says so everywhere it is set.

The policy changes the whole process, so every test that sets ``"retain"`` does it in a fresh Python.
"""

import json
import platform
import subprocess
import sys

import pytest

from gnlib import host_memory, train_cli
from gnlib.bench import main as bench_main
from gnlib.host_memory import host_memory_policy, set_host_memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the retain policy needs glibc")

# Minor page faults of the last rounds of a loop of two 64 MiB temporaries, under a given policy.
FAULTS = """
import resource, sys, torch
from gnlib.host_memory import host_memory_policy, set_host_memory
set_host_memory(sys.argv[1])
faults = []
for _ in range(12):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(2**24)
    y = x * 2
    del x, y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(host_memory_policy(), sum(faults[-4:]))
"""


def _faults(policy: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, policy], capture_output=True, text=True, check=True).stdout
    name, count = out.split()
    return name, int(count)


@glibc
def test_retain_reuses_freed_pages_where_the_system_policy_faults_them_in_again():
    # two fresh 64 MiB blocks per round are 2 * 16384 pages of 4 KiB, zeroed by the kernel on first touch
    assert _faults("system") == ("system", pytest.approx(4 * 32_768, rel=0.1))
    name, faults = _faults("retain")
    assert name == "retain" and faults < 1_000


@glibc
def test_the_throughput_command_reports_the_policy_it_ran_under():
    command = [sys.executable, "-m", "gnlib.throughput", "--preset", "paper_tiny", "--vocab", "64", "--batch", "2"]
    command += ["--seq-len", "8", "--steps", "1", "--host-memory", "retain", "--json"]
    result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    assert result["host_memory"] == "retain"


def test_bad_policies_name_the_parameter_and_the_allowed_values(monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"host_memory='keep' is not supported; allowed values: \['system', 'retain'\]"):
        set_host_memory("keep")
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    with pytest.raises(ValueError, match=r"host_memory='retain' needs glibc .*allowed here: 'system'"):
        set_host_memory("retain")
    assert host_memory_policy() == "system"
    for main, flag in ((bench_main, "--host-memory"), (train_cli.main, "--host_memory")):
        with pytest.raises(SystemExit):
            main([flag, "keep"])
        assert f"argument {flag}: invalid choice: 'keep' (choose from 'system', 'retain')" in capsys.readouterr().err


def test_train_cli_sets_the_policy_it_is_given(tmp_path, monkeypatch):
    chosen = []
    monkeypatch.setattr(train_cli, "set_host_memory", chosen.append)
    monkeypatch.setattr(train_cli, "run", lambda *args, **kwargs: None)
    train_cli.main(["--preset", "tiny", "--output_dir", str(tmp_path), "--host_memory", "retain"])
    train_cli.main(["--preset", "tiny", "--output_dir", str(tmp_path)])
    assert chosen == ["retain", "system"]
