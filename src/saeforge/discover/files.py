"""The only reader and writer of concept-discovery files in an output folder.

- `layer_{L}_l0_{L0}_activations.npz`, one per SAE configuration, with the reference's fields:
  `activations` [n_fragments, d_sae] float32, `fragments`, `original_sentences`,
  `concept_strength_labels`, `sentence_indices`, `token_positions`, `is_final_token`,
  `fragment_lengths` (words), `layer`, `average_l0`, `num_features`. The CSR layout stores
  `activations_data`, `activations_indices`, `activations_indptr` and `activations_shape` (the parts
  of a `scipy.sparse.csr_matrix`) in place of `activations`. Files are written byte-deterministically
  (fixed zip timestamps), so a resumed run gives the same bytes as an uninterrupted one.
- `batch_progress.json`: `{"last_completed": i}`, the index of the last finished configuration.
- Analysis outputs: `ranking.csv` (RANKING_COLUMNS first, then extra statistics), `top_features.json`
  (each top feature's statistics, per-label sentence activations, top sentences and fragments, and the
  interpret commands) and `concepts_report.html` (written by report/concepts.py at `report_path`).
- `configurations.json`: the resolved SAE set, one entry per configuration in order (`index`, `file`,
  `hookpoint`, `layer`, `l0`, `average_l0`, `source`, `local`, `neuronpedia_id`, `d_in`, `d_sae`) and
  the extraction's `fingerprint` (inputs that decide the files' content; a rerun with other inputs
  refuses to continue). The analysis reads the Neuronpedia ids from it.
"""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import scipy.sparse

from saeforge.atomic import atomic_path, atomic_write_json, atomic_write_text

PROGRESS_FILE = "batch_progress.json"
CONFIGURATIONS_VERSION = 1
FRAGMENT_FIELDS = ("fragments", "original_sentences", "concept_strength_labels", "sentence_indices",
                   "token_positions", "is_final_token", "fragment_lengths")
CSR_PARTS = ("data", "indices", "indptr", "shape")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_FILE_PATTERN = re.compile(r"^layer_(\d+)_l0_(.+)_activations\.npz$")
RANKING_FILE = "ranking.csv"
RANKING_COLUMNS = ("sae", "layer", "l0", "feature", "spearman", "auroc_ge1", "auroc_ge2", "auroc_ge3",
                   "selectivity", "monotonic", "p", "q", "neuronpedia_url")
"""The reference's ranking columns, in order; extra columns follow them."""
TOP_FEATURES_FILE = "top_features.json"
CONFIGURATIONS_FILE = "configurations.json"
REPORT_FILE = "concepts_report.html"


@dataclass
class ConceptActivations:
    """One SAE configuration's activations over every fragment (one row per sentence prefix)."""

    activations: np.ndarray | scipy.sparse.csr_matrix
    fragments: np.ndarray
    original_sentences: np.ndarray
    concept_strength_labels: np.ndarray
    sentence_indices: np.ndarray
    token_positions: np.ndarray
    is_final_token: np.ndarray
    fragment_lengths: np.ndarray
    layer: int
    average_l0: float
    num_features: int

    @property
    def is_sparse(self) -> bool:
        return scipy.sparse.issparse(self.activations)

    def dense(self) -> np.ndarray:
        """The activations as a dense float32 array (materialises a CSR file)."""
        acts = self.activations
        return np.asarray(acts.toarray() if scipy.sparse.issparse(acts) else acts, dtype=np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.activations.shape[0]), int(self.activations.shape[1]))

    def field(self, name: str) -> np.ndarray:
        """One per-fragment field (FRAGMENT_FIELDS), whole."""
        return np.asarray(getattr(self, name))

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """The entries of field `name` at fragment rows `index`, in that order."""
        return self.field(name)[np.asarray(index, dtype=np.int64)]

    def blocks(self, block_nonzeros: int) -> Iterator[tuple[int, np.ndarray | scipy.sparse.csr_matrix]]:
        """(first row, rows) of the activations, about `block_nonzeros` stored values at a time."""
        acts = scipy.sparse.csr_matrix(self.activations) if self.is_sparse else self.activations
        for start, stop in _row_cuts(acts.indptr if self.is_sparse else None, self.shape, block_nonzeros):
            yield start, acts[start:stop]


