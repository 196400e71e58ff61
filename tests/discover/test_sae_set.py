"""The SAE set: local paths, SAELens registry releases and HF repos resolved from a Hugging Face cache
that the test writes itself (the hub cache layout: models--org--name/refs/main + snapshots/<commit>/...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from saeforge.config import ConfigError
from saeforge.discover.sae_set import read_sae_set, resolve_sae_set
from saeforge.sae.formats import load_sae
from tests.discover.tiny_set import write_saes

REPO, COMMIT = "google/gemma-scope-2b-pt-res", "0123456789abcdef0123456789abcdef01234567"


def cache_gemma_scope(hub: Path, folder: str, d_in: int = 64, d_sae: int = 32) -> Path:
    """A tiny Gemma Scope params.npz written where huggingface_hub caches REPO/folder/params.npz."""
    repo_dir = hub / f"models--{REPO.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    target = repo_dir / "snapshots" / COMMIT / folder / "params.npz"
    target.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.savez(target, W_enc=rng.standard_normal((d_in, d_sae)).astype(np.float32),
             b_enc=np.zeros(d_sae, np.float32), W_dec=rng.standard_normal((d_sae, d_in)).astype(np.float32),
             b_dec=np.zeros(d_in, np.float32), threshold=np.full(d_sae, 0.1, np.float32))
    return target


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_a_registry_release_resolves_from_the_hf_cache_with_its_neuronpedia_id(tmp_path, hub):
    npz = cache_gemma_scope(hub, "layer_1/width_16k/average_l0_102")
    set_file = tmp_path / "set.yaml"
    set_file.write_text("- {release: gemma-scope-2b-pt-res, sae_id: layer_1/width_16k/average_l0_102}\n"
                        f"- {{layer: 2, name: mine, repo: {REPO}, path: layer_1/width_16k/average_l0_102}}\n")
    first, second = resolve_sae_set(set_file, n_layers=4, d_model=64)
    assert Path(first.local).resolve() == npz.parent.resolve() and first.hookpoint == "layers.1"
    assert first.file == "layer_1_l0_102_activations.npz" and first.average_l0 == 102.0
    assert (first.d_in, first.d_sae) == (64, 32)
    # the same folder is the canonical layer-1 SAE, whose Neuronpedia page the registry knows
    assert first.neuronpedia_id == "gemma-2-2b/1-gemmascope-res-16k"
    assert second.file == "layer_2_l0_102_activations.npz" and second.neuronpedia_id is None
    assert second.source == f"{REPO}:layer_1/width_16k/average_l0_102"
    sae, info = load_sae(first.local)  # what extraction will load
    assert info["format"] == "gemma_scope" and sae.cfg.d_sae == 32


def test_shorthand_expands_a_release_by_layers_and_widths(tmp_path, hub):
    set_file = tmp_path / "set.yaml"
    set_file.write_text("from_release: {release: gemma-scope-2b-pt-res, layers: [0, 3], widths: [16k]}\n")
    entries = read_sae_set(set_file)
    ids = [e["sae_id"] for e in entries]
    assert ids and all(i.startswith(("layer_0/width_16k/", "layer_3/width_16k/")) for i in ids)
    assert {i.split("/")[0] for i in ids} == {"layer_0", "layer_3"}
    with pytest.raises(ConfigError, match="entry 0: gemma-scope-2b-pt-res/layer_.* is not in the Hugging Face cache"):
        resolve_sae_set(set_file, n_layers=26, d_model=64)


def test_the_whole_set_is_checked_against_the_model(tmp_path):
    set_file = write_saes(tmp_path, [(1, 4), (2, 4)])
    assert [s.file for s in resolve_sae_set(set_file, 4, 64)] == ["layer_1_l0_4_activations.npz",
                                                                   "layer_2_l0_4_activations.npz"]
    with pytest.raises(ConfigError, match=r"entry 1: unknown hookpoint 'layers.2'; this model has 2 blocks"):
        resolve_sae_set(set_file, 2, 64)
    with pytest.raises(ConfigError, match=r"entry 0: the SAE's d_in=64 does not match the model's width 32"):
        resolve_sae_set(set_file, 4, 32)
    bad = tmp_path / "bad.yaml"
    for text, message in [("- {layer: 1, l0: 3, path: nowhere}\n", "entry 0: path 'nowhere' does not exist"),
                          ("- {layer: 1, l0: 3}\n", "give exactly one source"),
                          ("- {layer: 1, l0: 3, path: sae0, colour: red}\n", "unknown key(s) ['colour']"),
                          ("- {layer: 1, l0: 4, path: sae0}\n- {hookpoint: layers.1, l0: 4, path: sae1}\n",
                           "entries 0 and 1 both write layer_1_l0_4_activations.npz")]:
        bad.write_text(text)
        with pytest.raises(ConfigError) as err:
            resolve_sae_set(bad, 4, 64)
        assert message in str(err.value), str(err.value)


def test_sae_dimensions_read_headers_of_every_format(tmp_path):
    from saeforge.sae.formats import sae_dimensions

    write_saes(tmp_path, [(1, 4)], d_sae=128)
    assert sae_dimensions(tmp_path / "sae0") == (64, 128)
    npz = cache_gemma_scope(tmp_path, "x", d_in=16, d_sae=8)
    assert sae_dimensions(npz) == sae_dimensions(npz.parent) == (16, 8)
    torch.save({"encoder.weight": torch.zeros(8, 16), "encoder.bias": torch.zeros(8),
                "decoder.weight": torch.zeros(16, 8), "bias": torch.zeros(16)}, tmp_path / "ae.pt")
    assert sae_dimensions(tmp_path / "ae.pt") == (16, 8)
