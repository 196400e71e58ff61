"""The concept CSV is checked before any model loads: each bad case gets its one-line error."""

from __future__ import annotations

import logging

import pytest

from saeforge.config import ConfigError
from saeforge.discover.concepts import read_concepts


def write(tmp_path, text: str):
    path = tmp_path / "c.csv"
    path.write_text(text)
    return path


def test_a_good_file_reads_in_order(tmp_path):
    got = read_concepts(write(tmp_path, 'sentence,concept_strength_label\n"I kicked it, hard.",3\nHello there,0\nOk,1.0\n'))
    assert got.sentences == ["I kicked it, hard.", "Hello there", "Ok"] and got.labels == [3, 0, 1]
    assert got.duplicates == 0 and len(got.sha256) == 64


@pytest.mark.parametrize("text, message", [
    ("sentence,label\nhi,1\n", "missing column 'concept_strength_label'"),
    ("text,concept_strength_label\nhi,1\n", "missing column 'sentence'"),
    ("sentence,concept_strength_label\nhi,1\nyo,high\n", "row 3: concept_strength_label='high' is not an integer"),
    ("sentence,concept_strength_label\nhi,1.5\nyo,0\n", "row 2: concept_strength_label='1.5' is not an integer"),
    ("sentence,concept_strength_label\nhi,1\nyo,4\n", "row 3: concept_strength_label=4 is outside 0–3"),
    ("sentence,concept_strength_label\nhi,-1\nyo,0\n", "row 2: concept_strength_label=-1 is outside 0–3"),
    ("sentence,concept_strength_label\nhi,1\n  ,0\n", "row 3: empty sentence"),
    ("sentence,concept_strength_label\nhi,2\nyo,2\n", "fewer than two distinct labels"),
    ("sentence,concept_strength_label\n", "no data rows"),
])
def test_each_bad_case_gets_its_error(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        read_concepts(write(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(tmp_path / "c.csv") in str(err.value)


def test_duplicates_warn_with_their_count(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="saeforge.discover.concepts"):
        got = read_concepts(write(tmp_path, "sentence,concept_strength_label\na,0\nb,1\na,2\na,0\nb,3\n"))
    assert got.duplicates == 3 and len(got.sentences) == 5
    assert "3 duplicated sentence(s)" in caplog.text


def test_a_missing_file_names_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="concepts=.*no such file"):
        read_concepts(tmp_path / "nope.csv")
