import os
import stat

import numpy as np
import pytest

from flatdino_cli.config_yaml import load_preset, save_config
from flatdino_cli.toydata import write_toy_dataset
from flatdino_cli.utils import atomic_write, atomic_write_bytes, atomic_write_json
from flatdino_cli.viz import save_png


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def mode(p):
    return stat.S_IMODE(p.stat().st_mode)


def test_every_writer_gives_files_the_umask_mode_not_mkstemps_0600(tmp_path, umask):
    # json (manifests, samples.json), config.yaml, PNGs and the toy data all go through one writer
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    save_config(load_preset("tiny-vae"), tmp_path / "config.yaml")
    save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "x.png")
    write_toy_dataset(tmp_path / "toy", per_class=1, size=8, progress=False)
    files = [tmp_path / "m.json", tmp_path / "config.yaml", tmp_path / "x.png", *(tmp_path / "toy").rglob("*.png")]
    assert len(files) > 4 and {mode(p) for p in files} == {0o644}
    umask(0o077)  # a private umask is respected, not widened
    atomic_write_bytes(tmp_path / "private.bin", b"x", durable=False)
    assert mode(tmp_path / "private.bin") == 0o600


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_bytes(target, b"old")

    def half(f):
        f.write(b"ne")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, half)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_one_square_grid_check_everywhere():
    """grid_side is the one square-grid check: the decoder config and the FAE model refuse a non-square
    token count with its one-line message naming where."""
    from flatdino_cli.config import DecoderModelConfig
    from flatdino_cli.errors import UserError
    from flatdino_cli.models import build_model
    from flatdino_cli.utils import grid_side

    assert grid_side(256) == 16 and grid_side(36, "x") == 6
    with pytest.raises(UserError, match=r"^x: 15 tokens do not form a square grid$"):
        grid_side(15, "x")
    with pytest.raises(UserError, match=r"^config: model.num_patches: 15 tokens"):
        DecoderModelConfig(num_patches=15)
    with pytest.raises(UserError, match=r"^FAE: model.num_patches: 15 tokens"):
        build_model(load_preset("tiny-fae", ["model.feature_dim=16", "model.num_patches=15"]))


def test_one_comma_list_parser():
    from flatdino_cli.errors import UserError
    from flatdino_cli.utils import comma_list

    assert comma_list("10, 20,,100", "--k", int) == [10, 20, 100]
    assert comma_list("0.1,1", "--sigmas", float) == [0.1, 1.0]
    assert comma_list(" red circle ,blue square", "--classes") == ["red circle", "blue square"]
    assert comma_list(",", "--classes", allow_empty=True) == []
    with pytest.raises(UserError, match=r"^--batches '1,x': expected comma-separated numbers"):
        comma_list("1,x", "--batches", int)
    with pytest.raises(UserError, match=r"^--k: give at least one value$"):
        comma_list(" , ", "--k", int)


