"""Max-activation pass: streaming state equals brute force over all (seq, pos) on tiny data."""

from __future__ import annotations

import json

import pytest
import torch

from saeforge.activations.readers import open_rows
from saeforge.activations.store import save_safetensors_atomic
from saeforge.config import MaxActConfig
from saeforge.interpret import records as records_io
from saeforge.interpret.maxact import TokenDecoder, collect_maxact
from saeforge.lm.capture import capture_residual, run_until_captured
from saeforge.sae.model import SAEConfig, SparseAutoencoder, calibrate_threshold

HOOK = "layers.2"
N_SEQ, CTX = 24, 32
CFG = {"batch_size": 5, "n_examples": 6, "n_quantiles": 4, "examples_per_quantile": 3, "hist_bins": 8,
       "context_left": 4, "context_right": 3, "n_non_activating": 4, "seed": 3, "progress": False}
CONF = MaxActConfig.from_mapping(CFG)


def residual(lm, tokens: torch.Tensor) -> torch.Tensor:
    with capture_residual(lm.model, [HOOK]) as cap:
        run_until_captured(lm.model, input_ids=tokens.long())
    return cap[HOOK]


@pytest.fixture(scope="module")
def setup(tiny_lm):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, len(tiny_lm.tokenizer), (N_SEQ, CTX), generator=g, dtype=torch.int32)
    tokens[:, 0] = tiny_lm.tokenizer.bos_token_id
    tokens[3, 10] = tiny_lm.tokenizer.bos_token_id  # a BOS inside a window is excluded too
    x = residual(tiny_lm, tokens)
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=48, k=4))
    sae.init_from_sample(x.reshape(-1, 64))
    calibrate_threshold(sae, [x.reshape(-1, 64)])
    with torch.no_grad():
        acts = sae.encode_inference(x.reshape(-1, 64)).view(N_SEQ, CTX, -1)
    acts[tokens == tiny_lm.tokenizer.bos_token_id] = 0
    acts[:, :2] = 0  # exclude_first_tokens=2 (the default): BOS and the first token
    return tokens, sae, acts


@pytest.fixture(scope="module")
def result(tiny_lm, setup):
    tokens, sae, _ = setup
    return collect_maxact(tiny_lm, sae, HOOK, tokens, CONF)


def test_frequency_and_a_max_equal_brute_force(result, setup):
    _, _, acts = setup
    n_tokens = N_SEQ * CTX - 2 * N_SEQ - 1
    assert result.n_tokens == n_tokens and result.layer == 2 and result.d_sae == 48
    fired = (acts > 0).sum((0, 1))
    for f, entry in result.features.items():
        assert entry["n_fired"] == int(fired[f])
        assert entry["frequency"] == pytest.approx(int(fired[f]) / n_tokens)
        assert entry["a_max"] == pytest.approx(float(acts[..., f].max()), abs=1e-4)
        assert sum(entry["histogram"]["counts"]) == entry["n_fired"]
        if entry["n_fired"]:
            assert entry["histogram"]["edges"][-1] >= entry["a_max"] - 1e-4
            q = entry["quantiles"]
            assert q == sorted(q) and 0 <= q[0] and q[-1] <= entry["a_max"] + 1e-4
            nonzero = acts[..., f][acts[..., f] > 0]
            # interpolated from a histogram with bins ≤ a_max/(hist_bins·hist_resolution/2) wide
            exact = torch.quantile(nonzero, torch.tensor(result.quantile_levels))
            assert torch.allclose(torch.tensor(q), exact, atol=2 * entry["a_max"] / 32 + 1e-3)


@pytest.mark.parametrize("one_per_window", [True, False])
def test_top_examples_equal_brute_force(tiny_lm, setup, result, one_per_window):
    tokens, sae, acts = setup
    conf = MaxActConfig.from_mapping({**CFG, "one_per_window": False})
    res = result if one_per_window else collect_maxact(tiny_lm, sae, HOOK, tokens, conf)
    N = CFG["n_examples"]
    for f, entry in res.features.items():
        a = acts[..., f]
        if one_per_window:
            v, pos = a.max(1)
            vals, seq = v.topk(N)
            locs = [(s, p) for s, p in zip(seq.tolist(), pos[seq].tolist())]
        else:
            vals, flat = a.flatten().topk(N)
            locs = [divmod(i, CTX) for i in flat.tolist()]
        keep = vals > 0
        torch.testing.assert_close(torch.tensor([ex["activation"] for ex in entry["top"]]), vals[keep],
                                   atol=1e-5, rtol=0)
        # identical windows (random tokens repeat) tie exactly: order ties by location
        got_locs = [(ex["seq"], ex["start"] + ex["max_pos"]) for ex in entry["top"]]
        got = sorted((-float(a[loc]), loc) for loc in got_locs)
        want = sorted((-float(a[loc]), loc) for loc, k in zip(locs, keep) if k)
        assert [loc for _, loc in got] == [loc for _, loc in want], f


