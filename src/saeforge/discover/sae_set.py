"""The SAE set of a concept discovery: a YAML or JSON file listing one entry per configuration.

```yaml
saes:                                   # or the file is just this list
  - {layer: 3, l0: 20, path: runs/demo/sae/layers.3}           # any format load_sae reads
  - {hookpoint: layers.5, release: gemma-scope-2b-pt-res, sae_id: layer_5/width_16k/average_l0_34}
  - {layer: 7, name: mine, repo: google/gemma-scope-2b-pt-res, path: layer_7/width_16k/average_l0_36}
from_release:                           # shorthand: every SAE of a SAELens release, filtered
  release: gemma-scope-2b-pt-res
  layers: [0, 1, 2]                     # null: every layer
  widths: [16k]                         # matched against width_<w> in the sae_id; null: every width
```

Each entry names its hookpoint (`hookpoint`, or `layer` → `layers.N`) and its sparsity label (`l0`,
else `name`): the output file is `layer_{L}_l0_{l0 or name}_activations.npz`. For registry SAEs the
layer and l0 default to what the SAELens registry and sae_id say. Sources, exactly one per entry:
- `path`: a local SAE in any format `saeforge.sae.formats.load_sae` reads;
- `release` + `sae_id`: resolved through SAELens's pretrained registry (the installed package's
  `pretrained_saes.yaml`, which its `get_pretrained_saes_directory` reads) to a Hugging Face repo and
  folder, then read from the local Hugging Face cache only (no download);
- `repo` (+ `revision`) + `path`: a file or folder in a Hugging Face repo, from the local cache only.

`resolve_sae_set` checks the whole set before any model loads: the files exist, every hookpoint
exists in the model, every SAE's d_in is the model's width, no two entries write the same file. The
Neuronpedia id comes from the registry (or from another release of the same repo listing the same
folder, e.g. a `-canonical` release); other SAEs get none.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from saeforge.config import ConfigError
from saeforge.discover.files import activation_file_name
from saeforge.lm.hookpoints import check_hookpoint, hookpoint_layer
from saeforge.paths import installed_package_folder

ENTRY_KEYS = {"hookpoint", "layer", "name", "l0", "path", "release", "sae_id", "repo", "revision", "neuronpedia"}
SHORTHAND_KEYS = {"release", "layers", "widths"}
SAE_FILES = (("params.npz",), ("cfg.json", "sae_weights.safetensors"), ("cfg.json", "sae.safetensors"), ("ae.pt",))
"""What a folder holding an SAE contains, per format (load_sae's order); the first file found decides."""


@dataclass(frozen=True)
class ResolvedSAE:
    """One configuration of the set, resolved to a local SAE and checked against the model."""

    index: int
    file: str
    """Its activation file name (layer_{L}_l0_{l0}_activations.npz)."""
    hookpoint: str
    layer: int
    l0: str
    """The sparsity label in the file name (the entry's l0, else its name)."""
    average_l0: float | None
    """The numeric l0 when the entry gives one (stored as the npz's average_l0), else None."""
    source: str
    """Where it came from, for people: the path, `release/sae_id` or `repo:path`."""
    local: str
    """The local SAE file or folder (load_sae reads it)."""
    neuronpedia_id: str | None
    d_in: int
    d_sae: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RegistryRelease:
    """One release of SAELens's pretrained registry (the fields of its PretrainedSAELookup we use)."""

    repo_id: str
    saes_map: dict[str, str]
    """sae_id → folder in the repo."""
    expected_l0: dict[str, float]
    neuronpedia_id: dict[str, str]


@cache
def saelens_registry() -> dict[str, RegistryRelease]:
    """SAELens's pretrained-SAE registry (release → RegistryRelease), read from the installed package's
    pretrained_saes.yaml, the file its get_pretrained_saes_directory reads (importing sae_lens itself
    would pull in TransformerLens and take seconds)."""
    try:
        folder = installed_package_folder("sae_lens", "SAELens releases in an SAE set need `pip install sae-lens`")
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    with open(folder / "pretrained_saes.yaml") as handle:
        data = yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    out = {}
    for release, value in data.items():
        saes = value.get("saes") or []
        out[release] = RegistryRelease(
            repo_id=str(value["repo_id"]), saes_map={str(s["id"]): str(s["path"]) for s in saes},
            expected_l0={str(s["id"]): float(s["l0"]) for s in saes if s.get("l0")},
            neuronpedia_id={str(s["id"]): str(s["neuronpedia"]) for s in saes if s.get("neuronpedia")})
    return out


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read at call time: $HF_HUB_CACHE, else $HF_HOME/hub, else the default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _cached_file(repo: str, filename: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir(), revision=revision)
    return Path(found) if isinstance(found, str) else None


def cached_sae(repo: str, path: str, revision: str | None = None) -> Path | None:
    """The local copy of an SAE file or folder in a Hugging Face repo, from the cache only (None if absent)."""
    path = path.strip("/")
    if Path(path).suffix in (".npz", ".pt", ".pth"):
        return _cached_file(repo, path, revision)
    for names in SAE_FILES:
        files = [_cached_file(repo, f"{path}/{name}", revision) for name in names]
        if all(files):
            return files[0].parent  # type: ignore[union-attr]
    return None


def _parse_int(pattern: str, text: str) -> int | None:
    match = re.search(pattern, text)
    return int(match.group(1)) if match else None


def _neuronpedia(registry: dict[str, Any], release: str, sae_id: str) -> str | None:
    lookup = registry[release]
    if lookup.neuronpedia_id.get(sae_id):
        return str(lookup.neuronpedia_id[sae_id])
    folder = lookup.saes_map[sae_id]
    for other in registry.values():  # the same folder listed by another release of the repo (e.g. -canonical)
        if other.repo_id == lookup.repo_id:
            for other_id, other_path in other.saes_map.items():
                if other_path == folder and other.neuronpedia_id.get(other_id):
                    return str(other.neuronpedia_id[other_id])
    return None


def _expand_release(spec: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(spec, dict) or "release" not in spec or set(spec) - SHORTHAND_KEYS:
        raise ConfigError(f"{where}: expected a mapping with release (and optional layers, widths); got {spec!r}")
    registry = saelens_registry()
    release = str(spec["release"])
    if release not in registry:
        raise ConfigError(f"{where}: unknown SAELens release {release!r}")
    layers = None if spec.get("layers") is None else {int(x) for x in spec["layers"]}
    widths = None if spec.get("widths") is None else {str(w) for w in spec["widths"]}
    out = []
    for sae_id in registry[release].saes_map:
        layer = _parse_int(r"(?:layer_|blocks\.)(\d+)", sae_id)
        width = re.search(r"width_([^/]+)", sae_id)
        if layer is None or (layers is not None and layer not in layers):
            continue
        if widths is not None and (width is None or width.group(1) not in widths):
            continue
        out.append({"release": release, "sae_id": sae_id})
    if not out:
        raise ConfigError(f"{where}: release {release!r} has no SAE with layers={spec.get('layers')} "
                          f"widths={spec.get('widths')}")
    return out


def read_sae_set(path: str | Path) -> list[dict[str, Any]]:
    """The entries of an SAE set file (YAML or JSON), the shorthand expanded, each key checked."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"saes={str(path)!r}: no such file (a YAML or JSON list of SAEs)")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML/JSON ({str(err).splitlines()[0]})") from None
    if isinstance(doc, list):
        doc = {"saes": doc}
    if not isinstance(doc, dict) or set(doc) - {"saes", "from_release"}:
        raise ConfigError(f"{path}: expected a list of SAEs, or a mapping with `saes` and/or `from_release`")
    entries = list(doc.get("saes") or [])
    shorthand = doc.get("from_release")
    for i, spec in enumerate(shorthand if isinstance(shorthand, list) else [shorthand] if shorthand else []):
        entries += _expand_release(spec, f"{path} from_release[{i}]")
    if not entries:
        raise ConfigError(f"{path}: the SAE set is empty")
    for i, entry in enumerate(entries):
        where = f"{path} entry {i}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping, got {entry!r}")
        unknown = set(entry) - ENTRY_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(ENTRY_KEYS)}")
        sources = [s for s in ("release", "repo") if s in entry] or (["path"] if "path" in entry else [])
        if len(sources) != 1 or ("release" in entry and "sae_id" not in entry) or ("repo" in entry and "path" not in entry):
            raise ConfigError(f"{where}: give exactly one source: path, release + sae_id, or repo + path")
    return entries


def _resolve_entry(index: int, entry: dict[str, Any], set_file: Path, n_layers: int, d_model: int) -> ResolvedSAE:
    where = f"{set_file} entry {index}"
    registry_l0 = neuronpedia = None
    if "release" in entry:
        registry = saelens_registry()
        release, sae_id = str(entry["release"]), str(entry["sae_id"])
        if release not in registry:
            raise ConfigError(f"{where}: unknown SAELens release {release!r}")
        if sae_id not in registry[release].saes_map:
            raise ConfigError(f"{where}: release {release!r} has no sae_id {sae_id!r}")
        repo, folder = registry[release].repo_id, registry[release].saes_map[sae_id]
        local = cached_sae(repo, folder)
        source = f"{release}/{sae_id}"
        registry_l0 = registry[release].expected_l0.get(sae_id) or None
        neuronpedia = _neuronpedia(registry, release, sae_id)
        if local is None:
            raise ConfigError(f"{where}: {source} ({repo}:{folder}) is not in the Hugging Face cache {hub_cache_dir()} "
                              "(download it once, e.g. `huggingface-cli download`, then rerun offline)")
        id_text = sae_id
    elif "repo" in entry:
        repo, folder = str(entry["repo"]), str(entry["path"])
        local = cached_sae(repo, folder, entry.get("revision"))
        source = f"{repo}:{folder}"
        if local is None:
            raise ConfigError(f"{where}: {source} is not in the Hugging Face cache {hub_cache_dir()}")
        id_text = folder
    else:
        local = Path(str(entry["path"])).expanduser()
        if not local.is_absolute() and not local.exists():
            local = (set_file.parent / local)  # relative to the set file, when not relative to the cwd
        source = str(entry["path"])
        if not local.exists():
            raise ConfigError(f"{where}: path {str(entry['path'])!r} does not exist")
        id_text = str(entry["path"])
    from saeforge.sae.formats import sae_dimensions

    try:
        d_in, d_sae = sae_dimensions(local)
    except (ValueError, KeyError, OSError) as err:
        raise ConfigError(f"{where}: {str(err).splitlines()[0]}") from None
    hook_name = entry.get("hookpoint")
    if hook_name is None and entry.get("layer") is not None:
        hook_name = f"layers.{int(entry['layer'])}"
    if hook_name is None:
        hook_name = _hook_from_files(local)
    if hook_name is None:
        layer = _parse_int(r"(?:layer_|blocks\.|layers\.)(\d+)", id_text)
        hook_name = None if layer is None else f"layers.{layer}"
    if hook_name is None:
        raise ConfigError(f"{where}: cannot tell the SAE's hookpoint; give hookpoint or layer")
    try:
        hookpoint = check_hookpoint(str(hook_name), n_layers)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    layer = hookpoint_layer(hookpoint)
    if layer is None:
        raise ConfigError(f"{where}: hookpoint {hook_name!r} is not a residual-stream layer")
    if d_in != d_model:
        raise ConfigError(f"{where}: the SAE's d_in={d_in} does not match the model's width {d_model} at {hookpoint}")
    l0 = entry.get("l0", registry_l0 if registry_l0 else _parse_int(r"l0_(\d+)", id_text))
    label = l0 if l0 is not None else entry.get("name")
    if label is None:
        raise ConfigError(f"{where}: give l0 or name (it names the file layer_{layer}_l0_<l0>_activations.npz)")
    label_text = str(int(label)) if isinstance(label, float) and label.is_integer() else str(label)
    try:
        average = float(l0) if l0 is not None else None
    except (TypeError, ValueError):
        average = None
    return ResolvedSAE(index=index, file=activation_file_name(layer, label_text), hookpoint=hookpoint, layer=layer,
                       l0=label_text, average_l0=average, source=source, local=str(local),
                       neuronpedia_id=entry.get("neuronpedia") or neuronpedia, d_in=d_in, d_sae=d_sae)


def _hook_from_files(local: Path) -> str | None:
    import json

    cfg = local / "cfg.json" if local.is_dir() else None
    if cfg is None or not cfg.is_file():
        return None
    data = json.loads(cfg.read_text())
    return data.get("hook_name") or (data.get("metadata") or {}).get("hook_name") or data.get("hookpoint")


def resolve_sae_set(path: str | Path, n_layers: int, d_model: int) -> list[ResolvedSAE]:
    """Read the set and resolve every entry (files found, hookpoints and widths checked), in file order."""
    path = Path(path).expanduser()
    resolved = [_resolve_entry(i, entry, path, n_layers, d_model) for i, entry in enumerate(read_sae_set(path))]
    seen: dict[str, int] = {}
    for sae in resolved:
        if sae.file in seen:
            raise ConfigError(f"{path} entries {seen[sae.file]} and {sae.index} both write {sae.file}; "
                              "give them different l0 or name")
        seen[sae.file] = sae.index
    return resolved
