"""SAE files: export in SAELens v6 format; import SAELens, sparsify, Gemma Scope, dictionary_learning.

Every import maps the foreign math onto ours exactly:
    ours:      pre = (x − b_dec)·W_enc + b_enc;  acts = JumpReLU/TopK(pre);  x̂ = acts·W_dec + b_dec
Formats that do not subtract b_dec before encoding (Gemma Scope, SAELens with
apply_b_dec_to_input=false) get b_enc' = b_enc + b_dec·W_enc. Per-latent thresholds are kept as a
[d_sae] `threshold` vector (architecture "jumprelu").
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from saeforge.atomic import atomic_dir
from saeforge.sae.model import SAEConfig, SparseAutoencoder

SAELENS_CFG, SAELENS_WEIGHTS, SAELENS_SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"


def _sae_lens_version() -> str:
    """Installed sae-lens version (without importing it), at least 6.0.0."""
    try:
        version = importlib.metadata.version("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        return "6.0.0"
    return version if int(version.split(".")[0]) >= 6 else "6.0.0"


def write_saelens(
    sae: SparseAutoencoder,
    out_dir: str | Path,
    *,
    hook_name: str,
    hook_layer: int | None = None,
    model_name: str | None = None,
    provenance: dict[str, Any] | None = None,
    sparsity: Tensor | None = None,
    dtype: str = "float32",
) -> Path:
    """Write `sae` (on raw activations) as a SAELens v6 directory, atomically (temp dir + rename).

    batchtopk/jumprelu → architecture "jumprelu" with `threshold` broadcast to [d_sae];
    topk → architecture "topk" with k. `sparsity` [d_sae] is log10 firing frequency.
    """
    out_dir = Path(out_dir)
    arch = "topk" if sae.cfg.architecture == "topk" else "jumprelu"
    torch_dtype = getattr(torch, dtype)
    weights = {
        "W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec,
    }
    if arch == "jumprelu":
        weights["threshold"] = sae.threshold.expand(sae.cfg.d_sae)
    weights = {k: v.detach().to("cpu", torch_dtype).contiguous() for k, v in weights.items()}
    version = _sae_lens_version()
    cfg: dict[str, Any] = {
        "architecture": arch, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "dtype": dtype,
        "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none", "hook_name": hook_name, "hook_layer": hook_layer,
        "model_name": model_name,
        "metadata": {
            "sae_lens_version": version, "sae_lens_training_version": version,
            "model_name": model_name, "hook_name": hook_name, "hook_layer": hook_layer,
            "hook_head_index": None, "prepend_bos": True,
        },
        "saeforge": {
            "architecture": sae.cfg.architecture, "k": sae.cfg.k, **(provenance or {}),
        },
    }
    if arch == "topk":
        cfg.update(k=int(sae.cfg.k), rescale_acts_by_decoder_norm=False)
    with atomic_dir(out_dir) as tmp:
        save_file(weights, str(tmp / SAELENS_WEIGHTS))
        if sparsity is not None:
            save_file({"sparsity": sparsity.detach().to("cpu", torch.float32).contiguous()},
                      str(tmp / SAELENS_SPARSITY))
        (tmp / SAELENS_CFG).write_text(json.dumps(cfg, indent=2, default=str))
    return out_dir


# ---- import ----------------------------------------------------------------------------------
def _build(
    W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, *, architecture: str,
    k: float | None = None, threshold: Tensor | None = None, subtract_b_dec: bool = True,
) -> SparseAutoencoder:
    """Our module from weights in our layout (W_enc [d_in, d_sae], W_dec [d_sae, d_in])."""
    d_in, d_sae = W_enc.shape
    if W_dec.shape != (d_sae, d_in) or b_enc.shape != (d_sae,) or b_dec.shape != (d_in,):
        raise ValueError(f"inconsistent SAE shapes: W_enc {tuple(W_enc.shape)}, W_dec {tuple(W_dec.shape)}, "
                         f"b_enc {tuple(b_enc.shape)}, b_dec {tuple(b_dec.shape)}")
    dtype = W_enc.dtype if W_enc.is_floating_point() else torch.float32
    if not subtract_b_dec:  # x·W + b = (x − b_dec)·W + (b + b_dec·W)
        b_enc = (b_enc.double() + b_dec.double() @ W_enc.double()).to(dtype)
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, architecture=architecture))
    sae = sae.to(dtype)
    with torch.no_grad():
        for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(sae, name).copy_(value.to(dtype))
    if threshold is not None:
        sae.threshold = threshold.detach().to(dtype).clone()
    return sae


def _load_saelens(path: Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    cfg = json.loads((path / SAELENS_CFG).read_text())
    w = load_file(str(path / SAELENS_WEIGHTS))
    arch = cfg.get("architecture", "standard")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(f"{path}: normalize_activations={cfg['normalize_activations']!r} is not supported")
    subtract = bool(cfg.get("apply_b_dec_to_input", True))
    ours = cfg.get("saeforge", {})
    if arch in ("jumprelu", "standard"):
        threshold = w.get("threshold", torch.zeros(w["b_enc"].shape))
        if ours.get("architecture") == "batchtopk" and bool((threshold == threshold[0]).all()):
            sae = _build(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], architecture="batchtopk",
                         k=ours["k"], threshold=threshold[0], subtract_b_dec=subtract)
        else:
            sae = _build(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], architecture="jumprelu",
                         threshold=threshold, subtract_b_dec=subtract)
    elif arch == "topk":
        if cfg.get("rescale_acts_by_decoder_norm", False):
            raise ValueError(f"{path}: topk with rescale_acts_by_decoder_norm=true is not supported")
        sae = _build(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], architecture="topk",
                     k=int(cfg["k"]), subtract_b_dec=subtract)
    else:
        raise ValueError(f"{path}: SAELens architecture {arch!r} is not supported (jumprelu, standard, topk)")
    return sae, {"format": "saelens", "cfg": cfg}


def _load_sparsify(path: Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    cfg = json.loads((path / "cfg.json").read_text())
    w = load_file(str(path / "sae.safetensors"))
    if "W_skip" in w or cfg.get("transcode"):
        raise ValueError(f"{path}: sparsify transcoders / skip connections are not supported")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{path}: sparsify activation {cfg.get('activation')!r} is not supported (topk)")
    sae = _build(w["encoder.weight"].t().contiguous(), w["encoder.bias"], w["W_dec"], w["b_dec"],
                 architecture="topk", k=int(cfg["k"]))
    return sae, {"format": "sparsify", "cfg": cfg}


def _load_gemma_scope(file: Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    with np.load(file) as z:
        p = {k: torch.from_numpy(np.asarray(z[k])) for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    sae = _build(p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], architecture="jumprelu",
                 threshold=p["threshold"], subtract_b_dec=False)
    return sae, {"format": "gemma_scope", "cfg": {}}


def _load_dictionary_learning(file: Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    sd = torch.load(file, map_location="cpu", weights_only=True)
    meta: dict[str, Any] = {}
    if (file.parent / "config.json").exists():
        meta = json.loads((file.parent / "config.json").read_text())
    dict_class = str(meta.get("trainer", {}).get("dict_class", ""))
    W_enc, b_enc, W_dec = sd["encoder.weight"].t().contiguous(), sd["encoder.bias"], sd["decoder.weight"].t().contiguous()
    if "b_dec" in sd:  # TopK / BatchTopK variants
        has_threshold = "threshold" in sd and float(sd["threshold"]) >= 0
        if dict_class == "BatchTopKSAE" or (has_threshold and dict_class != "AutoEncoderTopK"):
            t = sd.get("threshold", torch.tensor(0.0)).clamp_min(0)
            sae = _build(W_enc, b_enc, W_dec, sd["b_dec"], architecture="batchtopk",
                         k=float(sd["k"]), threshold=t)
        else:
            sae = _build(W_enc, b_enc, W_dec, sd["b_dec"], architecture="topk", k=int(sd["k"]))
    elif "bias" in sd:  # standard AutoEncoder: relu(encoder(x − bias)), decoder(f) + bias
        sae = _build(W_enc, b_enc, W_dec, sd["bias"], architecture="jumprelu", threshold=torch.tensor(0.0))
    else:
        raise ValueError(f"{file}: dictionary_learning state dict has neither 'b_dec' nor 'bias'")
    return sae, {"format": "dictionary_learning", "cfg": meta}


def load_sae(path: str | Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Load an SAE, detecting the format; returns (module on raw activations, info dict).

    Recognised: SAELens / saeforge dir (cfg.json + sae_weights.safetensors), sparsify dir
    (cfg.json + sae.safetensors), Gemma Scope params.npz, dictionary_learning ae.pt (a file or a
    dir holding it).
    """
    path = Path(path)
    if path.is_dir():
        if (path / SAELENS_CFG).exists() and (path / SAELENS_WEIGHTS).exists():
            return _load_saelens(path)
        if (path / "cfg.json").exists() and (path / "sae.safetensors").exists():
            return _load_sparsify(path)
        if (path / "params.npz").exists():
            return _load_gemma_scope(path / "params.npz")
        if (path / "ae.pt").exists():
            return _load_dictionary_learning(path / "ae.pt")
    elif path.suffix == ".npz":
        return _load_gemma_scope(path)
    elif path.suffix in (".pt", ".pth"):
        return _load_dictionary_learning(path)
    raise ValueError(
        f"{path}: no SAE found. Expected a directory with cfg.json + sae_weights.safetensors (SAELens), "
        "cfg.json + sae.safetensors (sparsify), params.npz (Gemma Scope) or ae.pt (dictionary_learning), "
        "or one of those files."
    )


