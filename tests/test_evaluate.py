"""fd_rep (evaluate.py): reference statistics cached with their store's identity and refused for another."""

import shutil

import numpy as np
import pytest

from flatdino_cli.errors import UserError
from flatdino_cli.evaluate import REFERENCE_FILE, fd_rep, reference_stats, rep_vectors


def test_reference_is_cached_and_refused_for_another_store(toy_features, tmp_path):
    val = tmp_path / "val"
    shutil.copytree(toy_features / "val", val)
    ref = reference_stats(val)
    assert (val / REFERENCE_FILE).is_file()
    again = reference_stats(val)  # read back from the cache
    np.testing.assert_array_equal(again.gaussian.mu, ref.gaussian.mu)
    # the reference's own rows are at distance ~0 from it; shuffled grids are not
    data = np.load(val / "data.npy").astype(np.float32)
    own = rep_vectors(data, ref.pca_mean, ref.pca_basis)
    assert abs(fd_rep(own, ref)) < 1e-6
    shuffled = data[:, np.random.default_rng(0).permutation(data.shape[1])]
    assert fd_rep(rep_vectors(shuffled, ref.pca_mean, ref.pca_basis), ref) > 1e-3
    other = tmp_path / "train"
    shutil.copytree(toy_features, other, ignore=shutil.ignore_patterns("val"))
    shutil.copy(val / REFERENCE_FILE, other / REFERENCE_FILE)  # a cache made for the val store
    with pytest.raises(UserError) as e:
        reference_stats(other)
    assert "another store" in str(e.value) and "\n" not in str(e.value)
