import dataclasses
import json

import datasets
import pytest
import torch

from saeforge.config import SteeringConfig
from saeforge.interpret import steering
from saeforge.interpret import records as records_io
from saeforge.interpret.records import Records, Steering
from saeforge.interpret.steering import (
    generate_steered,
    load_prompts,
    sample_prompts,
    steer_records,
    steering_effect,
    steering_effect_dedup,
    steering_file,
    steering_kl,
)
from saeforge.lm.capture import add_to_residual
from saeforge.sae.model import SAEConfig, SparseAutoencoder

PROMPTS = [
    "The quick brown fox",
    "Sherlock Holmes took his bottle from the corner of the mantelpiece.",
    "A surgeon",
]
GEN = SteeringConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def sae(tiny_lm):
    torch.manual_seed(0)
    return SparseAutoencoder(SAEConfig(d_in=tiny_lm.d_model, d_sae=16, k=4))


def logit_lens(lm, direction):
    """W_U · (final-norm weight ⊙ d_f): the tokens a residual direction promotes."""
    return lm.model.lm_head.weight @ (lm.model.model.norm.weight * direction)


def test_strength_zero_reproduces_the_original(tiny_lm, sae):
    texts = generate_steered(tiny_lm, sae, "layers.1", 3, 2.0, PROMPTS, [0.0, 1.0], GEN).texts
    assert list(texts) == PROMPTS
    for prompt in PROMPTS:
        assert list(texts[prompt]) == ["original", "0.0", "1.0"]
        assert texts[prompt]["0.0"] == texts[prompt]["original"]


def test_large_strength_moves_next_token_towards_logit_lens_tokens(tiny_lm, sae):
    feature, layer = 5, "layers.3"
    lens = logit_lens(tiny_lm, sae.W_dec[feature].detach())
    top = lens.topk(5).indices
    ids = tiny_lm.tokenizer(PROMPTS[1], return_tensors="pt").input_ids

    def next_logprobs(strength):
        with torch.no_grad(), add_to_residual(tiny_lm.model, layer, strength * sae.W_dec[feature].detach()):
            return torch.log_softmax(tiny_lm.model(ids).logits[0, -1], -1)

    plain, steered = next_logprobs(0.0), next_logprobs(100.0)
    # the random tiny model is near-uniform, so compare ranks and a modest log-prob gain
    assert steered[top].mean() > plain[top].mean() + 0.2
    assert steered.topk(5).indices.tolist() == top.tolist()
    assert int(next_logprobs(-100.0).argmax()) == int(lens.argmin())
    # and through the public generation path: every strongly steered continuation starts there
    run = generate_steered(tiny_lm, sae, layer, feature, 1.0, PROMPTS, [100.0], SteeringConfig(max_new_tokens=2))
    for key, ids_ in zip(run.row_keys, run.continuations):
        if key == "100.0":
            assert int(ids_[0]) == int(top[0])


def test_batched_equals_one_by_one(tiny_lm, sae):
    strengths = [-2.0, 1.0, 4.0]
    batched = generate_steered(tiny_lm, sae, "layers.2", 7, 3.0, PROMPTS, strengths, GEN).texts
    # max_batch=1: one batch-1 generate call per (prompt, strength) row, no padding at all
    one_by_one = generate_steered(
        tiny_lm, sae, "layers.2", 7, 3.0, PROMPTS, strengths, dataclasses.replace(GEN, max_batch=1)).texts
    assert batched == one_by_one


def test_sampling_is_seeded(tiny_lm, sae):
    cfg = dataclasses.replace(GEN, do_sample=True, temperature=1.0, top_p=0.9, seed=3)
    a = generate_steered(tiny_lm, sae, "layers.2", 1, 2.0, PROMPTS, [1.0], cfg).texts
    b = generate_steered(tiny_lm, sae, "layers.2", 1, 2.0, PROMPTS, [1.0], cfg).texts
    assert a == b


