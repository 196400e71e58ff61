"""kill -9 at seeded progress points in extraction, training and each interpretation stage; a rerun
must end with outputs identical (content hash of every output file, logs and timing fields left out)
to an uninterrupted run (issue 11).

Kill points are progress events, not wall-clock delays: the Nth store shard, the Nth checkpoint, a
stage's progress bar on stderr, the Nth steering / explanation / score file, N drawn from a fixed seed.
Each sequence runs at the same paths as its reference (paths are part of the recorded config), the
reference moved aside first.
"""

from __future__ import annotations

import random

import pytest

from tests.faults.entry import (
    HP,
    at_least,
    content_hashes,
    diff,
    interpret_args,
    printed,
    run,
    run_and_kill,
    train_args,
)

SEED = 11
pytestmark = pytest.mark.slow


def test_extract_and_train_killed_three_times_each_resume_identical(tmp_path):
    rng = random.Random(SEED)
    args = train_args(tmp_path, "run")
    run(args, tmp_path)
    reference = {"run": content_hashes(tmp_path / "run"), "cache": content_hashes(tmp_path / "cache")}
    (tmp_path / "run").rename(tmp_path / "ref-run")
    (tmp_path / "cache").rename(tmp_path / "ref-cache")

    shards = sorted(rng.sample(range(1, 8), 3))  # the store has 8 shards
    checkpoints = sorted(rng.sample(range(1, 7), 3))  # and training saves 7 checkpoints
    store = tmp_path / "cache" / "activations"
    for n in shards:
        assert run_and_kill(args, tmp_path, at_least(store, f"*/{HP}/shard-*.safetensors", n)), f"not killed at shard {n}"
        assert not (tmp_path / "run" / "metrics.json").exists()
    for n in checkpoints:
        assert run_and_kill(args, tmp_path, at_least(tmp_path / "run" / "checkpoints", "epoch=*.ckpt", n)), \
            f"not killed at checkpoint {n}"
        assert not (tmp_path / "run" / "metrics.json").exists()
    run(args, tmp_path)
    got = {"run": content_hashes(tmp_path / "run"), "cache": content_hashes(tmp_path / "cache")}
    for where, hashes in reference.items():
        assert not diff(hashes, got[where]), (where, diff(hashes, got[where]))


def test_interpret_killed_in_each_stage_resumes_identical(tmp_path):
    rng = random.Random(SEED)
    run(train_args(tmp_path, "R", "trainer.max_steps=8"), tmp_path)
    args = interpret_args(tmp_path, "R", "explainer=local", "interpret.stages=[maxact,steering,explain,score]",
                          f"explainer.cache_dir={tmp_path / 'llm-cache'}")
    out = tmp_path / "R" / "interpret"
    run(args, tmp_path)
    reference = content_hashes(out)
    out.rename(tmp_path / "ref-interpret")
    (tmp_path / "llm-cache").rename(tmp_path / "ref-llm-cache")

    hp = out / HP
    points = {  # 4 features, 2 prompts, 3 scorers
        "maxact": printed(f"maxact {HP}:"),
        "steering": at_least(hp / "steering", "generated_texts_*.json", rng.randint(1, 7)),
        "explain": at_least(hp / "explanations", "*.txt", rng.randint(1, 3)),
        "score": at_least(hp / "scores", "*/*.txt", rng.randint(1, 11)),
    }
    for stage, reached in points.items():
        assert run_and_kill(args, tmp_path, reached), f"not killed during {stage}"
    run(args, tmp_path)
    got = content_hashes(out)
    assert not diff(reference, got), diff(reference, got)


def test_two_process_extraction_killed_resumes_identical(tmp_path):
    """kill -9 of the main process of a 2-process extraction (its worker gets SIGINT from the kernel when
    it dies); the rerun finishes the store, byte for byte the store one process builds."""
    args = train_args(tmp_path, "run", "extract_only=true")
    run(args, tmp_path)
    reference = {str(p.relative_to(tmp_path / "cache")): p.read_bytes()
                 for p in sorted((tmp_path / "cache" / "activations").rglob("*")) if p.is_file()}
    (tmp_path / "cache").rename(tmp_path / "ref-cache")
    two = [*args, "data.extract_devices=2"]
    store = tmp_path / "cache" / "activations"
    assert run_and_kill(two, tmp_path, at_least(store, f"*/{HP}/shard-*.safetensors", 3)), "not killed at shard 3"
    run(two, tmp_path)
    got = {str(p.relative_to(tmp_path / "cache")): p.read_bytes()
           for p in sorted((tmp_path / "cache" / "activations").rglob("*")) if p.is_file()}
    assert got == reference
