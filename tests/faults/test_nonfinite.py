"""An all-NaN input with data.skip_nonfinite=true fails with a clear error naming the file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from saeforge.sae.datamodule import ActivationDataModule


def test_all_nan_h5_names_the_file_and_says_no_finite_rows_are_left(tmp_path) -> None:
    path = tmp_path / "all_nan.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("activations", data=np.full((300, 8), np.nan, dtype=np.float32))
    cfg = {"batch_size": 32, "shuffle_buffer": 128, "read_rows": 100, "skip_nonfinite": True}
    dm = ActivationDataModule(cfg, str(path), None, seed=0)
    with pytest.raises(ValueError, match=r"all_nan\.h5.*no finite rows left"):
        dm.setup()
    with pytest.raises(ValueError, match=r"all_nan\.h5.*no finite rows left"):
        ActivationDataModule(cfg, str(path), None, seed=0).sample_rows(16)  # what training calls first
