"""`flatdino quickstart` end to end on CPU: killed mid-way and rerun, it finishes without redoing
finished stages, and a CNN trained on unseen real toy images (>= 95% on real test images, or it
proves nothing) names the generated samples far above chance (1/12); the same for `--laminator fae`.

Both quickstarts run in the background from the start of the session, beside the other tests
(quickstart_jobs.py; conftest starts them and runs these tests last). The flat one runs with
its presets' own settings: FLAT_SETS only makes its DiT keep a checkpoint, and log fd_rep, at every
fifth of its steps (for the Spearman test; the evaluations add two of 48 samples to the preset's three
and change no weight). The FAE one runs with half its VAE epochs (FAE_SETS). Both share the toy data
and the judge; each extracts its own encoder's features (flat: tiny-p4, FAE: tiny).

Measured (600 samples; tiny-p4 features, tiny-vae 48 epochs on 2 x 2 blocks, tiny-dit at w = 4 on
[0, 1]): the 2-core quickstart 86.7%, whole chains of seeds 1 / 2 (one thread) 89.5 / 86.8%; the
previous default, `--encoder tiny`, measured 81.5-86.5% over trainings and seeds (README, quickstart
section). The shortened FAE quickstart of FAE_SETS: see its bar.
Training on another CPU rounds differently (MKL picks kernels by machine), and trainings differ by a
few points: the bars sit below the lowest measured value, and the printed number says where a machine stands."""

import contextlib
import json
import shlex
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from conftest import run_cli
from quickstart_jobs import DIT_STEPS, FLAT_SETS, env, tail

FLAT_SAMPLE_BAR, FAE_SAMPLE_BAR = 0.80, 0.65  # see the module docstring: flat measured 0.867-0.895


@contextlib.contextmanager
def one_thread():
    """As the background quickstarts run: one intra-op thread (their models are tiny)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def last_val_cosine(run) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["val/cosine"] for r in rows if "val/cosine" in r][-1]


def mean_feature_cosine(store) -> float:
    """Validation cosine of predicting every image's features by the training mean."""
    mean = torch.from_numpy(np.load(store / "data.npy").astype(np.float32).mean(0))  # (P, C)
    val = torch.from_numpy(np.load(store / "val" / "data.npy").astype(np.float32))  # (N, P, C)
    return F.cosine_similarity(val, mean.expand_as(val), dim=-1).mean().item()


def test_quickstart_resumes_and_samples_are_recognisable(quickstarts):
    """The flat quickstart, killed during train-vae and rerun (in the background, quickstart_jobs.py)."""
    jobs, out = json.loads((quickstarts / "jobs.json").read_text()), quickstarts / "qs"
    log = (quickstarts / "qs.log").read_text()  # the rerun's whole output
    assert jobs.get("flat_rc") == 0, f"{jobs}\n{log[-3000:]}\n{tail(quickstarts / 'jobs.log')}"
    assert jobs["killed_mid_vae"], "the first run was not killed during train-vae"
    for stage in ("toy-data", "extract"):
        assert f"{stage}: done earlier, skipped" in log
    assert "resuming" in log  # train-vae continued from its checkpoint
    summary = json.loads((out / "summary.json").read_text())
    cls = next(s for s in summary["stages"] if s["stage"] == "classifier")
    print(f"quickstart rerun {jobs['flat_rerun_seconds']:.0f} s; classifier real {cls['real_test_accuracy']:.3f}, "
          f"samples {cls['sample_accuracy']:.3f}")
    assert cls["real_test_accuracy"] >= 0.95, "the judge cannot name real images: it proves nothing"
    assert cls["sample_accuracy"] >= FLAT_SAMPLE_BAR
    # the laminator's acceptance number, on the quickstart's own VAE run (tiny-vae as it stands)
    vae_cos = last_val_cosine(out / "vae")
    mean_cos = mean_feature_cosine(out / "features")
    print(f"tiny VAE val feature cosine {vae_cos:.3f}; predict-the-mean baseline {mean_cos:.3f}")
    assert vae_cos >= 0.9 and vae_cos >= mean_cos + 0.15
    for f in ("samples/grid.png", "reconstruct/reconstruct.json", "ablate/token_ablation.png", "flops.txt"):
        assert (out / f).is_file(), f
    shown = (out / "reconstruct-images.txt").read_text().split()  # the reconstruction grid: two of every class
    assert len(shown) == 24 and len({Path(f).parent.name for f in shown}) == 12

    r = run_cli("quickstart", "--out", out, *FLAT_SETS, env=env(quickstarts))  # everything done: all stages skipped
    assert r.stdout.count("done earlier, skipped") + r.stderr.count("done earlier, skipped") == len(summary["stages"])
    again = json.loads((out / "summary.json").read_text())  # the stages' own times survive a no-op rerun
    assert again["stage_minutes"] == summary["stage_minutes"] > 1 and again["minutes"] < 1


