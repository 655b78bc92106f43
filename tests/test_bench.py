"""bench/gpu.sh --cpu-smoke: the GPU bench script runs end to end at tiny sizes on the CPU and prints
every figure it promises (so it cannot rot before someone runs it on a GPU). Nothing here is timed."""

import os
import subprocess

from conftest import ROOT


def test_gpu_bench_script_cpu_smoke():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--cpu-smoke"], capture_output=True, text=True,
                       timeout=1200, env=env, cwd=ROOT)
    out = r.stdout
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for line in ["MFU", "first step", "measured speedup (samples/s, FlatDINO 32 x 128 over RAE 256 x 768)",
                 "analytic pipeline FLOPs ratio", "time: dit", "vae_decoder", "pixel_decoder",
                 "images/s per CPU core", "batched on cpu", "=== done"]:
        assert line in out, line
    assert out.count("measured matmul rate") >= 4 and out.count("peak memory") >= 4
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--bogus"], capture_output=True, text=True,
                       timeout=60, env=env, cwd=ROOT)
    assert r.returncode == 2 and "usage" in r.stderr
