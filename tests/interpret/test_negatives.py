"""Hard non-activating examples: FAISS (MiniLM nearest contexts) and decoder-cosine neighbours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saeforge.config import MaxActConfig
from saeforge.interpret.maxact import collect_maxact
from saeforge.interpret.negatives import example_text, minilm_embed
from saeforge.interpret.neighbours import decoder_neighbours
from saeforge.lm.capture import capture_residual, run_until_captured
from saeforge.sae.model import SAEConfig, SparseAutoencoder, calibrate_threshold

HOOK = "layers.2"
CTX = 16
TOPICS = [
    "The chef chopped onions and garlic, then simmered the tomato sauce with basil in a heavy pan.",
    "The ship sailed across the stormy ocean while the sailors pulled the ropes and the waves rose high.",
    "The army marched at dawn; the soldiers carried rifles and the general studied the battle map.",
    "The surgeon washed his hands, and the nurse prepared the scalpel before the operation began.",
    "The programmer compiled the code, fixed the bug in the function and pushed the commit to the server.",
    "The farmer planted wheat in the field and the cows grazed near the old red barn in the spring.",
]
CFG = {"batch_size": 8, "n_examples": 5, "n_quantiles": 2, "examples_per_quantile": 1, "hist_bins": 4,
       "context_left": 6, "context_right": 3, "n_non_activating": 4, "seed": 1, "progress": False,
       "faiss_candidates": 80, "n_neighbours": 3}


def cfg(source: str) -> MaxActConfig:
    return MaxActConfig.from_mapping({**CFG, "non_activating_source": source})


@pytest.fixture(scope="module")
def setup(tiny_lm):
    tok = tiny_lm.tokenizer
    ids: list[int] = []
    for rep in range(4):
        for i, text in enumerate(TOPICS):
            ids += tok(TOPICS[(i * (rep + 1)) % len(TOPICS)] + " ", add_special_tokens=False)["input_ids"]
    n_seq = len(ids) // (CTX - 1)
    body = torch.tensor(ids[: n_seq * (CTX - 1)], dtype=torch.int32).view(n_seq, CTX - 1)
    tokens = torch.cat([torch.full((n_seq, 1), tok.bos_token_id, dtype=torch.int32), body], 1)
    with capture_residual(tiny_lm.model, [HOOK]) as cap:
        run_until_captured(tiny_lm.model, input_ids=tokens.long())
    x = cap[HOOK].reshape(-1, 64)
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=256, k=2))
    sae.init_from_sample(x)
    calibrate_threshold(sae, [x])
    with torch.no_grad():
        acts = sae.encode_inference(x).view(n_seq, CTX, -1)
    acts[:, :2] = 0  # exclude_first_tokens=2: BOS and the first token
    return tokens, sae, acts


@pytest.fixture(scope="module")
def embed():
    """MiniLM, memoised per text (the test re-embeds what the pass embedded)."""
    model, memo = minilm_embed(), {}

    def cached(texts: list[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in memo))
        if missing:
            memo.update(zip(missing, model(missing)))
        return np.stack([memo[t] for t in texts])

    return cached


def centroid_cosines(embed, entry) -> list[float]:
    top = embed([example_text(e) for e in entry["top"]]).mean(0)
    top /= np.linalg.norm(top)
    return (embed([example_text(e) for e in entry["non_activating"]]) @ top).tolist()


def test_faiss_negatives_are_closer_than_random_and_never_activate(tiny_lm, setup, embed):
    tokens, sae, acts = setup
    features = list(range(0, 256, 8))
    hard = collect_maxact(tiny_lm, sae, HOOK, tokens, cfg("faiss"), features=features, embed=embed)
    rand = collect_maxact(tiny_lm, sae, HOOK, tokens, cfg("random"), features=features)
    embed([example_text(e) for f in features for e in rand.features[f]["non_activating"]])  # one batch
    compared = 0
    gaps = []
    for f in features:
        entry, base = hard.features[f], rand.features[f]
        assert entry["n_windows"] == int((acts[..., f].amax(1) > 0).sum())
        for ex in entry["non_activating"]:
            assert float(acts[ex["seq"], :, f].max()) == 0.0, (f, ex["seq"])  # never activates
            assert ex["token_ids"] == tokens[ex["seq"], ex["start"] : ex["start"] + 10].tolist()
        if not entry["top"] or len(base["non_activating"]) < 4:
            continue
        assert [ex["source"] for ex in entry["non_activating"]] == ["faiss"] * 4
        sims = [ex["similarity"] for ex in entry["non_activating"]]
        assert sims == sorted(sims, reverse=True)
        h, r = centroid_cosines(embed, entry), centroid_cosines(embed, base)
        assert h == pytest.approx(sims, abs=1e-3)
        assert np.mean(h) >= np.mean(r) - 1e-6
        gaps.append(np.mean(h) - np.mean(r))
        compared += 1
    assert compared >= 8
    print(f"{compared} features: FAISS − random centroid cosine {np.mean(gaps):.3f}")
    assert np.mean(gaps) > 0.02


def test_neighbour_negatives_are_top_examples_of_nearest_features(tiny_lm, setup):
    tokens, sae, acts = setup
    features = [1, 2, 3, 5, 8, 13, 21, 34]
    res = collect_maxact(tiny_lm, sae, HOOK, tokens, cfg("neighbours"), features=features)
    assert sorted(res.features) == sorted(features)  # neighbours lend examples but are not reported
    ids, cos = decoder_neighbours(sae.W_dec, features, 3)
    full = collect_maxact(tiny_lm, sae, HOOK, tokens, cfg("random"), features=sorted(set(ids.flatten().tolist())))
    n_from_neighbours = 0
    for row, f in enumerate(features):
        nearest = ids[row].tolist()
        for ex in res.features[f]["non_activating"]:
            assert float(acts[ex["seq"], :, f].max()) == 0.0
            if ex["source"] == "neighbours":
                n_from_neighbours += 1
                g = ex["neighbour"]
                assert g in nearest and ex["cosine"] == pytest.approx(float(cos[row, nearest.index(g)]), abs=1e-4)
                windows = {(e["seq"], e["start"]) for e in full.features[g]["top"]}
                assert (ex["seq"], ex["start"]) in windows
                assert float(acts[ex["seq"], :, g].max()) > 0
    assert n_from_neighbours >= len(features)


def test_unknown_source_is_a_config_error():
    from saeforge.config import ConfigError

    with pytest.raises(ConfigError, match="interpret.maxact.non_activating_source"):
        cfg("nearest")
