"""The OpenMP wait default of the `flatdino` entry point (cpu.py): pure logic, no timing."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from flatdino_cli.cpu import WAIT_VARS, apply_cpu_defaults, cpu_defaults


def test_passive_waiting_on_an_empty_environment():
    assert cpu_defaults({}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert cpu_defaults({"OMP_NUM_THREADS": "1", "PATH": "/bin"}) == {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.parametrize("var", WAIT_VARS)
def test_a_wait_choice_of_the_user_is_kept(var):
    assert cpu_defaults({var: "ACTIVE" if var == "OMP_WAIT_POLICY" else "0"}) == {}


def test_apply_adds_only_what_is_missing():
    env = {"OMP_NUM_THREADS": "1", "PATH": "/bin"}
    assert apply_cpu_defaults(env) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert env == {"OMP_NUM_THREADS": "1", "PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    env = {"GOMP_SPINCOUNT": "300000"}
    assert apply_cpu_defaults(env) == {} and env == {"GOMP_SPINCOUNT": "300000"}


def _under_the_entry_point(env: dict) -> list[str]:
    """[torch's thread count, OMP_WAIT_POLICY] as a command started by cli.main sees them."""
    code = ("import sys, flatdino_cli.cli as c; c.app = lambda: None; c.main(); import os, torch; "
            "print(torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'))")
    e = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", *WAIT_VARS)}
    e.update(env, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, check=True, timeout=300)
    return out.stdout.split()


def test_the_entry_point_sets_them_before_torch_starts_and_keeps_the_users():
    cores = str(len(os.sched_getaffinity(0)))  # torch's count, left as it is: one thread per usable core
    assert _under_the_entry_point({}) == [cores, "PASSIVE"]
    assert _under_the_entry_point({"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}) == ["1", "ACTIVE"]


def test_the_console_script_goes_through_main():
    """pyproject's `flatdino` script is cli.main (the defaults), not the bare Typer app."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["flatdino"] == "flatdino_cli.cli:main"
