import pytest
import torch

from saeforge.lm.capture import add_to_residual, capture_residual, run_until_captured
from saeforge.lm.hookpoints import canonical_name, check_hookpoint, resolve_hookpoint


def test_captured_residual_equals_output_hidden_states(tiny_lm):
    ids = torch.tensor([tiny_lm.tokenizer("The quick brown fox jumps over the dog").input_ids] * 2)
    with torch.no_grad():
        hidden = tiny_lm.model(ids, output_hidden_states=True).hidden_states
    with capture_residual(tiny_lm.model, ["layers.0", "blocks.2.hook_resid_post"]) as captured:
        run_until_captured(tiny_lm.model, input_ids=ids)
    torch.testing.assert_close(captured["layers.0"], hidden[1], rtol=0, atol=0)
    torch.testing.assert_close(captured["layers.2"], hidden[3], rtol=0, atol=0)


def test_forward_stops_after_deepest_hookpoint(tiny_lm):
    ids = torch.tensor([tiny_lm.tokenizer("hello world").input_ids])
    ran = []
    handle = resolve_hookpoint(tiny_lm.model, "layers.3").module.register_forward_hook(lambda *a: ran.append(3))
    try:
        with capture_residual(tiny_lm.model, ["layers.1"]) as captured:
            run_until_captured(tiny_lm.model, input_ids=ids)
    finally:
        handle.remove()
    assert "layers.1" in captured and ran == []


def test_aliases_and_unknown_hookpoint_lists_valid_ones():
    assert canonical_name("blocks.7.hook_resid_post") == "layers.7"
    assert canonical_name("model.layers.3") == "layers.3"
    with pytest.raises(ValueError, match=r"valid hookpoints are layers\.0 … layers\.3"):
        check_hookpoint("layers.9", 4)
    with pytest.raises(ValueError, match="unknown hookpoint 'mlp.out'"):
        check_hookpoint("mlp.out", 4)


def test_add_to_residual_shifts_the_hookpoint_output_by_the_vector(tiny_lm):
    ids = torch.tensor([tiny_lm.tokenizer("hello world").input_ids])
    delta = torch.randn(tiny_lm.d_model)
    with capture_residual(tiny_lm.model, ["layers.1"]) as plain:
        run_until_captured(tiny_lm.model, input_ids=ids)
    with add_to_residual(tiny_lm.model, "layers.1", delta), capture_residual(tiny_lm.model, ["layers.1"]) as steered:
        run_until_captured(tiny_lm.model, input_ids=ids)
    torch.testing.assert_close(steered["layers.1"], plain["layers.1"] + delta)
