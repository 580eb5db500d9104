"""The command line's thread policy is in place before torch is imported, and leaves the user's own settings alone."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from quantkit.threads import apply_thread_policy, available_cpus

ROOT = Path(__file__).resolve().parents[1]
# Records the OpenMP settings at the moment torch is first imported, then runs an entry point.
PROBE = """
import importlib, json, os, sys
seen = {}
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.update(policy=os.environ.get("OMP_WAIT_POLICY"), threads=os.environ.get("OMP_NUM_THREADS"))
module, function = sys.argv[1].split(":")
sys.meta_path.insert(0, Watch())
sys.argv = ["quantkit", "--version"]
try:
    getattr(importlib.import_module(module), function)()
except SystemExit:
    pass
import torch
print(json.dumps({**seen, "torch_threads": torch.get_num_threads()}))
"""


def console_script() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["quantkit"]


def probe(entry: str, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    out = subprocess.run([sys.executable, "-c", PROBE, entry], env={**base, **env}, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("entry", ["quantkit.__main__:main", "console script"])
def test_policy_is_set_before_torch_is_imported(entry):
    seen = probe(console_script() if entry == "console script" else entry)
    cpus = available_cpus()
    assert seen == {"policy": "PASSIVE", "threads": str(cpus), "torch_threads": cpus}


def test_the_users_settings_win():
    seen = probe("quantkit.__main__:main", OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1")
    assert seen == {"policy": "ACTIVE", "threads": "1", "torch_threads": 1}


def test_available_cpus_honours_a_cgroup_quota(tmp_path):
    mask = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    assert available_cpus(quota) == mask
    quota.write_text("150000 100000\n")  # 1.5 CPUs of quota: 2 threads
    assert available_cpus(quota) == min(mask, 2)
    assert available_cpus(tmp_path / "missing") == mask
    env = {}
    apply_thread_policy(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(available_cpus())}