class ActivationFile:
    """A configuration file opened for streaming (`open_activations`), with ConceptActivations' reading
    interface (`shape`, `is_sparse`, `field`, `rows`, `blocks`) but nothing held in memory beyond the
    CSR row pointers: each call reads its npz member (stored or compressed) front to back."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._zip = zipfile.ZipFile(self.path)
        try:
            names = {n.removesuffix(".npy") for n in self._zip.namelist()}
            _check_fields(self.path, names)
            self.is_sparse = "activations" not in names
            if self.is_sparse:
                shape = tuple(int(s) for s in self._read("activations_shape"))
                self._indptr = self._read("activations_indptr").astype(np.int64)
            else:
                handle, shape, _ = self._open("activations")
                handle.close()
            if len(shape) != 2:
                raise ValueError(f"{self.path}: activations have shape {shape}, expected [n_fragments, d_sae]")
            self.shape = (int(shape[0]), int(shape[1]))
            self.layer = int(self._read("layer"))
            self.average_l0 = float(self._read("average_l0"))
            self.num_features = int(self._read("num_features"))
        except BaseException:
            self._zip.close()
            raise

    def __enter__(self) -> ActivationFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()

    def _open(self, name: str) -> tuple[Any, tuple[int, ...], np.dtype]:
        """The member's stream positioned at its data, its shape and dtype (C order, no objects)."""
        handle = self._zip.open(f"{name}.npy")
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(handle)
        if dtype.hasobject or (fortran_order and len(shape) > 1):
            handle.close()
            raise ValueError(f"{self.path}: field {name!r} is {'an object array' if dtype.hasobject else 'in Fortran order'}"
                             "; expected a plain C-order array")
        return handle, shape, dtype

    def _take(self, handle: Any, dtype: np.dtype, count: int, name: str) -> np.ndarray:
        data = handle.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise ValueError(f"{self.path}: field {name!r} is truncated")
        return np.frombuffer(data, dtype=dtype)

    def _read(self, name: str) -> np.ndarray:
        handle, shape, dtype = self._open(name)
        with handle:
            return self._take(handle, dtype, int(np.prod(shape, dtype=np.int64)), name).reshape(shape)

    def field(self, name: str) -> np.ndarray:
        """One per-fragment field (FRAGMENT_FIELDS), whole."""
        return self._read(name)

    def rows(self, name: str, index: np.ndarray, block_rows: int = 1 << 16) -> np.ndarray:
        """The entries of field `name` at fragment rows `index`, in that order, read a block at a time."""
        index = np.asarray(index, dtype=np.int64)
        wanted, inverse = np.unique(index, return_inverse=True)
        handle, shape, dtype = self._open(name)
        out = np.empty(wanted.size, dtype=dtype)
        with handle:
            if wanted.size and (wanted[0] < 0 or wanted[-1] >= shape[0]):
                raise IndexError(f"{self.path}: row {int(wanted[-1] if wanted[-1] >= shape[0] else wanted[0])} "
                                 f"outside field {name!r} of {shape[0]} rows")
            done = 0
            for start in range(0, int(wanted[-1]) + 1 if wanted.size else 0, block_rows):
                block = self._take(handle, dtype, min(block_rows, shape[0] - start), name)
                stop = int(np.searchsorted(wanted, start + block.size))
                out[done:stop] = block[wanted[done:stop] - start]
                done = stop
        return out[inverse]

    def blocks(self, block_nonzeros: int) -> Iterator[tuple[int, np.ndarray | scipy.sparse.csr_matrix]]:
        """(first row, rows) of the activations, about `block_nonzeros` stored values at a time, front to back."""
        n_rows, d = self.shape
        if not self.is_sparse:
            handle, _, dtype = self._open("activations")
            with handle:
                for start, stop in _row_cuts(None, self.shape, block_nonzeros):
                    yield start, self._take(handle, dtype, (stop - start) * d, "activations").reshape(stop - start, d)
            return
        data, _, data_dtype = self._open("activations_data")
        indices, _, index_dtype = self._open("activations_indices")
        with data, indices:
            for start, stop in _row_cuts(self._indptr, self.shape, block_nonzeros):
                indptr = self._indptr[start:stop + 1] - self._indptr[start]
                count = int(indptr[-1])
                yield start, scipy.sparse.csr_matrix(
                    (self._take(data, data_dtype, count, "activations_data"),
                     self._take(indices, index_dtype, count, "activations_indices"), indptr), shape=(stop - start, d))


def open_activations(path: str | Path) -> ActivationFile:
    """Open a configuration file (saeforge's or the reference's, dense or CSR) for streaming; use as a
    context manager."""
    return ActivationFile(path)


