"""Bad input, every command: the same bad paths and values go to each command, and each answers with
a one-line error and a non-zero exit, never a traceback. In-process (CliRunner) for speed: an
exception that escaped the command would be a traceback in a real shell; a few cases also run as
real processes. Also: sample validates everything (--seed -3) before writing anything.

One file for one quality across every command, by design: the sweep is one table, not split per
module; each module's own refusals live in its own test file."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flatdino_cli.cli import app
from test_sample import w  # noqa: F401  (tiny VAE / DiT / decoder run dirs and stores)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "file.txt").write_text("just some text\n")
    (root / "junk").mkdir()
    for name in ("a.png", "b.jpg", "config.yaml", "manifest.json"):
        (root / "junk" / name).write_text("{not: [valid")
    (root / "empty").mkdir()
    return {"missing": root / "does-not-exist", "file": root / "file.txt", "junk": root / "junk",
            "empty": root / "empty", "root": root}


# every command with {P} where a path goes; {O} is a fresh output folder
COMMANDS = [
    ["presets", "show", "{P}"],
    ["extract", "{P}", "{O}", "--encoder", "tiny", "--device", "cpu"],
    ["extract", "{P}", "{O}", "--vae", "{P}", "--device", "cpu"],
    ["train-vae", "--preset", "tiny-vae", "--features", "{P}", "--out", "{O}", "--device", "cpu"],
    ["train-vae", "--preset", "{P}", "--features", "{P}", "--out", "{O}", "--device", "cpu"],
    ["train-dit", "--preset", "tiny-dit", "--latents", "{P}", "--out", "{O}", "--device", "cpu"],
    ["train-decoder", "--preset", "tiny-decoder", "--images", "{P}", "--encoder", "tiny", "--no-lpips",
     "--out", "{O}", "--device", "cpu"],
    ["flops", "--preset", "{P}"],
    ["ablate-tokens", "--vae", "{P}", "--features", "{P}", "--out", "{O}", "--device", "cpu"],
    ["pca", "--features", "{P}", "--out", "{O}", "--device", "cpu"],
    ["knn", "--latents", "{P}", "--device", "cpu"],
    ["noise", "--vae", "{P}", "--features", "{P}", "--out", "{O}", "--device", "cpu"],
    ["redundancy", "--features", "{P}", "--out", "{O}", "--device", "cpu"],
    ["sample", "--dit", "{P}", "--decoder", "{P}", "--out", "{O}", "--device", "cpu"],
    ["reconstruct", "{P}", "--vae", "{P}", "--decoder", "{P}", "--out", "{O}", "--device", "cpu"],
    ["fid", "{P}", "--ref", "{P}", "--device", "cpu"],
]
PATHS = ["missing", "file", "junk", "empty"]


def run(args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(r, args) -> str:
    shown = " ".join(map(str, args))
    assert r.exception is None or isinstance(r.exception, SystemExit), f"{shown}: {r.exception!r}"
    assert r.exit_code not in (0, None), f"{shown}: exit 0\n{r.output}"
    assert "Traceback" not in r.output, shown
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("flatdino: error:") or ln.startswith("Error")
             or ln.startswith("Usage")]
    assert lines, f"{shown}: no error line in\n{r.stderr}"
    return lines[-1]


@pytest.mark.parametrize("template", COMMANDS, ids=lambda t: " ".join(t[:2]))
@pytest.mark.parametrize("which", PATHS)
def test_every_command_refuses_bad_paths_in_one_line(template, which, bad, tmp_path):
    args = [str(bad[which]) if a == "{P}" else str(tmp_path / "out") if a == "{O}" else a for a in template]
    assert_one_line_error(run(args), args)


OUT_IS_A_FILE = [
    ["toy-data", "{F}", "--per-class", "1"],
    ["extract", "{toy}", "{F}", "--encoder", "tiny", "--device", "cpu"],
    ["train-vae", "--preset", "tiny-vae", "--features", "{feats}", "--out", "{F}", "--device", "cpu"],
    ["train-vae", "--preset", "tiny-vae", "--features", "{feats}", "--out", "{F}/sub", "--device", "cpu"],
    ["train-dit", "--preset", "tiny-dit", "--latents", "{lat}", "--out", "{F}", "--device", "cpu"],
    ["sample", "--dit", "{dit}", "--vae", "{vae}", "--decoder", "{dec}", "-c", "0", "--out", "{F}", "--device", "cpu"],
    ["reconstruct", "{imgs}", "--vae", "{vae}", "--decoder", "{dec}", "--out", "{F}", "--device", "cpu"],
    ["quickstart", "--out", "{F}"],
]


@pytest.mark.parametrize("template", OUT_IS_A_FILE, ids=lambda t: t[0])
def test_an_out_that_is_a_file_is_one_line(template, bad, w, tmp_path):  # noqa: F811
    vals = {"F": str(bad["file"]), "toy": str(w["imgs"]), "feats": str(w["root"] / "feats"), "lat": str(w["lat"]),
            "dit": str(w["dit"]), "vae": str(w["vae"]), "dec": str(w["dec"]), "imgs": str(w["imgs"])}
    args = [a.format(**vals) for a in template]
    line = assert_one_line_error(run(args), args)
    assert str(bad["file"]) in line
    assert bad["file"].read_text() == "just some text\n"


BAD_VALUES = [
    ["toy-data", "{O}", "--per-class", "-1"],
    ["toy-data", "{O}", "--size", "0"],
    ["train-vae", "--preset", "tiny-vae", "--features", "{feats}", "--out", "{O}", "--device", "mps"],
    ["train-vae", "--preset", "tiny-vae", "--features", "{feats}", "--out", "{O}", "--seed", "-1"],
    ["train-vae", "--preset", "tiny-vae", "--features", "{feats}", "--out", "{O}", "--batch-size", "0"],
    ["train-vae", "--preset", "tiny-vae", "--features", "{feats}", "--out", "{O}", "--epochs", "nan"],
    ["sample", "--dit", "{dit}", "--vae", "{vae}", "--decoder", "{dec}", "-c", "0", "--out", "{O}", "--seed", "-3"],
    ["sample", "--dit", "{dit}", "--vae", "{vae}", "--decoder", "{dec}", "--out", "{O}", "-n", "-1"],
    ["sample", "--dit", "{dit}", "--vae", "{vae}", "--decoder", "{dec}", "-c", "0", "--out", "{O}", "--steps", "0"],
    ["sample", "--dit", "{dit}", "--vae", "{vae}", "--decoder", "{dec}", "-c", "0", "--out", "{O}", "--device", "mps"],
    ["reconstruct", "{imgs}", "--vae", "{vae}", "--decoder", "{dec}", "--out", "{O}", "-n", "-1"],
    ["reconstruct", "{imgs}", "--vae", "{vae}", "--decoder", "{dec}", "-c", "0", "--out", "{O}", "--batch-size", "0"],
    ["extract", "{imgs}", "{O}", "--encoder", "tiny", "--batch-size", "0"],
    ["extract", "{imgs}", "{O}", "--encoder", "tiny", "--val-split", "-1"],
    ["extract", "{imgs}", "{O}", "--encoder", "nope"],
    ["knn", "--latents", "{lat}", "--k", "0"],
    ["quickstart", "--out", "{O}", "--per-class", "0"],
    ["quickstart", "--out", "{O}", "--device", "mps"],
]


@pytest.mark.parametrize("template", BAD_VALUES, ids=lambda t: " ".join(t[-2:]))
def test_bad_values_are_one_line_and_write_nothing(template, w, tmp_path):  # noqa: F811
    vals = {"O": str(tmp_path / "out"), "feats": str(w["root"] / "feats"), "lat": str(w["lat"]),
            "dit": str(w["dit"]), "vae": str(w["vae"]), "dec": str(w["dec"]), "imgs": str(w["imgs"])}
    args = [a.format(**vals) for a in template]
    assert_one_line_error(run(args), args)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), list((tmp_path / "out").rglob("*"))


def test_sample_bad_seed_writes_nothing_and_the_fixed_rerun_works(w, tmp_path):  # noqa: F811
    base = ["sample", "--dit", w["dit"], "--vae", w["vae"], "--decoder", w["dec"], "--out", tmp_path / "s",
            "--device", "cpu", "-n", "2", "-c", "0"]
    line = assert_one_line_error(run([*base, "--seed", "-3"]), base)
    assert "--seed -3" in line and not (tmp_path / "s").exists()
    r = run([*base, "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["identity"]["seed"] == 3


def test_real_processes_print_no_traceback(cli, bad, tmp_path):
    for args in (["train-vae", "--preset", "tiny-vae", "--features", bad["junk"], "--out", tmp_path / "o"],
                 ["extract", bad["junk"], tmp_path / "o", "--encoder", "tiny", "--device", "cpu"],
                 ["sample", "--dit", bad["file"], "--decoder", bad["file"]]):
        p = cli(*args, check=False)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.strip().splitlines()[-1].startswith("flatdino: error:"), p.stderr


@pytest.mark.parametrize("args", [
    ["presets", "show", "NOPE"],
    ["presets", "show", "tiny-vae", "--set", "nope=1"],
    ["workspace", "set", "nope", "x"],
    ["--workspace", "{F}", "workspace"],  # the sub-apps' listing callbacks go through the wrapper too
    ["--workspace", "{F}", "workspace", "set", "decoder", "x"],
], ids=" ".join)
def test_presets_and_workspace_errors_are_one_line(args, bad, monkeypatch):
    # --workspace sets FLATDINO_WORKSPACE for the process (child processes inherit it): restored afterwards,
    # so the file given here does not become the workspace of every later test
    monkeypatch.setenv("FLATDINO_WORKSPACE", str(bad["root"]))
    args = [str(bad["file"]) if a == "{F}" else a for a in args]
    line = assert_one_line_error(run(args), args)
    assert line.startswith("flatdino: error:"), line


def test_presets_show_of_no_preset_is_one_line_in_a_real_process():
    from conftest import run_cli_process

    p = run_cli_process("presets", "show", "NOPE", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines() == ["flatdino: error: --preset NOPE: no such preset (run `flatdino presets` "
                                             "to list them)"]


@pytest.mark.parametrize("command,preset,wanted", [
    ("train-vae", "tiny-dit", "a vae-* preset"),
    ("train-dit", "tiny-decoder", "a DiT preset (xl-32x128, ...)"),
    ("train-decoder", "tiny-vae", "decoder-xl, tiny-decoder, ..."),
])
def test_train_commands_refuse_another_stages_preset_before_anything_else(command, preset, wanted, tmp_path):
    """The train commands' shared start checks the preset's stage first: one line, and no run dir made."""
    args = [command, "--preset", preset, "--out", tmp_path / "run", "--device", "cpu", "--epochs", "1",
            *(["--images", tmp_path / "none"] if command == "train-decoder" else [])]
    stage = preset.removeprefix("tiny-")
    line = assert_one_line_error(run(args), args)
    assert line == f"flatdino: error: --preset {preset}: is a {stage} preset; {command} needs {wanted}"
    assert not (tmp_path / "run").exists()
