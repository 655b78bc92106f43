"""The runtime (runtime.py): a device we do not support is one line, and every library entry point given
no runtime defaults to the one CPU runtime."""


def test_device_mps_is_one_line(cli, tmp_path):
    p = cli("train-vae", "--preset", "tiny-vae", "--features", tmp_path, "--out", tmp_path / "run",
            "--device", "mps", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "--device mps" in p.stderr


def test_library_calls_default_to_the_one_cpu_runtime():
    """One CPU runtime constant (runtime.CPU): the default of every library entry point given none."""
    import inspect

    from flatdino_cli.analysis import ablate, knn, noise, pca, redundancy
    from flatdino_cli.reconstruct import run_reconstruct
    from flatdino_cli.runtime import CPU
    from flatdino_cli.sample import generate, run_sample, write_sample_set

    assert all(inspect.signature(f).parameters["rt"].default is CPU
               for f in (run_reconstruct, generate, run_sample, write_sample_set))
    assert all(m.CPU is CPU for m in (ablate, knn, noise, pca, redundancy))  # their `rt or CPU`
    assert (CPU.device.type, CPU.precision, CPU.compile) == ("cpu", "fp32", False)
