"""One W&B run per SAE across train.py, interpret.py and evaluate.py; sweeps grouped; compare from a
sweep directory or from offline W&B run files (issue 15). Everything offline, through the entry scripts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from saeforge.pipelines.wandb_records import read_run, read_runs
from tests.interpret.chat_server import ScriptedChat
from tests.test_pipeline_entry import HP, answer, run

KEY = "sk-FAKE0123456789abcdefSECRET"


def hits(root: Path, needle: str) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes())


def train_args(tmp: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train.py", "model=tiny", "logger=wandb", f"run.dir={run_dir}", f"data.cache_dir={tmp / 'cache'}",
            f"data.hookpoint={HP}", "data.n_tokens=8192", "data.ctx_len=64", "data.batch_size=256",
            "data.shuffle_buffer=2048", "data.read_rows=1024", "sae.expansion_factor=4", "trainer.max_steps=12",
            "trainer.log_every_n_steps=2", "checkpoint_every_n_steps=6", "trainer.enable_progress_bar=false", *extra]


@pytest.mark.slow
def test_train_interpret_evaluate_share_one_wandb_run_and_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("OPENROUTER_API_KEY", KEY)
    monkeypatch.setenv("SAEFORGE_TEST_EXPLAINER_KEY", KEY)
    rd = tmp_path / "run"
    run(train_args(tmp_path, rd, "sae.k=8"))
    identity = json.loads((rd / "wandb_run.json").read_text())
    with ScriptedChat(answer) as server:
        run(["interpret.py", f"ckpt={rd}", "logger=wandb", "explainer=vllm", f"explainer.base_url={server.base_url}",
             "explainer.model=scripted", "explainer.max_retries=0", "explainer.api_key_env=SAEFORGE_TEST_EXPLAINER_KEY",
             f"explainer.cache_dir={tmp_path / 'llm-cache'}", "interpret.max_latents=4", "interpret.n_tokens=4096",
             "interpret.stages=[maxact,explain,score,dashboard]", "interpret.score.scorers=[detection]",
             "interpret.score.n_test=5", "interpret.score.n_negatives=5"])
    run(["evaluate.py", f"ckpt={rd}", "logger=wandb", "evaluate.n_tokens=1024"])

    runs = read_runs(rd)
    assert len(runs) == 1, [r["id"] for r in runs]
    logged = runs[0]
    assert logged["id"] == identity["id"] and len(logged["files"]) == 3  # train, then two resumed appends
    keys = set().union(*logged["history"]) | set(logged["summary"])
    assert {"train/loss", "train/fvu", "final/log10_feature_frequency/_type",
            "final/feature_amax/_type"} <= keys  # W&B stores a histogram as nested keys
    summary = logged["summary"]
    for key in ("final/fvu", "eval/fvu", "eval/l0", "eval/dead_frac", "eval/ce_zero_ablated", "eval/ce_mean_ablated", "eval/kl_div",
                "interpret/n_labelled", "interpret/n_failed", "interpret/n_generic", "interpret/detection_mean",
                "interpret/detection_baseline_mean"):
        assert key in summary, key
    assert summary["interpret/n_labelled"] == summary["interpret/n_features"] > 0 and summary["interpret/n_failed"] == 0
    assert "interpret/summary/_type" in keys  # the feature table
    # CE recovered (vs zero and mean ablation) is logged when defined; the random tiny LM barely notices ablation
    evaluation = json.loads((rd / "eval" / "evaluation.json").read_text())
    for key in ("ce_loss_recovered", "ce_loss_recovered_vs_mean"):
        assert (f"eval/{key}" in summary) == (evaluation[key] is not None)
    assert logged["config"]["sae"]["k"] == 8 and logged["config"]["sae.k"] == 8
    assert hits(tmp_path, KEY) == [] and hits(tmp_path, KEY[3:]) == []


@pytest.mark.slow
def test_sweep_is_one_group_with_flat_config_columns_and_compare_reads_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = tmp_path / "sweep"
    run(["train.py", "-m", *train_args(tmp_path, sweep)[1:], "sae.k=4,8"])
    runs = read_runs(sweep)
    assert len(runs) == 2
    assert {r["group"] for r in runs} == {str(sweep)}
    assert sorted(r["config"]["sae.k"] for r in runs) == [4, 8]
    assert all(r["config"]["data.hookpoint"] == HP and "sae.expansion_factor" in r["config"] for r in runs)
    assert sorted(r["name"] for r in runs) == ["sae.k=4", "sae.k=8"]  # the swept overrides only

    run_dirs = sorted(p.parent for p in sweep.rglob("wandb_run.json"))  # job dirs: override_dirname
    assert len(run_dirs) == 2
    for rd in run_dirs:  # a job dir's name holds '=' and ',': quoted for Hydra's override grammar
        run(["evaluate.py", f"ckpt='{rd}'", "logger=wandb", "evaluate.n_tokens=1024"])
    assert len(read_runs(sweep)) == 2  # evaluate attached, no new runs

    done = run(["evaluate.py", f"compare=[{sweep}]", "logger=wandb", f"run.dir={tmp_path / 'cmp'}"])
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert len(rows) == 2 and (tmp_path / "cmp" / "compare.png").stat().st_size > 5_000
    assert "ce_loss_recovered" in done.stdout
    logged = read_run(tmp_path / "cmp")
    assert logged["group"] == str(sweep) and "compare/frontier/_type" in set().union(*logged["history"])

    # the offline W&B files alone (no run directories, no server) are enough for compare
    only_wandb = tmp_path / "offline"
    for i, rd in enumerate(run_dirs):
        shutil.copytree(rd / "wandb", only_wandb / f"run{i}" / "wandb")
    run(["evaluate.py", f"compare=[{only_wandb}]", "logger=none", f"run.dir={tmp_path / 'cmp2'}"])
    from_files = json.loads((tmp_path / "cmp2" / "compare.json").read_text())
    assert sorted(r["l0"] for r in from_files) == pytest.approx(sorted(r["l0"] for r in rows))
    assert sorted(r["fvu"] for r in from_files) == pytest.approx(sorted(r["fvu"] for r in rows))


def test_generic_label_rule():
    from saeforge.pipelines.interpret import is_generic_label

    for label in ("The feature", "The LABEL", "The feature is a feature of text", "<label>", "a pattern", ""):
        assert is_generic_label(label), label
    for label in ("dates and years", "This feature fires on French words", "Python code"):
        assert not is_generic_label(label), label


def test_flatten_gives_dotted_keys():
    from saeforge.pipelines.run import flatten

    assert flatten({"sae": {"k": 8, "aux": {"a": 1}}, "tags": [1], "e": {}}) == {"sae.k": 8, "sae.aux.a": 1, "tags": [1], "e": {}}


def test_compare_point_names_drop_the_overrides_every_run_shares():
    from saeforge.pipelines.evaluate import point_names

    sweep = ["/t/sw/c=6,d=/t/cache,sae.k=4,z=1", "/t/sw/c=6,d=/t/cache,sae.k=16,z=1"]
    assert point_names(sweep) == ["sae.k=4", "sae.k=16"]
    assert point_names(["runs/a", "runs/b"]) == ["a", "b"] and point_names(["runs/a"]) == ["a"]


def test_swept_keys_are_the_multirun_sweeps():
    from saeforge.pipelines.run import swept_keys

    argv = ["-m", "model=tiny", "sae.k=4,8", "x=[1,2]", "y=range(1,3)", "+z=choice(a,b)", "w=glob(*)"]
    assert swept_keys(argv) == {"sae.k", "y", "z", "w"}
