"""Corpora: `corpus.template` packs question + reasoning-trace tables into windows; bad templates fail clearly."""

from __future__ import annotations

import csv
import json

import pytest

from saeforge.activations.corpus import iter_texts, load_corpus
from saeforge.activations.extract import build_store, store_spec
from saeforge.activations.store import read_tokens
from saeforge.config import ConfigError
from saeforge.pipelines.validate import validate_train

TEMPLATE = "{question}\\n{reasoning}\\n{answer}"  # as typed on the command line


def rows(n: int = 60) -> list[dict[str, object]]:
    return [{"question": f"What is {i} plus {i}?", "reasoning": f"Adding {i} to itself doubles it.",
             "answer": 2 * i if i % 7 else None} for i in range(n)]


@pytest.fixture
def qa_jsonl(tmp_path):
    path = tmp_path / "s1k.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows()))
    return path


def test_template_fills_each_row_and_packs_into_windows(make_cfg, tiny_lm, qa_jsonl):
    cfg = make_cfg("corpus=files", f"corpus.data_files=[{qa_jsonl}]", f"corpus.template='{TEMPLATE}'")
    texts = list(iter_texts(load_corpus(cfg.corpus, qa_jsonl.parent), cfg.corpus.column))
    assert texts[1] == "What is 1 plus 1?\nAdding 1 to itself doubles it.\n2"
    assert texts[7] == "What is 7 plus 7?\nAdding 7 to itself doubles it.\n"  # a null cell gives ""
    store = build_store(cfg.model, cfg.corpus, cfg.data, lm=tiny_lm)
    decoded = tiny_lm.tokenizer.decode(read_tokens(store.root)[:3, 1:].flatten().tolist())  # windows without BOS
    assert "doubles it.\n<|eos|>What is 1 plus 1?\nAdding 1 to itself doubles it.\n2<|eos|>" in decoded
    # the template is part of the store's identity; no template keeps the old cache key
    assert store_spec(cfg.model, cfg.corpus, cfg.data).corpus["template"] == "{question}\\n{reasoning}\\n{answer}"
    plain = make_cfg("corpus=files", f"corpus.data_files=[{qa_jsonl}]")
    assert "template" not in store_spec(plain.model, plain.corpus, plain.data).corpus


def test_template_over_csv(make_cfg, tmp_path):
    path = tmp_path / "t.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "reasoning", "answer"])
        writer.writeheader()
        writer.writerows(rows(5))
    cfg = make_cfg("corpus=files", f"corpus.data_files=[{path}]", "corpus.template='Q: {question} A: {answer}'")
    assert next(iter_texts(load_corpus(cfg.corpus, tmp_path), "text")) == "Q: What is 0 plus 0? A: "  # empty cell


def test_template_errors_name_the_column_and_the_available_ones(make_cfg, tmp_path, qa_jsonl):
    cfg = make_cfg("corpus=files", f"corpus.data_files=[{qa_jsonl}]", "corpus.template='{question} {trace}'")
    with pytest.raises(ValueError, match=r"no column 'trace' in the table; columns are \['question', 'reasoning', 'answer'\]"):
        load_corpus(cfg.corpus, tmp_path)
    with pytest.raises(ConfigError, match="corpus.template"):
        validate_train(make_cfg("corpus=files", f"corpus.data_files=[{qa_jsonl}]", "corpus.template='{question'"))
    with pytest.raises(ConfigError, match="corpus.template must name at least one column"):
        validate_train(make_cfg("corpus=files", f"corpus.data_files=[{qa_jsonl}]", "corpus.template=plain"))
    with pytest.raises(ConfigError, match="corpus.template needs corpus=files"):
        validate_train(make_cfg("corpus.template='{text}'"))


def test_local_files_are_cached_beside_the_stores_not_in_the_shared_hf_cache(make_cfg, tmp_path, monkeypatch):
    shared = tmp_path / "hf-home-datasets"
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", shared)
    path = tmp_path / "c.txt"
    path.write_text("one paragraph\n\nanother paragraph\n")
    cfg = make_cfg("corpus=files", f"corpus.data_files=[{path}]")
    cache = tmp_path / "cache-root"
    assert len(load_corpus(cfg.corpus, cache)) > 0
    assert any((cache / "datasets").rglob("*.arrow"))
    assert not shared.exists()
