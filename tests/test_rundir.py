"""The run directory's files (rundir.py): nothing else names them, the metrics log survives a torn last
line, a resume keeps the data it trained on, a damaged run is refused by name, --no-resume moves the
old run aside whole; and the same through the training loop: a damaged run refused byte-identical,
--no-resume keeping the last k runs aside."""

import ast
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from conftest import ROOT
from flatdino_cli import rundir
from flatdino_cli.config import TrainConfig
from flatdino_cli.config_yaml import load_preset
from flatdino_cli.errors import UserError
from flatdino_cli.lock import LOCK_NAME
from flatdino_cli.runtime import CPU
from flatdino_cli.train import Task, fit

RUN_FILES = (rundir.CONFIG_FILE, rundir.INPUTS_FILE, rundir.METRICS_FILE, rundir.FINISHED_FILE)
# module -> why it must name a run's file itself. None does: the exported folder (hub.py), which holds
# config.yaml and inputs.json too, is written through rundir like a run.
ALLOWED: dict[str, str] = {}


def _names_of_run_files(path) -> list[tuple[int, str]]:
    """(line, literal) of every string literal that is a path to a run's file ('inputs.json', 'run/config.yaml');
    prose that mentions one (a docstring, an error message) has spaces and does not count."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            v = node.value
            if not any(c.isspace() for c in v) and v.rsplit("/", 1)[-1] in RUN_FILES:
                hits.append((node.lineno, v))
    return hits


def test_only_rundir_names_the_run_files():
    pkg = ROOT / "flatdino_cli"
    assert {v for _, v in _names_of_run_files(pkg / "rundir.py")} == set(RUN_FILES)  # the scan sees them
    bad = [f"{f.relative_to(ROOT)}:{line}: {v!r}" for f in sorted(pkg.rglob("*.py"))
           if f.name != "rundir.py" and str(f.relative_to(pkg)) not in ALLOWED for line, v in _names_of_run_files(f)]
    assert not bad, "read and write a run's files through rundir.py: " + ", ".join(bad)


# ----------------------------------------------------------------------------- metrics.jsonl
def test_metrics_skip_a_torn_last_line_and_a_resume_drops_later_rows(tmp_path):
    log = rundir.MetricsLog(tmp_path, True, 0)
    for step in (1, 2, 3):
        log.write(step=step, loss=1.0 / step)
    with open(tmp_path / rundir.METRICS_FILE, "a") as f:
        f.write('{"step": 4, "lo')  # a kill mid-write
    assert [r["step"] for r in rundir.read_metrics(tmp_path)] == [1, 2, 3]

    rundir.MetricsLog(tmp_path, True, resume_step=2)  # resumed from the step-2 checkpoint
    lines = (tmp_path / rundir.METRICS_FILE).read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2]  # the torn line is gone too
    assert rundir.read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]


def test_metrics_of_another_rank_or_a_fresh_run(tmp_path):
    assert rundir.read_metrics(tmp_path) == []
    rundir.MetricsLog(tmp_path, False, 0).write(step=1, loss=0.0)  # not rank 0: writes nothing
    assert not (tmp_path / rundir.METRICS_FILE).exists()


# ----------------------------------------------------------------------------- inputs.json
def test_merge_inputs_keeps_the_data_a_run_trained_on(tmp_path):
    a = {"data_path": "A", "data_identity": {"encoder": "e1", "rows": 10}}
    b = {"data_path": "B", "data_identity": {"encoder": "e1", "rows": 20}}
    assert rundir.merge_inputs(tmp_path, a, new_data=False) == a  # nothing recorded yet
    rundir.write_inputs(tmp_path, a)
    assert rundir.merge_inputs(tmp_path, {**a, "note": 1}, new_data=False) == {**a, "note": 1}
    with pytest.raises(UserError, match=r"was trained on other data than B \(differs in rows\); pass --new-data") as e:
        rundir.merge_inputs(tmp_path, b, new_data=False)
    assert str(e.value).startswith(f"{tmp_path}:")
    merged = rundir.merge_inputs(tmp_path, b, new_data=True)
    assert merged == {**b, "previous_inputs": [a]}
    rundir.write_inputs(tmp_path, merged)
    assert rundir.merge_inputs(tmp_path, b, new_data=False) == merged  # resumed on B: the history stays
    assert rundir.merge_inputs(tmp_path, a, new_data=True) == {**a, "previous_inputs": [a, b]}  # and grows


def test_run_inputs_of_a_missing_or_broken_record_is_empty(tmp_path):
    assert rundir.run_inputs(tmp_path) == {}
    for text in ("[1, 2]", '{"cut": '):
        (tmp_path / rundir.INPUTS_FILE).write_text(text)
        assert rundir.run_inputs(tmp_path) == {}


# ----------------------------------------------------------------------------- config.yaml, finished.json
def test_run_config_round_trip_and_refusals(tmp_path):
    cfg = load_preset("tiny-vae")
    with pytest.raises(UserError, match=r"not a flatdino run directory \(no config.yaml\) \(make one with "
                                        r"`flatdino train-vae`\)"):
        rundir.run_config(tmp_path, "vae")
    assert not rundir.is_run_dir(tmp_path) and rundir.raw_config(tmp_path) is None
    rundir.write_config(tmp_path, cfg)
    assert rundir.is_run_dir(tmp_path)
    assert rundir.run_config(tmp_path, "vae") == cfg
    assert rundir.raw_config(tmp_path)["stage"] == "vae"
    with pytest.raises(UserError, match="is a vae run, expected a dit run"):
        rundir.run_config(tmp_path, "dit")


def test_finished_mark(tmp_path):
    assert rundir.run_finished(tmp_path) == {}
    rundir.mark_finished(tmp_path, 12, math.inf)  # no validation ran: no best value
    done = rundir.run_finished(tmp_path)
    assert done["step"] == 12 and done["best_val"] is None and done["finished"].endswith("Z")
    assert rundir.last_written(tmp_path) == tmp_path / rundir.FINISHED_FILE
    rundir.clear_finished(tmp_path)
    rundir.clear_finished(tmp_path)  # and again: nothing to remove is fine
    assert rundir.run_finished(tmp_path) == {}


# ----------------------------------------------------------------------------- damaged runs, --no-resume
def _checkpoint(run, name):
    d = run / "checkpoints" / name
    d.mkdir(parents=True)
    (d / "state.pt").write_bytes(b"")
    (d / "model.safetensors").write_bytes(b"")


def test_a_run_with_checkpoints_but_none_to_resume_is_refused_by_name(tmp_path):
    run = tmp_path / "run"
    rundir.refuse_damaged_run(run)  # a new run
    (run / "checkpoints" / ".tmp-latest").mkdir(parents=True)
    rundir.refuse_damaged_run(run)  # only a write a kill cut short: a fresh start
    _checkpoint(run, "best")
    with pytest.raises(UserError) as e:
        rundir.refuse_damaged_run(run)
    assert str(e.value).startswith(f"{run}: has checkpoints (best) but no complete checkpoints/latest")
    assert "nothing was changed" in str(e.value) and (run / "checkpoints" / "best").is_dir()
    _checkpoint(run, "latest")
    rundir.refuse_damaged_run(run)


def test_move_run_aside_moves_it_whole_and_keeps_the_newest(tmp_path):
    run = tmp_path / "run"
    for i in range(3):
        run.mkdir(exist_ok=True)
        (run / LOCK_NAME).write_text("held")
        (run / rundir.METRICS_FILE).write_text(f"{i}\n")
        (run / "stats.pt").write_text("prepared")
        rundir.move_run_aside(run, keep_old=2, keep_files=("stats.pt",))
        assert sorted(p.name for p in run.iterdir()) == sorted([LOCK_NAME, "stats.pt"])  # the lock stays with it
        (run / "stats.pt").unlink()
    old = sorted(tmp_path.glob("run.old-*"))
    assert len(old) == 2  # keep_old_runs
    assert [(d / rundir.METRICS_FILE).read_text() for d in old] == ["1\n", "2\n"]
    assert all((d / "stats.pt").read_text() == "prepared" for d in old)
    rundir.move_run_aside(run, keep_old=2)  # nothing but the lock: nothing to move
    assert sorted(tmp_path.glob("run.old-*")) == old


# ----------------------------------------------------------------------------- the same through fit
def fit_task(n: int = 32, val: bool = True) -> Task:
    """A 4-8-1 MLP task with a validation set (test_lock.py and test_checkpoint.py use it too)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    data = TensorDataset(x, x.sum(1, keepdim=True).sin())
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def loss_fn(net, batch, info):
        loss = F.mse_loss(net(batch[0]), batch[1])
        return loss, {}

    def val_fn(net, batches, rt):
        return {"loss": sum(F.mse_loss(net(b[0]), b[1]).item() for b in batches)}

    return Task(model=model, train_set=data, loss_fn=loss_fn, config=TrainConfig(), val_set=data if val else None,
                val_fn=val_fn if val else None, inputs={"data": "tiny"})


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path: to compare whole runs byte for byte."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