def test_bad_inputs_raise(tiny_lm, sae):
    args = dict(hookpoint="layers.1", feature=0, a_max=1.0, prompts=PROMPTS, strengths=[1.0], gen_cfg=GEN)
    with pytest.raises(ValueError, match=r"feature=16 is outside \[0, d_sae=16\)"):
        generate_steered(tiny_lm, sae, **{**args, "feature": 16})
    with pytest.raises(ValueError, match="feature=-1"):
        generate_steered(tiny_lm, sae, **{**args, "feature": -1})
    with pytest.raises(ValueError, match="d_in=32 does not match"):
        generate_steered(tiny_lm, SparseAutoencoder(SAEConfig(d_in=32, d_sae=8, k=2)), **args)
    with pytest.raises(ValueError, match="prompts is empty"):
        generate_steered(tiny_lm, sae, **{**args, "prompts": []})
    for bad in (["a"], [None], [True], "nope", [], [float("nan")]):
        with pytest.raises(ValueError, match="strengths"):
            generate_steered(tiny_lm, sae, **{**args, "strengths": bad})
    with pytest.raises(ValueError, match="a_max"):
        generate_steered(tiny_lm, sae, **{**args, "a_max": "big"})
    with pytest.raises(ValueError, match="unknown hookpoint"):
        generate_steered(tiny_lm, sae, **{**args, "hookpoint": "layers.9"})
    with pytest.raises(ValueError, match=r"unknown key interpret.steering.strenghts"):
        SteeringConfig.from_mapping({"strenghts": [1.0]})
    with pytest.raises(ValueError, match="max_new_tokens"):
        SteeringConfig.from_mapping({"max_new_tokens": 0})
    assert SteeringConfig.from_mapping({"strengths": "wide"}).strengths[0] == -4.0


def test_steering_effect_dedup_formula():
    texts = {"original": "a b c", "1.0": "a b c", "-1.0": "d d"}
    # tokens a b c a b c d d: 4 distinct of 8; texts: 2 distinct of 3
    assert steering_effect_dedup(texts) == pytest.approx(0.6 * 4 / 8 + 0.4 * 2 / 3)
    nested = {"p1": texts, "p2": {"original": "x"}}
    assert steering_effect_dedup(nested) == pytest.approx(0.6 * 5 / 9 + 0.4 * 3 / 4)
    assert steering_effect_dedup({"original": "same"}) == 0.0 == steering_effect({"original": "same"})


def test_steering_effect_is_the_reference_formula_hand_computed(tmp_path):
    texts = {"p": {"original": "a b c", "1.0": "a b c", "-1.0": "d d", "8.0": "z"}}
    # the reference reads original, then its key list: -1.0 and 1.0 twice each, 8.0 never
    # T = [abc, dd, abc, dd, abc]: tokens a b c d d a b c d d a b c → 4 distinct of 13; texts 2 distinct of 5
    expected = 0.6 * 4 / 13 + 0.4 * 2 / 5
    assert steering_effect(texts) == pytest.approx(expected)  # 0.344615…
    # saeforge's variant: every text once (8.0 included): tokens abc abc dd z → 5 of 9; texts 3 of 4
    assert steering_effect_dedup(texts) == pytest.approx(0.6 * 5 / 9 + 0.4 * 3 / 4)
    recs = maxact_records({6: 1.0})
    recs.layer = 19
    recs[6].steering = Steering(texts, True, steering_effect(texts), 0.1, steering_effect_dedup(texts))
    records_io.write_summary(tmp_path, recs, [6], [])
    row, = records_io.read_summary(tmp_path)
    assert list(row)[:4] == ["layer", "feature", "label", "steering_effect"]
    assert (row["layer"], row["feature"], row["steering_effect"]) == ("19", "6", "0.345")  # rounded as the reference
    assert float(row["steering_effect_dedup"]) == pytest.approx(0.6 * 5 / 9 + 0.4 * 3 / 4, abs=1e-5)


def test_steering_kl_is_zero_without_a_vector_and_positive_with_one(tiny_lm, sae):
    run = generate_steered(tiny_lm, sae, "layers.2", 2, 1.0, PROMPTS[:2], [50.0], GEN)
    rows = [i for i, k in enumerate(run.row_keys) if k == "50.0"]
    prompts, gen = [run.row_prompts[i] for i in rows], [run.continuations[i] for i in rows]
    zeros = torch.zeros(len(rows), tiny_lm.d_model)
    assert steering_kl(tiny_lm, "layers.2", prompts, gen, zeros) == pytest.approx(0, abs=1e-6)
    assert steering_kl(tiny_lm, "layers.2", prompts, gen, run.vectors[rows]) > 0.01


