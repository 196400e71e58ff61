"""Discovery files: the streaming reader gives what np.load gives, for CSR, dense and compressed files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse

from saeforge.discover.files import FRAGMENT_FIELDS, activation_file_name, open_activations, read_activations, write_activations
from tests.discover.test_analyze import make_activations, planted_sentences


@pytest.mark.parametrize("layout", ["csr", "dense", "compressed"])
def test_streamed_file_equals_loaded_file(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(0)
    sentences, labels = planted_sentences(12, rng)
    acts = make_activations(sentences, labels, rng, 24, 5, 2, 8, sparse=layout == "csr")
    path = tmp_path / activation_file_name(2, 8)
    if layout == "compressed":  # as the reference script may write it
        np.savez_compressed(path, activations=acts.activations, layer=2, average_l0=8.0, num_features=24,
                            **{name: getattr(acts, name) for name in FRAGMENT_FIELDS})
    else:
        write_activations(path, acts)
    loaded = read_activations(path)
    with open_activations(path) as streamed:
        assert streamed.shape == loaded.shape and streamed.is_sparse == loaded.is_sparse
        assert (streamed.layer, streamed.average_l0, streamed.num_features) == (2, 8.0, 24)
        for block_nonzeros in (1, 30, 10**6):
            blocks = list(streamed.blocks(block_nonzeros))
            assert [start for start, _ in blocks] == list(np.cumsum([0] + [b.shape[0] for _, b in blocks[:-1]]))
            rows = [b.toarray() if scipy.sparse.issparse(b) else b for _, b in blocks]
            assert np.array_equal(np.concatenate(rows), loaded.dense())
        pick = np.asarray([5, 0, 5, len(acts.fragments) - 1, 3])
        for name in FRAGMENT_FIELDS:
            assert np.array_equal(streamed.field(name), getattr(loaded, name)), name
            assert np.array_equal(streamed.rows(name, pick), getattr(loaded, name)[pick]), name
            assert np.array_equal(streamed.rows(name, pick, block_rows=2), getattr(loaded, name)[pick]), name


def test_missing_field_is_named(tmp_path: Path) -> None:
    path = tmp_path / activation_file_name(0, 4)
    np.savez(path, activations=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="missing field"):
        open_activations(path)