FIT_CFG = TrainConfig(epochs=2, batch_size=8, log_every=1)  # 4 steps an epoch of fit_task()


def test_damaged_run_is_refused_and_left_byte_identical(tmp_path):
    run = tmp_path / "run"
    fit(fit_task(), FIT_CFG, run, CPU)
    (run / "checkpoints" / "latest" / "state.pt").unlink()
    before = files_of(run)
    assert any(k.startswith("checkpoints/best/") for k in before)
    with pytest.raises(UserError, match=r"no complete checkpoints/latest.*--no-resume.*checkpoints/best") as e:
        fit(fit_task(), FIT_CFG, run, CPU)
    assert "\n" not in str(e.value)
    assert files_of(run) == before  # best, metrics, config: nothing overwritten


def test_no_resume_moves_the_whole_run_aside_and_keeps_the_last_k(tmp_path, capsys):
    run = tmp_path / "run"
    fit(fit_task(), FIT_CFG, run, CPU)
    first = files_of(run)
    fit(fit_task(), FIT_CFG, run, CPU, resume=False)
    aside = sorted(tmp_path.glob("run.old-*"))
    assert len(aside) == 1 and files_of(aside[0]) == first  # checkpoints + config + metrics + inputs together
    assert f"moved the previous run to {aside[0]}" in capsys.readouterr().out
    for _ in range(2):
        fit(fit_task(), FIT_CFG, run, CPU, resume=False)
    assert len(list(tmp_path.glob("run.old-*"))) == 1  # default keep 1
    fit(fit_task(), dataclasses.replace(FIT_CFG, keep_old_runs=3), run, CPU, resume=False)
    (run / "stats.pt").write_bytes(b"prepared by the stage for this run")
    task = dataclasses.replace(fit_task(), keep_files=("stats.pt",))
    fit(task, dataclasses.replace(FIT_CFG, keep_old_runs=3), run, CPU, resume=False)
    aside = sorted(tmp_path.glob("run.old-*"))
    assert len(aside) == 3 and (aside[-1] / "stats.pt").is_file() and (run / "stats.pt").is_file()
