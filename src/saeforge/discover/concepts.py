"""Read and check a labelled concept CSV (columns `sentence`, `concept_strength_label` 0–3) before any model loads.

Errors are one line naming the file, the row (1-based data row, as a spreadsheet shows it: the header is
row 1) and the problem: a missing column, a label that is not an integer or lies outside 0–3, an empty
sentence, fewer than two distinct labels. Duplicated sentences only warn, with their count.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from saeforge.config import ConfigError

log = logging.getLogger(__name__)
SENTENCE, LABEL = "sentence", "concept_strength_label"
LABELS = (0, 1, 2, 3)


@dataclass(frozen=True)
class ConceptSentences:
    """The sentences of a concept CSV, in file order, with their 0–3 labels."""

    sentences: list[str]
    labels: list[int]
    sha256: str
    """Hash of the file's bytes (part of an extraction's fingerprint)."""
    duplicates: int
    """Rows whose sentence already appeared earlier in the file."""


def _label(raw: str | None, where: str) -> int:
    text = (raw or "").strip()
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {LABEL}={text!r} is not an integer (expected 0, 1, 2 or 3)") from None
    if not value.is_integer():
        raise ConfigError(f"{where}: {LABEL}={text!r} is not an integer (expected 0, 1, 2 or 3)")
    if int(value) not in LABELS:
        raise ConfigError(f"{where}: {LABEL}={int(value)} is outside 0–3")
    return int(value)


def read_concepts(path: str | Path) -> ConceptSentences:
    """Read and validate a concept CSV; raises ConfigError (one line) on the first bad row."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"concepts={str(path)!r}: no such file (a CSV with columns {SENTENCE},{LABEL})")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err})") from None
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in (SENTENCE, LABEL) if c not in columns]
    if missing:
        raise ConfigError(f"{path}: missing column {missing[0]!r} (found columns {columns}; "
                          f"expected {SENTENCE},{LABEL})")
    reader.fieldnames = columns
    sentences: list[str] = []
    labels: list[int] = []
    for i, row in enumerate(reader, start=2):
        where = f"{path} row {i}"
        sentence = (row.get(SENTENCE) or "").strip()
        if not sentence:
            raise ConfigError(f"{where}: empty sentence")
        labels.append(_label(row.get(LABEL), where))
        sentences.append(sentence)
    if not sentences:
        raise ConfigError(f"{path}: no data rows")
    distinct = sorted(set(labels))
    if len(distinct) < 2:
        raise ConfigError(f"{path}: fewer than two distinct labels (all rows are {LABEL}={distinct[0]}); "
                          "nothing can be ranked against one label")
    duplicates = sum(n - 1 for n in Counter(sentences).values() if n > 1)
    if duplicates:
        log.warning("%s: %d duplicated sentence(s) (rows repeating an earlier sentence); each is kept as its own row",
                    path, duplicates)
    return ConceptSentences(sentences, labels, hashlib.sha256(data).hexdigest(), duplicates)