def test_contexts_decode_around_max_pos(tiny_lm, setup, result):
    tokens, _, acts = setup
    decode = TokenDecoder(tiny_lm.tokenizer)
    checked = 0
    for f, entry in result.features.items():
        for ex in entry["top"] + entry["quantile_examples"]:
            seq, start, mp = ex["seq"], ex["start"], ex["max_pos"]
            pos = start + mp
            assert start == max(0, pos - CFG["context_left"])
            stop = min(CTX, pos + CFG["context_right"] + 1)
            ids = tokens[seq, start:stop].tolist()
            assert ex["token_ids"] == ids and ex["tokens"] == decode(ids)
            torch.testing.assert_close(torch.tensor(ex["acts"]), acts[seq, start:stop, f], atol=2e-3, rtol=2e-3)
            assert ex["acts"][mp] == pytest.approx(ex["activation"], abs=2e-3)
            assert ex["activation"] == pytest.approx(float(acts[seq, :, f].max()), abs=1e-4)
            checked += 1
    assert checked > 50
    # byte-level markers are cleaned: a token starting with Ġ shows as a space
    tok = tiny_lm.tokenizer
    gid = next(i for t, i in tok.get_vocab().items() if t.startswith("Ġ") and len(t) > 1)
    assert decode([gid])[0].startswith(" ")


def test_quantile_examples_are_the_seeded_bottom_k_of_each_bucket(setup, result):
    """Replays the reservoir keys and draws bottom-k per bucket over all windows at once."""
    _, _, acts = setup
    conf = MaxActConfig.from_mapping(CFG)
    G, Q, K = conf.n_quantiles * conf.bucket_resolution, conf.n_quantiles, conf.examples_per_quantile
    rng = torch.Generator().manual_seed(conf.seed)
    keys = torch.cat([torch.rand(2, min(conf.batch_size, N_SEQ - s), 48, generator=rng)[0]
                      for s in range(0, N_SEQ, conf.batch_size)])
    win_max = acts.max(1).values  # [N_SEQ, F]
    for f, entry in result.features.items():
        a_max = float(win_max[:, f].max())
        if a_max == 0:
            assert entry["quantile_examples"] == []
            continue
        S = 2.0 ** int(torch.frexp(torch.tensor(a_max)).exponent)
        want = []
        for s in (win_max[:, f] > 0).nonzero().squeeze(1).tolist():
            g = min(int(float(win_max[s, f]) / S * G), G - 1)
            bucket = min(max(int((g + 0.5) * S / G / a_max * Q), 0), Q - 1)
            want.append((bucket, float(keys[s, f]), s))
        picked = set()
        for b in range(Q):
            picked |= {(b, s) for _, _, s in sorted(w for w in want if w[0] == b)[:K]}
        got = {(ex["bucket"], ex["seq"]) for ex in entry["quantile_examples"]}
        assert got == picked, f
        for ex in entry["quantile_examples"]:  # the bucket is the activation range, up to ±a_max/G
            lo, hi = ex["bucket"] * a_max / Q, (ex["bucket"] + 1) * a_max / Q
            assert lo - a_max / G - 1e-6 <= ex["activation"] <= hi + a_max / G + 1e-6


def test_non_activating_windows_have_zero_activation(setup, result):
    _, _, acts = setup
    n_checked = 0
    L = CFG["context_left"] + 1 + CFG["context_right"]
    for f, entry in result.features.items():
        zero_windows = int((acts[..., f].max(1).values == 0).sum())
        assert len(entry["non_activating"]) == min(CFG["n_non_activating"], zero_windows)
        assert len({ex["seq"] for ex in entry["non_activating"]}) == len(entry["non_activating"])
        for ex in entry["non_activating"]:
            assert float(acts[ex["seq"], :, f].abs().max()) == 0
            assert len(ex["token_ids"]) == L and ex["start"] >= 1
            n_checked += 1
    assert n_checked > 0