def test_quickstart_printed_lines_run_as_typed_in_its_folder(quickstarts):
    """The quickstart ends by printing the toolkit's three command lines for its own folder (a
    workspace); each runs exactly as printed there. Reuses the flat quickstart's folder (a no-op rerun)."""
    flat_out = quickstarts / "qs"
    r = run_cli("quickstart", "--out", flat_out, *FLAT_SETS, timeout=1200, env=env(quickstarts))
    printed = r.stdout.splitlines()
    tail = printed[next(i for i, line in enumerate(printed) if "is a workspace" in line) + 1:]
    assert tail[0].strip().startswith("cd ") and Path(tail[0].strip()[3:]).resolve() == flat_out.resolve()
    lines = [line.strip() for line in tail[1:]]
    assert lines == ["flatdino sample --class 3 --cfg 4", "flatdino ablate-tokens",
                     "flatdino train-dit --preset tiny-dit --set train.epochs=1"]
    said = [run_cli(*shlex.split(line)[1:], cwd=flat_out, timeout=1200, env=env(quickstarts)).stdout for line in lines]
    assert "sample: dit dit (step" in said[0] and "decoder decoder (step" in said[0]
    assert list((flat_out / "dit" / "samples").glob("3-*/grid.png"))
    assert "ablate-tokens: vae vae (step" in said[1] and "features/val" in said[1]
    assert (flat_out / "vae" / "analysis" / "ablation" / "heatmaps.npy").is_file()
    assert "train-dit: latents latents" in said[2] and "new run runs/dit-tiny-dit" in said[2]
    assert (flat_out / "runs" / "dit-tiny-dit" / "finished.json").is_file()


def test_quickstart_fae_mode_samples_are_recognisable(quickstarts):
    """`--laminator fae`: per-patch FAE latents, a grid DiT (2x2 cells per token), the same judge."""
    jobs, out = json.loads((quickstarts / "jobs.json").read_text()), quickstarts / "qsfae"
    assert jobs.get("fae_rc") == 0, f"{jobs}\n{tail(quickstarts / 'qsfae.log')}"
    summary = json.loads((out / "summary.json").read_text())
    cls = next(s for s in summary["stages"] if s["stage"] == "classifier")
    vae_cos = last_val_cosine(out / "vae")
    print(f"fae quickstart {summary['minutes']} min; FAE val cosine {vae_cos:.3f}; classifier real "
          f"{cls['real_test_accuracy']:.3f}, samples {cls['sample_accuracy']:.3f}")
    assert cls["real_test_accuracy"] >= 0.95
    assert vae_cos >= 0.95
    assert cls["sample_accuracy"] >= FAE_SAMPLE_BAR


def spearman(a, b) -> float:
    """Spearman's rank correlation, 1 - 6 sum d^2 / (n (n^2 - 1)) (ties broken by order)."""
    ra, rb = (np.argsort(np.argsort(np.asarray(x))) for x in (a, b))
    n = len(ra)
    return 1 - 6 * float(((ra - rb) ** 2).sum()) / (n * (n * n - 1))


def test_fd_rep_ranks_checkpoints_as_the_toy_classifier_does(quickstarts, monkeypatch):
    """fd_rep_nocfg, as train-dit logged it (48 samples, no pixels), against the judge's accuracy on 144
    unguided decoded samples of each kept checkpoint of the flat quickstart's DiT (FLAT_SETS keeps five):
    lower fd_rep should go with higher accuracy (Spearman >= 0.8). Reuses the flat quickstart's folder.
    Measured on the earlier 1,260-step DiT (batch 64): Spearman 0.9 (1.0 against guided samples' accuracy). The guided fd_rep at the preset's w = 6
    is not asserted: on the half-trained checkpoint of step 504 it rose (13.9 from 11.5) while the
    accuracy of guided samples doubled, strong guidance on a young model leaving the feature
    distribution (the FD-vs-guidance trade-off); from step 756 on it falls with the accuracy."""
    from flatdino_cli.analysis.toy_classifier import cached_toy_classifier, predict
    from flatdino_cli.checkpoint import kept_checkpoints
    from flatdino_cli.evaluate import FD_REP, FD_REP_NOCFG, unguided
    from flatdino_cli.pipeline.generate import generate
    from flatdino_cli.pipeline.load import load_pipeline
    from flatdino_cli.rundir import read_metrics

    flat_out = quickstarts / "qs"
    dit = flat_out / "dit"
    logged = {r["step"]: (r[FD_REP], r[FD_REP_NOCFG]) for r in read_metrics(dit) if FD_REP in r}
    kept = kept_checkpoints(dit)
    steps = [int(k.split("-")[1]) for k in kept]
    assert steps == sorted(logged) == [DIT_STEPS // 5 * k for k in range(1, 6)]
    monkeypatch.setenv("XDG_CACHE_HOME", env(quickstarts)["XDG_CACHE_HOME"])
    judge, _ = cached_toy_classifier(size=48, seed=0)
    labels = [i % 12 for i in range(144)]
    accuracy = []
    with one_thread():
        for which in kept:
            pipe = load_pipeline(dit, flat_out / "vae", flat_out / "decoder", which=which)
            images = generate(pipe, labels, list(range(144)), seed=1, flow=unguided(pipe.cfg.flow), batch_size=144)
            accuracy.append(float((predict(judge, images) == np.array(labels)).mean()))
    nocfg = [logged[s][1] for s in steps]
    rho = spearman([-x for x in nocfg], accuracy)
    print(f"fd_rep {[round(logged[s][0], 3) for s in steps]}; fd_rep_nocfg {[round(x, 3) for x in nocfg]}; "
          f"judge accuracy (unguided) {[round(a, 3) for a in accuracy]}; Spearman {rho:.2f}")
    assert rho >= 0.8 - 1e-9  # 0.8 exactly is two adjacent swaps of five