def _row_cuts(indptr: np.ndarray | None, shape: tuple[int, int], block_nonzeros: int) -> Iterator[tuple[int, int]]:
    """Consecutive row ranges of about `block_nonzeros` stored values (CSR: by its row pointers; dense:
    rows × d_sae), at least one row each."""
    n_rows, d = shape
    if indptr is None:
        step = max(1, block_nonzeros // max(d, 1))
        yield from ((start, min(start + step, n_rows)) for start in range(0, n_rows, step))
        return
    start = 0
    while start < n_rows:
        stop = int(np.searchsorted(indptr, indptr[start] + block_nonzeros, side="right")) - 1
        stop = min(max(stop, start + 1), n_rows)
        yield start, stop
        start = stop


def activation_file_name(layer: int, l0: int | float | str) -> str:
    """The reference's name of one configuration's file."""
    return f"layer_{layer}_l0_{l0}_activations.npz"


def activation_files(folder: str | Path) -> list[tuple[int, str, Path]]:
    """(layer, l0 as named, path) of every configuration file in `folder`, by layer then numeric l0."""
    found = []
    for path in Path(folder).glob("layer_*_l0_*_activations.npz"):
        match = _FILE_PATTERN.match(path.name)
        if match:
            found.append((int(match.group(1)), match.group(2), path))

    def l0_key(l0: str) -> tuple[float, str]:
        try:
            return float(l0), l0
        except ValueError:
            return float("inf"), l0

    return sorted(found, key=lambda item: (item[0], l0_key(item[1])))


def write_ranking(folder: str | Path, rows: list[dict]) -> Path:
    """Write `ranking.csv` atomically: RANKING_COLUMNS, then any extra keys of the rows (first row's order)."""
    extra = [k for k in (rows[0] if rows else {}) if k not in RANKING_COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*RANKING_COLUMNS, *extra], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = Path(folder) / RANKING_FILE
    atomic_write_text(path, buffer.getvalue())
    return path


def read_ranking(path: str | Path) -> list[dict[str, str]]:
    """The rows of a `ranking.csv` (a file or its folder), as strings, best first."""
    path = Path(path)
    path = path / RANKING_FILE if path.is_dir() else path
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in RANKING_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a concept ranking, missing column(s) {missing}")
        return list(reader)


def write_top_features(folder: str | Path, data: dict) -> Path:
    """Write `top_features.json` atomically."""
    path = Path(folder) / TOP_FEATURES_FILE
    atomic_write_json(path, data)
    return path


def read_top_features(folder: str | Path) -> dict:
    return json.loads((Path(folder) / TOP_FEATURES_FILE).read_text())


def report_path(folder: str | Path) -> Path:
    """Where the concept report of an analysis folder goes."""
    return Path(folder) / REPORT_FILE


def _fields(acts: ConceptActivations) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if acts.is_sparse:
        csr = scipy.sparse.csr_matrix(acts.activations, dtype=np.float32)
        out.update(activations_data=csr.data.astype(np.float32), activations_indices=csr.indices.astype(np.int32),
                   activations_indptr=csr.indptr.astype(np.int64), activations_shape=np.asarray(csr.shape, np.int64))
    else:
        out["activations"] = np.ascontiguousarray(acts.activations, dtype=np.float32)
    for name in FRAGMENT_FIELDS:
        out[name] = np.asarray(getattr(acts, name))
    out["layer"] = np.asarray(int(acts.layer))
    out["average_l0"] = np.asarray(float(acts.average_l0))
    out["num_features"] = np.asarray(int(acts.num_features))
    return out


def write_activations(path: str | Path, acts: ConceptActivations) -> None:
    """Write one configuration's `.npz` atomically and byte-deterministically (readable by np.load)."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in _fields(acts).items():
            if array.dtype == object:
                raise TypeError(f"{path}: field {name!r} has dtype object; use str or numeric arrays")
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            with zf.open(info, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, array, allow_pickle=False)


def _check_fields(path: str | Path, names: set[str]) -> None:
    missing = [n for n in (*FRAGMENT_FIELDS, "layer", "average_l0", "num_features") if n not in names]
    if "activations" not in names and not {f"activations_{p}" for p in CSR_PARTS} <= names:
        missing.insert(0, "activations")
    if missing:
        raise ValueError(f"{path}: not a concept-activation file, missing field(s) {missing}")


def read_activations(path: str | Path) -> ConceptActivations:
    """Read a configuration file written by saeforge or by the reference script (dense or CSR)."""
    with np.load(path, allow_pickle=False) as data:
        names = set(data.files)
        _check_fields(path, names)
        if "activations" in names:
            activations = data["activations"]
        else:
            shape = tuple(int(s) for s in data["activations_shape"])
            activations = scipy.sparse.csr_matrix(
                (data["activations_data"], data["activations_indices"], data["activations_indptr"]), shape=shape)
        return ConceptActivations(activations=activations, **{n: data[n] for n in FRAGMENT_FIELDS},
                                  layer=int(data["layer"]), average_l0=float(data["average_l0"]),
                                  num_features=int(data["num_features"]))


def read_progress(folder: str | Path) -> int:
    """Index of the last completed configuration, -1 when none (no or unreadable progress file)."""
    path = Path(folder) / PROGRESS_FILE
    try:
        return int(json.loads(path.read_text())["last_completed"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def write_progress(folder: str | Path, last_completed: int) -> None:
    """Record that configurations 0..last_completed are written (atomically)."""
    atomic_write_json(Path(folder) / PROGRESS_FILE, {"last_completed": int(last_completed)})


def write_configurations(folder: str | Path, fingerprint: str, configurations: list[dict[str, Any]]) -> None:
    """Record the resolved SAE set (one dict per configuration, in order) and the extraction's fingerprint."""
    atomic_write_json(Path(folder) / CONFIGURATIONS_FILE, {
        "format_version": CONFIGURATIONS_VERSION, "fingerprint": fingerprint, "configurations": configurations})


def read_configurations(folder: str | Path) -> dict[str, Any] | None:
    """`{"fingerprint": ..., "configurations": [...]}` of an output folder, None when there is none."""
    path = Path(folder) / CONFIGURATIONS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("configurations"), list):
        raise ValueError(f"{path}: expected an object with a `configurations` list")
    return data