def test_first_positions_count_only_when_not_excluded(tiny_lm, setup, result):
    """Position 1 (the first token after BOS, an attention sink) is in the statistics only with exclude_first_tokens=0."""
    tokens, sae, acts = setup
    kept = collect_maxact(tiny_lm, sae, HOOK, tokens, CONF, features=list(range(8)), exclude_first_tokens=0)
    assert kept.n_tokens == result.n_tokens + N_SEQ  # BOS (position 0) is still excluded by exclude_bos
    x = residual(tiny_lm, tokens)
    with torch.no_grad():
        first = sae.encode_inference(x[:, 1]).float()  # [N_SEQ, d_sae] at position 1
    for f in range(8):
        assert kept.features[f]["n_fired"] == result.features[f]["n_fired"] + int((first[:, f] > 0).sum())
        assert kept.features[f]["a_max"] == pytest.approx(max(float(acts[..., f].max()), float(first[:, f].max())), abs=1e-4)
    assert any((first[:, f] > 0).any() for f in range(8))  # the case is exercised
    with pytest.raises(ValueError, match="data.exclude_first_tokens must be >= 0"):
        collect_maxact(tiny_lm, sae, HOOK, tokens, CONF, exclude_first_tokens=-1)
    with pytest.raises(ValueError, match="unknown key interpret.maxact.exclude_first_tokens"):
        MaxActConfig.from_mapping({**CFG, "exclude_first_tokens": 0})  # one home: data.exclude_first_tokens


def test_features_subset_and_written_json(tiny_lm, setup, result, tmp_path):
    tokens, sae, _ = setup
    sub = collect_maxact(tiny_lm, sae, "blocks.2.hook_resid_post", tokens, CONF, features=[7, 3, 7])
    assert list(sub.features) == [7, 3] and sub.hookpoint == HOOK
    for f in (7, 3):
        assert sub.features[f]["top"] == result.features[f]["top"]
        assert sub.features[f]["n_fired"] == result.features[f]["n_fired"]
    path = records_io.write_maxact(tmp_path / "interpret" / HOOK, sub.to_records())
    doc = json.loads(path.read_text())
    assert doc["hookpoint"] == HOOK and doc["layer"] == 2 and doc["ctx_len"] == CTX
    assert set(doc["features"]) == {"7", "3"} and doc["features"]["3"]["feature"] == 3
    assert {"frequency", "a_max", "n_fired", "quantiles", "histogram", "top", "quantile_examples",
            "non_activating"} <= set(doc["features"]["3"])
    assert not list(path.parent.glob(".*tmp*"))
    with pytest.raises(ValueError, match="unknown key interpret.maxact.n_exampels"):
        MaxActConfig.from_mapping({"n_exampels": 3})
    with pytest.raises(ValueError, match="features"):
        collect_maxact(tiny_lm, sae, HOOK, tokens, CONF, features=[48])


def test_stored_activations_give_the_model_path_result(tiny_lm, setup, result, tmp_path):
    tokens, sae, _ = setup
    rows = residual(tiny_lm, tokens).reshape(-1, 64)
    folder = tmp_path / "acts"  # rows in token order, split where no batch boundary falls
    save_safetensors_atomic({"activations": rows[:333]}, folder / "a.safetensors")
    save_safetensors_atomic({"activations": rows[333:]}, folder / "b.safetensors")
    source = open_rows(folder, read_rows=100)
    from_store = collect_maxact(tiny_lm, sae, HOOK, tokens, CONF, activations=source)
    assert from_store.n_tokens == result.n_tokens
    for f, a in result.features.items():
        b = from_store.features[f]
        assert a["n_fired"] == b["n_fired"] and a["a_max"] == pytest.approx(b["a_max"], abs=1e-4)
        assert a["histogram"]["counts"] == b["histogram"]["counts"]
        for key in ("top", "quantile_examples", "non_activating"):
            assert [(e["seq"], e["start"], e["token_ids"]) for e in a[key]] == \
                   [(e["seq"], e["start"], e["token_ids"]) for e in b[key]], (f, key)
            for ea, eb in zip(a[key], b[key]):
                assert ea.get("activation", 0) == pytest.approx(eb.get("activation", 0), abs=1e-4)
    with pytest.raises(ValueError, match="rows"):
        collect_maxact(tiny_lm, sae, HOOK, torch.cat([tokens, tokens]), CONF, activations=source)


def test_joint_pass_equals_separate_passes(tiny_lm, setup, result):
    from saeforge.interpret.maxact import MaxActTarget, collect_maxact_many

    tokens, sae, _ = setup
    other = collect_maxact(tiny_lm, sae, "layers.1", tokens, CONF, features=[0, 5, 9])
    joint = collect_maxact_many(tiny_lm, [MaxActTarget(sae, "layers.1", [0, 5, 9]), MaxActTarget(sae, HOOK)], tokens, CONF)
    assert [r.hookpoint for r in joint] == ["layers.1", HOOK]
    assert joint[0].to_json() == other.to_json()
    assert joint[1].to_json() == result.to_json()
