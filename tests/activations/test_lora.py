"""LoRA A-activation capture: the stored vector equals x @ A.T per module, in the documented order."""

from __future__ import annotations

import json

import h5py
import pytest
import torch
from peft import LoraConfig, get_peft_model

from saeforge.activations.extract import build_store
from saeforge.activations.store import read_tokens
from saeforge.lm.loading import load_lm


@pytest.fixture
def adapter_dir(tmp_path, make_cfg):
    lm = load_lm(make_cfg().model)
    torch.manual_seed(1)
    peft_model = get_peft_model(lm.model, LoraConfig(r=1, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], init_lora_weights=False))
    out = tmp_path / "adapter"
    peft_model.save_pretrained(out)
    return out


def test_lora_capture_equals_x_times_a_transpose(make_cfg, adapter_dir):
    cfg = make_cfg("data=lora", f"data.lora.adapter={adapter_dir}", "data.lora.types=[q,v,up,down]", "data.hookpoint=lora")
    lm = load_lm(cfg.model)
    store = build_store(cfg.model, cfg.corpus, cfg.data, lm=lm)
    manifest = json.loads((store.root / "manifest.json").read_text())
    layout = manifest["lora_layout"]
    assert manifest["d_in"]["lora"] == 4 * 4 * 1 == len(layout)
    assert [(r["layer"], r["type"]) for r in layout[:4]] == [(0, "q"), (0, "v"), (0, "up"), (0, "down")]
    with h5py.File(store.root / "lora.h5") as f:
        acts = torch.from_numpy(f["activations"][:64])
    # By hand: the input of layer 2's up_proj, times lora_A's weight transposed.
    tokens = read_tokens(store.root)[:2].long()
    peft_layer = lm.model.model.layers[2].mlp.up_proj
    seen = {}
    handle = peft_layer.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    with torch.no_grad():
        lm.model(tokens)
    handle.remove()
    a_weight = peft_layer.lora_A["default"].weight  # [r, d_in]
    expected = (seen["x"] @ a_weight.T).reshape(-1)
    column = next(r["start"] for r in layout if (r["layer"], r["type"]) == (2, "up"))
    torch.testing.assert_close(acts[:, column], expected, rtol=1e-5, atol=1e-6)


def test_mismatched_adapter_fails_clearly(make_cfg, adapter_dir, tmp_path):
    cfg = make_cfg("data=lora", f"data.lora.adapter={adapter_dir}", "data.hookpoint=lora", "model.tiny.hidden_size=32")
    with pytest.raises(ValueError, match="does not match the model"):
        build_store(cfg.model, cfg.corpus, cfg.data)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        cfg = make_cfg("data=lora", f"data.lora.adapter={tmp_path}", "data.hookpoint=lora")
        build_store(cfg.model, cfg.corpus, cfg.data)


def test_lora_store_from_two_processes_is_byte_identical(make_cfg, adapter_dir, tmp_path):
    def store(cache: str, *extra: str):
        cfg = make_cfg("data=lora", f"data.lora.adapter={adapter_dir}", "data.lora.types=[q,v,up,down]",
                       "data.hookpoint=lora", f"data.cache_dir={tmp_path / cache}", *extra)
        return build_store(cfg.model, cfg.corpus, cfg.data).root

    one, two = store("one"), store("two", "data.extract_devices=2")
    files = sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert [str(p) for p in files] == ["lora.h5", "manifest.json", "tokens.safetensors"]
    assert all((one / p).read_bytes() == (two / p).read_bytes() for p in files)
