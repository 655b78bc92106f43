"""The embedded toy dataset: class layout, determinism, resumable writing, shape-not-colour labels."""

import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np

from flatdino_cli.toydata import CLASS_NAMES, render, render_with_mask, write_toy_dataset


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_classes_and_id_order():
    assert len(CLASS_NAMES) >= 10
    assert sorted(CLASS_NAMES) == CLASS_NAMES  # ImageFolder's sorted order is the class id
    assert all(name.startswith(f"{i:02d}_") for i, name in enumerate(CLASS_NAMES))
    # every colour family comes with several shapes, and every shape with several colours
    by_colour, by_shape = defaultdict(set), defaultdict(set)
    for name in CLASS_NAMES:
        _, colour, shape = name.split("_")
        by_colour[colour].add(shape)
        by_shape[shape].add(colour)
    assert min(len(s) for s in by_colour.values()) >= 3
    assert min(len(s) for s in by_shape.values()) >= 2


def test_render_deterministic_and_sized():
    a = render(3, 7, size=48, seed=0)
    assert a.mode == "RGB" and a.size == (48, 48)
    assert a.tobytes() == render(3, 7, size=48, seed=0).tobytes()
    assert a.tobytes() != render(3, 7, size=48, seed=1).tobytes()
    assert a.tobytes() != render(3, 8, size=48, seed=0).tobytes()
    assert a.tobytes() != render(3, 7, size=48, seed=0, split="val").tobytes()
    assert render(0, 0, size=40).size == (40, 40)


def test_write_is_deterministic_and_resumable(tmp_path):
    s = write_toy_dataset(tmp_path / "a", per_class=3, size=32, seed=5, progress=False)
    assert s["count"] == 3 * len(CLASS_NAMES) and s["classes"] == len(CLASS_NAMES) and s["written"] == s["count"]
    full = _tree_digest(tmp_path / "a")
    assert len(full) == s["count"] and not any(k.endswith(".tmp") for k in full)
    assert sorted({k.split("/")[0] for k in full}) == CLASS_NAMES

    # delete some files, rerun: only those are written, the tree ends identical
    victims = sorted((tmp_path / "a").rglob("*.png"))[::7]
    for p in victims:
        p.unlink()
    s2 = write_toy_dataset(tmp_path / "a", per_class=3, size=32, seed=5, progress=False)
    assert s2["written"] == len(victims) and s2["existing"] == s["count"] - len(victims)
    assert _tree_digest(tmp_path / "a") == full

    write_toy_dataset(tmp_path / "b", per_class=3, size=32, seed=5, progress=False)
    assert _tree_digest(tmp_path / "b") == full  # a fresh run gives the same bytes
    write_toy_dataset(tmp_path / "c", per_class=3, size=32, seed=6, progress=False)
    assert _tree_digest(tmp_path / "c") != full
    sv = write_toy_dataset(tmp_path / "a", per_class=1, size=32, seed=5, split="val", progress=False)
    assert Path(sv["root"]) == tmp_path / "a" / "val" and (tmp_path / "a" / "val" / CLASS_NAMES[0] / "00000.png").exists()


def test_mean_colour_does_not_name_the_class():
    """A nearest-mean-colour classifier must fail often: classes differ by shape within a colour."""
    feats = lambda idx: np.array([[np.asarray(render(c, i), np.float32).mean((0, 1)) for i in idx]
                                  for c in range(len(CLASS_NAMES))])  # (K, n, 3)
    train, test = feats(range(20)), feats(range(20, 40))
    centroids = train.mean(1)  # (K, 3)
    d = ((test[:, :, None, :] - centroids[None, None]) ** 2).sum(-1)  # (K, n, K)
    acc = (d.argmin(-1) == np.arange(len(CLASS_NAMES))[:, None]).mean()
    assert acc < 0.7, acc
    assert acc > 1.5 / len(CLASS_NAMES)  # but colour is informative (the families are real)


def test_object_spans_several_patches():
    widths, areas = [], []
    for c in range(len(CLASS_NAMES)):
        for i in range(8):
            _, mask = render_with_mask(c, i, size=48)
            cols = np.flatnonzero(mask.max(0) > 0.5)
            rows = np.flatnonzero(mask.max(1) > 0.5)
            widths.append(max(cols[-1] - cols[0], rows[-1] - rows[0]) + 1)
            areas.append(mask.mean())
    widths = np.array(widths) / 48
    assert widths.min() >= 0.3 and widths.max() <= 0.9, (widths.min(), widths.max())
    assert 0.4 <= np.median(widths) <= 0.8
    assert np.min(areas) > 0.04 and np.median(areas) > 0.12


def test_background_is_grey():
    """Background texture is luminance only: pixels the object does not touch have R == G == B (±1)."""
    img, mask = render_with_mask(4, 2, size=48)
    a = np.asarray(img).astype(int)[mask == 0]  # (P, 3)
    assert len(a) > 100
    assert np.abs(a - a.mean(1, keepdims=True)).max() <= 1
    assert a.std() > 1  # and it is textured, not flat