def _npy_shape(handle: Any) -> tuple[int, ...]:
    major, _ = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, _, _ = read(handle)  # the header only, no data read
    return tuple(int(s) for s in shape)


def sae_dimensions(path: str | Path) -> tuple[int, int]:
    """(d_in, d_sae) of an SAE that `load_sae` reads, from file headers only (no weights loaded)."""
    import zipfile

    from safetensors import safe_open

    path = Path(path)
    file = path
    if path.is_dir():
        for name in (SAELENS_WEIGHTS, "sae.safetensors", "params.npz", "ae.pt"):
            if (path / name).exists():
                file = path / name
                break
    if file.suffix == ".safetensors":
        with safe_open(str(file), "pt") as f:
            key = "W_enc" if "W_enc" in f.keys() else "encoder.weight"
            shape = tuple(f.get_slice(key).get_shape())
        return (shape[0], shape[1]) if key == "W_enc" else (shape[1], shape[0])
    if file.suffix == ".npz":
        with zipfile.ZipFile(file) as zf, zf.open("W_enc.npy") as handle:
            d_in, d_sae = _npy_shape(handle)
        return d_in, d_sae
    if file.suffix in (".pt", ".pth"):
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        d_sae, d_in = sd["encoder.weight"].shape
        return int(d_in), int(d_sae)
    sae = load_sae(path)[0]  # raises load_sae's error for anything unrecognised
    return sae.cfg.d_in, sae.cfg.d_sae