def maxact_records(a_max):
    """Records as the max-act file gives them: `{feature: A_max}` → the features' max-act entries."""
    return Records.from_maxact_json({"features": {str(f): {"a_max": v} for f, v in a_max.items()}})


def effects(records, features):
    """`{feature: {"steering_effect", "steering_kl"}}` of `features` in the records."""
    return {f: records[f].steering.effects_entry() for f in features}


def test_steer_records_writes_files_and_resumes(tiny_lm, sae, tmp_path, monkeypatch):
    cfg = SteeringConfig(strengths=[-1.0, 1.0], max_new_tokens=4)
    recs = steer_records(tiny_lm, sae, "blocks.2.hook_resid_post", [1, 2], maxact_records({1: 2.0, 2: 3.0}),
                         PROMPTS[:2], cfg, tmp_path)
    out = effects(recs, [1, 2])
    assert set(out) == {1, 2} and set(out[1]) == {"steering_effect", "steering_effect_dedup", "steering_kl"}
    path = tmp_path / "steering" / "generated_texts_layer_2_feature_1_prompt_1.json"
    assert path == steering_file(tmp_path, 2, 1, 1)
    data = json.loads(path.read_text())
    assert list(data) == ["2"] and list(data["2"]) == ["1"] and list(data["2"]["1"]) == [PROMPTS[1]]
    assert list(data["2"]["1"][PROMPTS[1]]) == ["original", "-1.0", "1.0"]
    effects_doc = json.loads((tmp_path / "steering" / "effects.json").read_text())
    assert effects_doc["2"] == pytest.approx(out[2])

    calls = []
    real = steering.generate_steered
    monkeypatch.setattr(steering, "generate_steered", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    again = steer_records(tiny_lm, sae, "layers.2", [1, 2], maxact_records({1: 2.0, 2: 3.0}), PROMPTS[:2], cfg, tmp_path)
    assert calls == [] and effects(again, [1, 2]) == out
    (tmp_path / "steering" / "generated_texts_layer_2_feature_2_prompt_0.json").unlink()
    steer_records(tiny_lm, sae, "layers.2", [1, 2], maxact_records({1: 2.0, 2: 3.0}), PROMPTS[:2], cfg, tmp_path)
    assert calls == [2]
    with pytest.raises(ValueError, match="no entry for feature 3"):
        steer_records(tiny_lm, sae, "layers.2", [3], maxact_records({1: 2.0}), PROMPTS[:2], cfg, tmp_path)


def test_sample_prompts_stratified_and_seeded():
    docs = [f"Title {i}\n" + " ".join(f"Document {i} sentence {j} is here." for j in range(30)) for i in range(20)]
    ds = datasets.Dataset.from_dict({"text": docs})
    prompts = sample_prompts(ds, "text", 5, seed=0)
    assert len(prompts) == 5 and prompts == sample_prompts(ds, "text", 5, seed=0)
    docs_hit = [int(p.split()[1]) for p in prompts]
    assert [d // 4 for d in docs_hit] == [0, 1, 2, 3, 4]  # one per stratum of 4 documents
    assert all(40 <= len(p) <= 200 and p.endswith(".") for p in prompts)
    with pytest.raises(ValueError, match="empty"):
        sample_prompts(ds.select([]), "text", 2, seed=0)
    with pytest.raises(ValueError, match="n_prompts"):
        sample_prompts(ds, "text", 0, seed=0)


def test_load_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\n second \n")
    (tmp_path / "p.json").write_text(json.dumps(["a", "b"]))
    (tmp_path / "e.txt").write_text("\n \n")
    assert load_prompts(tmp_path / "p.txt") == ["first prompt", "second"]
    assert load_prompts(tmp_path / "p.json") == ["a", "b"]
    with pytest.raises(ValueError, match="contains no prompts"):
        load_prompts(tmp_path / "e.txt")
    with pytest.raises(FileNotFoundError, match="prompts_file"):
        load_prompts(tmp_path / "missing.txt")
