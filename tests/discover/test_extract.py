"""Extraction: the reference's npz fields and shapes, prefixes from one forward pass, one LM pass for
all SAEs, dense = CSR, resume after a kill (byte-identical files), devices=N, the folder fingerprint."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from saeforge.config import ConfigError
from saeforge.discover.extract import CACHE_DIR
from saeforge.discover.files import read_activations, read_configurations, read_progress
from saeforge.pipelines.discover import run_extraction
from saeforge.pipelines.validate import validate_discover
from tests.conftest import compose_config
from tests.discover.tiny_set import write_concepts, write_saes
from tests.faults.entry import at_least, run, run_and_kill

REFERENCE_FIELDS = {"activations", "fragments", "original_sentences", "concept_strength_labels", "sentence_indices",
                    "token_positions", "is_final_token", "fragment_lengths", "layer", "average_l0", "num_features"}


def plan_for(tmp_path, *overrides: str, specs=((1, 4), (1, 8), (3, 4))):
    if not (tmp_path / "saes.yaml").exists():
        write_saes(tmp_path, list(specs))
        write_concepts(tmp_path / "c.csv")
    cfg = compose_config("discover", ["model=tiny", "logger=none", f"concepts={tmp_path / 'c.csv'}",
                                      f"saes={tmp_path / 'saes.yaml'}", f"run.dir={tmp_path / 'out'}",
                                      "discover.stage=extract", "discover.batch_size=5", *overrides])
    return validate_discover(cfg)


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*")) if p.is_file()}


def test_npz_fields_shapes_and_prefixes_from_one_pass(tmp_path, tiny_lm):
    plan = plan_for(tmp_path, "discover.layout=dense")
    stats = run_extraction(plan)
    folder = plan.activations_dir
    assert stats.lm_batches == math.ceil(24 / 5)  # one LM pass for all three SAEs
    assert not (folder / CACHE_DIR).exists() and read_progress(folder) == 2
    assert [c["file"] for c in read_configurations(folder)["configurations"]] == [
        "layer_1_l0_4_activations.npz", "layer_1_l0_8_activations.npz", "layer_3_l0_4_activations.npz"]
    ids = [tiny_lm.tokenizer(s, add_special_tokens=False)["input_ids"] for s in plan.concepts.sentences]
    n_frag = sum(len(i) for i in ids)
    with np.load(folder / "layer_3_l0_4_activations.npz") as z:
        assert set(z.files) == REFERENCE_FIELDS
        assert z["activations"].shape == (n_frag, 256) and z["activations"].dtype == np.float32
        for name in REFERENCE_FIELDS - {"activations", "layer", "average_l0", "num_features"}:
            assert z[name].shape == (n_frag,), name
        assert int(z["layer"]) == 3 and float(z["average_l0"]) == 4.0 and int(z["num_features"]) == 256
        assert int(z["is_final_token"].sum()) == 24 and set(z["concept_strength_labels"]) == {0, 1, 2, 3}
        assert ((z["activations"] > 0).sum(1) <= 4).all()
        last = z["fragments"][z["is_final_token"]]
        assert list(last) == [s.strip() for s in plan.concepts.sentences]  # the final prefix is the sentence
        assert (z["fragment_lengths"] == [len(f.split()) for f in z["fragments"]]).all()
        rows, fragments = z["activations"], z["fragments"]
    # the prefix ending at token t, run alone, gives row t of its sentence (causal LM, one pass per batch)
    from saeforge.lm.capture import capture_residual, run_until_captured
    from saeforge.sae.formats import load_sae

    sae = load_sae(tmp_path / "sae2")[0]
    s = 7
    start = sum(len(i) for i in ids[:s])
    for t in (0, len(ids[s]) // 2, len(ids[s]) - 1):
        prefix = torch.tensor([[tiny_lm.tokenizer.bos_token_id, *ids[s][: t + 1]]])
        with capture_residual(tiny_lm.model, ["layers.3"]) as got:
            run_until_captured(tiny_lm.model, input_ids=prefix)
        alone = sae.encode_inference(got["layers.3"][0, -1:].float())[0].detach().numpy()
        np.testing.assert_allclose(rows[start + t], alone, atol=1e-4)
        assert fragments[start + t] == tiny_lm.tokenizer.decode(ids[s][: t + 1]).strip()


def test_csr_holds_the_same_values_and_reruns_do_nothing(tmp_path):
    dense = plan_for(tmp_path, "discover.layout=dense", "run.dir=" + str(tmp_path / "dense"))
    run_extraction(dense)
    sparse = plan_for(tmp_path)  # layout=auto: these SAEs keep ≤ 8 of 256 latents, so CSR
    run_extraction(sparse)
    for name in ("layer_1_l0_8_activations.npz", "layer_3_l0_4_activations.npz"):
        a, b = read_activations(dense.activations_dir / name), read_activations(sparse.activations_dir / name)
        assert b.is_sparse and not a.is_sparse
        np.testing.assert_array_equal(a.dense(), b.dense())
        assert (a.fragments == b.fragments).all() and a.average_l0 == b.average_l0
    before = digest(sparse.activations_dir)
    assert run_extraction(plan_for(tmp_path)).lm_batches == 0  # everything written: the LM is not even loaded
    assert digest(sparse.activations_dir) == before


def test_a_folder_of_other_inputs_is_refused_unless_overwrite(tmp_path):
    run_extraction(plan_for(tmp_path))
    with pytest.raises(ConfigError, match="holds an extraction of other inputs.*discover.overwrite=true"):
        plan_for(tmp_path, "discover.max_tokens=3")
    plan = plan_for(tmp_path, "discover.max_tokens=3", "discover.overwrite=true")
    run_extraction(plan)
    assert read_activations(plan.activations_dir / "layer_1_l0_4_activations.npz").token_positions.max() == 2


@pytest.mark.slow
def test_killed_extraction_resumes_identical_and_devices_split_the_saes(tmp_path):
    write_saes(tmp_path, [(1, 4), (1, 8), (2, 4), (2, 8), (3, 4), (3, 8)], d_sae=2048)
    write_concepts(tmp_path / "c.csv", n=60)
    args = ["discover.py", "model=tiny", "logger=none", f"concepts={tmp_path / 'c.csv'}",
            f"saes={tmp_path / 'saes.yaml'}", "discover.stage=extract", "discover.layout=dense"]
    run([*args, f"run.dir={tmp_path / 'ref'}"], tmp_path)
    reference = digest(tmp_path / "ref" / "activations")
    assert len([n for n in reference if n.endswith(".npz")]) == 6
    folder = tmp_path / "out" / "activations"
    assert run_and_kill([*args, f"run.dir={tmp_path / 'out'}"], tmp_path, at_least(folder, "layer_*.npz", 2))
    written = len(list(folder.glob("layer_*.npz")))
    assert 2 <= written < 6 and read_progress(folder) < 5
    done = run([*args, f"run.dir={tmp_path / 'out'}"], tmp_path)
    assert f"{6 - written} of 6 configurations to extract" in done.stdout + done.stderr
    assert digest(folder) == reference
    run([*args, f"run.dir={tmp_path / 'two'}", "trainer.devices=2"], tmp_path)
    assert digest(tmp_path / "two" / "activations") == reference


def test_the_entry_point_rejects_a_bad_csv_row_before_any_model_load(tmp_path):
    write_saes(tmp_path, [(1, 4)])
    (tmp_path / "bad.csv").write_text("sentence,concept_strength_label\nfine,0\nnot fine,7\n")
    # a model that cannot load: the CSV must fail first, with one line and exit status 2
    done = run(["discover.py", "model=hub", "model.name=/nowhere/model", "logger=none",
                f"concepts={tmp_path / 'bad.csv'}", f"saes={tmp_path / 'saes.yaml'}", f"run.dir={tmp_path / 'out'}"],
               tmp_path, expect=2)
    assert done.stderr.strip() == f"error: {tmp_path / 'bad.csv'} row 3: concept_strength_label=7 is outside 0–3"
    assert not (tmp_path / "out").exists()
