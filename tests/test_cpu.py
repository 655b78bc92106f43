"""The CPU thread and OpenMP wait defaults of the `flatdino` entry point (cpu.py): pure logic, no timing."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from flatdino_cli.cpu import WAIT_VARS, apply_cpu_defaults, cpu_defaults, idle_cores, other_runnable, usable_cores


@pytest.mark.parametrize("cores, busy, want", [(2, 0, 2), (2, 1, 1), (2, 2, 1), (2, 7, 1), (8, 3, 5), (1, 0, 1),
                                               (4, -1, 4)])
def test_idle_cores_leaves_busy_ones_out_and_keeps_one(cores, busy, want):
    assert idle_cores(cores, busy) == want


def test_defaults_on_an_empty_environment():
    assert cpu_defaults({}, 2, 0) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2"}
    assert cpu_defaults({}, 2, 1) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("var", WAIT_VARS)
def test_a_wait_choice_of_the_user_is_kept(var):
    env = {var: "ACTIVE" if var == "OMP_WAIT_POLICY" else "0"}
    assert cpu_defaults(env, 4, 0) == {"OMP_NUM_THREADS": "4"}


def test_a_thread_count_of_the_user_is_kept_however_busy_the_machine():
    assert cpu_defaults({"OMP_NUM_THREADS": "3"}, 2, 5) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert cpu_defaults({"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}, 2, 5) == {}


def test_apply_adds_only_what_is_missing():
    env = {"OMP_NUM_THREADS": "1", "PATH": "/bin"}
    added = apply_cpu_defaults(env)
    assert added == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert env == {"OMP_NUM_THREADS": "1", "PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    env = {}
    apply_cpu_defaults(env)
    assert 1 <= int(env["OMP_NUM_THREADS"]) <= usable_cores() and env["OMP_WAIT_POLICY"] == "PASSIVE"


def test_the_machine_readings_are_sane():
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)
    assert other_runnable() >= 0


def _under_the_entry_point(env: dict) -> list[str]:
    """[torch's thread count, OMP_NUM_THREADS, OMP_WAIT_POLICY] as a command started by cli.main sees them."""
    code = ("import sys, flatdino_cli.cli as c; c.app = lambda: None; c.main(); import os, torch; "
            "print(torch.get_num_threads(), os.environ.get('OMP_NUM_THREADS'), os.environ.get('OMP_WAIT_POLICY'))")
    e = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", *WAIT_VARS)}
    e.update(env, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, check=True, timeout=300)
    return out.stdout.split()


def test_the_entry_point_sets_them_before_torch_starts_and_keeps_the_users():
    threads, chosen, policy = _under_the_entry_point({})
    assert 1 <= int(threads) <= usable_cores() and threads == chosen and policy == "PASSIVE"
    assert _under_the_entry_point({"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}) == ["1", "1", "ACTIVE"]


def test_the_console_script_goes_through_main():
    """pyproject's `flatdino` script is cli.main (the defaults), not the bare Typer app."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["flatdino"] == "flatdino_cli.cli:main"
