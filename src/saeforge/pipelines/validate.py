"""Checks that run first in every pipeline, before any model load, corpus read or extraction.

Each `validate_*` turns the composed Hydra config into its typed settings (saeforge.config) and
raises `ConfigError` — one line naming the full key — for unknown keys and out-of-range values.
Checks that need the model's depth or width read it cheaply (see saeforge.lm.dimensions).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from saeforge.config import (
    ConfigError,
    DataConfig,
    EvaluateConfig,
    InterpretConfig,
    TrainConfig,
    check_trainer_key,
    from_config,
)
from saeforge.lm.hookpoints import LORA_HOOKPOINT, canonical_name, check_hookpoint

log = logging.getLogger(__name__)


@dataclass
class TrainPlan:
    """What `validate_train` found out: the typed settings, the data width and the SAE's export name."""

    settings: TrainConfig
    d_in: int
    hookpoint: str
    """Name the SAE is exported under: the (canonical) hookpoint, or for a user file without
    data.hookpoint a name derived from the file."""
    store_hookpoint: str | None
    """Hookpoint to read inside an activation store (None for a user file)."""
    resume: Path | None = None
    """The checkpoint training resumes from (`resume_checkpoint`), None for a fresh run."""
    model_name: str | None = None
    """A user file's model as the command line named it (`model=`, `model.name=`), else None: recorded
    as the SAE's model (cfg.json `model_name`, run_config.yaml `model.name`) instead of the default model."""
    hookpoint_given: bool = True
    """False for a user file without data.hookpoint: run_config.yaml records `data.hookpoint: null`."""


def file_hookpoint_name(path: str) -> str:
    """An export name for a user activation file: its stem, with anything but [A-Za-z0-9._-] → `_`."""
    p = Path(path).expanduser()
    stem = p.name if p.is_dir() else p.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "activations"


def hookpoint_given(cfg: DictConfig) -> bool:
    """True when data.hookpoint was set (not the default `${model.hookpoint}`)."""
    return not OmegaConf.is_interpolation(cfg.data, "hookpoint") and cfg.data.get("hookpoint") is not None


def model_given(cfg: DictConfig) -> bool:
    """True when the command line picked the model (`model=...` or `model.name=...`), not the default
    group. A config composed without Hydra's runtime (the Python API) counts its model as given."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return True
    return any(o.lstrip("+~").partition("=")[0] in ("model", "model.name") for o in HydraConfig.get().overrides.task)


def run_model(run_cfg: DictConfig | None, cfg: DictConfig, run_dir: Path | None) -> Any:
    """The model config of an SAE's LM: its training run's; the command line's for an imported SAE, or for
    a run on a user file that recorded no model (`model.name: null`) when `model=` is given; else ConfigError."""
    if run_cfg is None:
        return cfg.model
    if run_cfg.model.get("name") is not None:
        return run_cfg.model
    if model_given(cfg):
        return cfg.model
    raise ConfigError(f"{run_dir}/run_config.yaml: this SAE was trained on {run_cfg.data.get('path')} with no model named; "
                      "pass model=<config> or model=hub model.name=<hub id | folder | .gguf> for the LM its activations came from")


def check_trainer(trainer: dict[str, Any]) -> None:
    for key in trainer:
        check_trainer_key(str(key))


def _store_d_in(cfg: DictConfig, hookpoint: str) -> int | None:
    """d_in from a complete cached store with this config's cache key (no model needed), else None."""
    from saeforge.activations.extract import store_root
    from saeforge.activations.store import is_complete, read_manifest

    root = store_root(cfg.model, cfg.corpus, cfg.data)
    if not is_complete(root):
        return None
    d_in = (read_manifest(root) or {}).get("d_in", {}).get(hookpoint)
    return int(d_in) if d_in is not None else None


def validate_train(cfg: DictConfig) -> TrainPlan:
    """Typed settings of a training run, checked against the data/model dimensions (read cheaply).

    Fills in derived values in `cfg` itself: a hub model's default hookpoint (its middle layer).
    """
    dims = None
    if not cfg.data.get("path") and _hookpoint_unset(cfg):
        dims = _dimensions(cfg)  # a hub model without a hookpoint: its middle layer
        cfg.model.hookpoint = f"layers.{dims.n_layers // 2}"
    settings = from_config(TrainConfig, cfg, "")
    check_trainer(settings.trainer)
    data = settings.data
    if data.path:
        from saeforge.activations.readers import open_rows

        try:
            source = open_rows(data.path, None, data.h5_key, data.read_rows)
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise ConfigError(f"data.path={data.path!r}: {str(err).splitlines()[0]}") from err
        d_in = source.d_in
        hookpoint = canonical_name(str(data.hookpoint)) if hookpoint_given(cfg) else file_hookpoint_name(data.path)
        settings.sae.check_k(d_in)
        return TrainPlan(settings, d_in, hookpoint, None, resume=checked_resume(cfg, settings, d_in),
                         model_name=settings.model.name if model_given(cfg) else None, hookpoint_given=hookpoint_given(cfg))

    from saeforge.lm.dimensions import lora_width

    check_extract_devices(settings)
    hookpoint = canonical_name(str(data.hookpoint))
    hookpoints = [str(h) for h in (data.hookpoints or [hookpoint])]
    if hookpoint not in [canonical_name(h) for h in hookpoints]:
        raise ConfigError(f"data.hookpoint={data.hookpoint} is not among data.hookpoints={hookpoints}")
    if LORA_HOOKPOINT in hookpoints and not (data.lora and data.lora.adapter):
        raise ConfigError("data.lora.adapter is required for hookpoint `lora` (a peft LoRA adapter folder)")
    # a complete cached store knows d_in without the model (hub models need no AutoConfig then);
    # the tiny model's dimensions are in its config, cheaper than computing a cache key
    d_in = None if cfg.model.get("tiny") is not None else _store_d_in(cfg, hookpoint)
    if d_in is None:
        dims = dims or _dimensions(cfg)
        for h in hookpoints:
            try:
                check_hookpoint(h, dims.n_layers)
            except ValueError as err:
                key = "data.hookpoint" if canonical_name(h) == hookpoint else "data.hookpoints"
                raise ConfigError(f"{key}={h}: {err}") from err
        if hookpoint == LORA_HOOKPOINT:
            assert data.lora is not None and data.lora.adapter
            try:
                d_in = lora_width(data.lora.adapter, data.lora.types, dims.n_layers)
            except ValueError as err:
                raise ConfigError(str(err)) from err
        else:
            d_in = dims.d_model
    settings.sae.check_k(d_in)
    return TrainPlan(settings, d_in, hookpoint, hookpoint, checked_resume(cfg, settings, d_in))


def checked_resume(cfg: DictConfig, settings: TrainConfig, d_in: int) -> Path | None:
    """The checkpoint this run resumes (`resume_checkpoint`: readable, the data's width), refused unless it was
    trained under this run's settings (`check_resume_fingerprint`); None for a fresh run (overwrite=[run] too)."""
    if "run" in settings.overwrite:
        if settings.ckpt_path not in (None, "last"):
            raise ConfigError(f"overwrite=[run] starts a fresh run, but ckpt_path={settings.ckpt_path} asks to resume "
                              "one: give one of them")
        return None
    ckpt = resume_checkpoint(cfg, d_in)
    if ckpt is not None:
        check_resume_fingerprint(cfg, ckpt)
    return ckpt


def check_extract_devices(settings: TrainConfig) -> None:
    """data.extract_devices=N: on CUDA, N visible devices and model.device auto or cuda (ranks use cuda:0..N-1)."""
    n, device = settings.data.extract_devices, settings.model.device
    if n == 1:
        return
    import torch

    if device.startswith("cuda:"):
        raise ConfigError(f"data.extract_devices={n} puts rank r on cuda:r; set model.device=auto or cuda, not {device}")
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if on_cuda and n > torch.cuda.device_count():
        raise ConfigError(f"data.extract_devices={n} but only {torch.cuda.device_count()} CUDA device(s) are visible")


def _train_run_dir(cfg: DictConfig) -> Path:
    """The directory a training run writes to (as `pipelines.run.run_dir`, without creating it)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(str(cfg.run.dir))


LAST_CKPT = "last.ckpt"
STEP = re.compile(r"step=(\d+)")


def resume_checkpoint(cfg: DictConfig, d_in: int | None = None) -> Path | None:
    """The checkpoint a training run resumes from: the one choice, made once in `validate_train`.

    `ckpt_path=<file>` must be readable. Otherwise (`ckpt_path` null or `last`) <run dir>/checkpoints/last.ckpt,
    or where it is unreadable (truncated by a kill or a full disk) the newest readable step checkpoint there,
    with a warning line per unreadable file. None for extract_only, or when there is no checkpoint (a fresh
    run). ConfigError when checkpoints exist but none is readable, or the chosen one's d_in is not `d_in`.
    Cheap: a candidate is loaded memory-mapped, its tensors not read.
    """
    ckpt_path = cfg.get("ckpt_path")
    if cfg.get("extract_only"):
        return None
    if ckpt_path not in (None, "last"):
        path = Path(str(ckpt_path))
        if not path.is_file():
            raise ConfigError(f"ckpt_path={str(path)!r} does not exist")
        try:
            ckpt = _read_checkpoint(path)
        except ValueError as err:
            raise ConfigError(f"ckpt_path={str(path)!r} is {err}") from None
        log.info("resuming from %s", path)
    else:
        folder = _train_run_dir(cfg) / "checkpoints"
        found = _newest_readable(folder)
        if found is None:
            if ckpt_path == "last":
                raise ConfigError(f"ckpt_path=last but {folder / LAST_CKPT} does not exist")
            return None
        path, ckpt = found
    w_enc = ckpt["state_dict"].get("sae.W_enc")
    if d_in is not None and w_enc is not None and int(w_enc.shape[0]) != d_in:
        raise ConfigError(f"checkpoint {path} has d_in={int(w_enc.shape[0])} but the data has d_in={d_in}: "
                          "train into another run.dir, or point data at what this run was trained on")
    return path


def _checkpoint_candidates(folder: Path) -> list[Path]:
    """last.ckpt, then the step checkpoints newest first (by the step in their name, then mtime)."""
    if not folder.is_dir():
        return []

    def newest(p: Path) -> tuple[int, float]:
        match = STEP.search(p.name)
        return (int(match[1]) if match else -1, p.stat().st_mtime)

    steps = sorted((p for p in folder.glob("*.ckpt") if p.name != LAST_CKPT and p.is_file()), key=newest, reverse=True)
    last = folder / LAST_CKPT
    return ([last] if last.is_file() else []) + steps


def _newest_readable(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The first readable of `_checkpoint_candidates(folder)` and its content, logged (a warning line for each
    unreadable one before it). None when there is no candidate; ConfigError when none is readable."""
    bad = []
    for path in _checkpoint_candidates(folder):
        try:
            ckpt = _read_checkpoint(path)
        except ValueError as err:
            log.warning("checkpoint %s is %s: skipping it", path, err)
            bad.append(path.name)
            continue
        if bad:
            log.warning("resuming from %s instead, the newest readable checkpoint", path)
        else:
            log.info("resuming from %s", path)
        return path, ckpt
    if bad:
        raise ConfigError(f"no readable checkpoint in {folder} ({', '.join(bad)}: truncated or corrupt): "
                          "delete that folder to train from scratch, or train into a new run.dir")
    return None


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's content, memory-mapped (its tensors are not read); ValueError saying what is wrong."""
    import torch

    if path.stat().st_size == 0:
        raise ValueError("empty")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on a bad file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]  # torch adds advice
        raise ValueError(f"unreadable: truncated or corrupt ({first})") from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError("not a Lightning checkpoint (no state_dict)")
    return ckpt


FINGERPRINT_KEY = "saeforge_fingerprint"
"""Where a checkpoint carries its run's training fingerprint (`saeforge.config.fingerprint`)."""


def run_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The training fingerprint of a composed train config (or of a run's recorded `run_config.yaml`)."""
    from saeforge.config.fingerprint import training_fingerprint

    groups = {g: OmegaConf.to_container(cfg[g], resolve=True) if cfg.get(g) is not None else {}
              for g in ("model", "corpus", "data", "sae")}
    trainer = trainer_kwargs_from(OmegaConf.to_container(cfg.get("trainer") or {}, resolve=True))
    trainer["devices"] = ranks_per_node(trainer)
    return training_fingerprint({**groups, "trainer": trainer, "seed": cfg.get("seed")})


def ranks_per_node(trainer: dict[str, Any]) -> int:
    """The number of processes `trainer.devices` starts per node (`auto` / -1: every GPU when on GPUs, else 1)."""
    devices = trainer.get("devices", "auto")
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    elif isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    import torch

    accelerator = trainer.get("accelerator", "auto")
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return max(1, torch.cuda.device_count()) if on_gpu else 1


def recorded_fingerprint(ckpt: Path, run: Path) -> dict[str, Any] | None:
    """The fingerprint a checkpoint was trained under: stored in it, else (runs from before fingerprints)
    computed from the run's `run_config.yaml`; None when neither is there."""
    stored = _read_checkpoint(ckpt).get(FINGERPRINT_KEY)
    if stored is not None:
        return dict(stored)
    from saeforge.sae.source import RUN_CONFIG

    if not (run / RUN_CONFIG).is_file():
        return None
    return run_fingerprint(OmegaConf.load(run / RUN_CONFIG))


def check_resume_fingerprint(cfg: DictConfig, ckpt: Path) -> None:
    """A checkpoint resumes only under the settings it was trained with: else one line naming each changed key."""
    from saeforge.config.fingerprint import fingerprint_changes

    run = _train_run_dir(cfg)
    old = recorded_fingerprint(ckpt, run)
    if old is None:
        log.warning("%s records no settings fingerprint: resuming it unchecked", ckpt)
        return
    changes = fingerprint_changes(old, run_fingerprint(cfg))
    if changes:
        raise ConfigError(f"run.dir={str(run)!r} was trained with other settings ({'; '.join(changes)}): resuming it "
                          "would not give the run you asked for; use a new run.dir, or overwrite=[run] to move the "
                          "old run aside and start fresh")


def _hookpoint_unset(cfg: DictConfig) -> bool:
    """data.hookpoint resolves to nothing (model.hookpoint null and data.hookpoint not given)."""
    try:
        return cfg.data.get("hookpoint") is None
    except Exception:  # an interpolation that cannot resolve: from_config reports it
        return False


def _dimensions(cfg: DictConfig) -> Any:
    from saeforge.lm.dimensions import model_dimensions

    try:
        return model_dimensions(cfg.model)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"model.name={cfg.model.get('name')!r}: {str(err).splitlines()[0]}") from err


def trainer_kwargs_from(trainer: dict[str, Any]) -> dict[str, Any]:
    """Lightning kwargs from the `trainer` group: `max_steps` alone trains that many steps; with neither
    max_steps nor max_epochs one pass over the data; `precision: auto` → bf16-mixed on CUDA, else 32-true."""
    import torch

    kwargs = dict(trainer)
    steps = kwargs.get("max_steps")
    if kwargs.get("max_epochs") is None:
        kwargs["max_epochs"] = -1 if steps not in (None, -1) else 1
    if kwargs.get("precision") == "auto":
        accelerator = kwargs.get("accelerator")
        on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        kwargs["precision"] = "bf16-mixed" if on_gpu else "32-true"
    return kwargs


def validate_evaluate(cfg: DictConfig) -> EvaluateConfig:
    """Typed settings of `evaluate.py` (unknown keys and bad values fail here, before any load)."""
    settings = from_config(EvaluateConfig, cfg, "")
    if not settings.compare and not settings.ckpt:
        raise ConfigError("ckpt is required: give ckpt=<run dir | .ckpt | SAE dir> or compare=[run_a,run_b]")
    return settings


def validate_interpret(cfg: DictConfig) -> InterpretConfig:
    """Typed settings of `interpret.py` (unknown keys and bad values fail here, before any load)."""
    settings = from_config(InterpretConfig, cfg, "")
    if not settings.ckpt:
        raise ConfigError("ckpt is required: give ckpt=<run dir | .ckpt | SAE dir>")
    check_surprisal_client(settings)
    from saeforge.interpret.prompts import load_prompts, resolve_prompt_file

    try:  # the prompt file of the config or $PROMPT_CONFIG_FILE (a run dir's prompts.yaml is checked once found)
        load_prompts(resolve_prompt_file(settings.prompts.override, settings.run.dir or None)[0])
    except (OSError, ValueError) as err:
        raise ConfigError(f"prompts: {' '.join(str(err).split())}") from None
    ckpts = interpret_ckpts(settings)
    hookpoints = settings.interpret.hookpoints
    if len(ckpts) > 1 and hookpoints is not None and len(hookpoints) != len(ckpts):
        raise ConfigError(f"interpret.hookpoints has {len(hookpoints)} entries but ckpt lists {len(ckpts)} SAEs: "
                          "give one hookpoint per ckpt, or interpret.hookpoints=null")
    if hookpoints is not None and settings.hookpoint:
        raise ConfigError("give either hookpoint or interpret.hookpoints, not both")
    check_local_explainer(settings.explainer.kind, settings.explainer.model)
    if settings.interpret.maxact.non_activating_source == "faiss":
        import importlib.util

        if importlib.util.find_spec("faiss") is None:
            raise ConfigError("interpret.maxact.non_activating_source=faiss needs faiss-cpu: pip install faiss-cpu==1.15.1")
    return settings


NO_PROMPT_LOGPROBS = ("api.openai.com", "openrouter.ai")
"""Hosts whose OpenAI-compatible APIs return no prompt logprobs (no completions `echo`)."""


def check_surprisal_client(settings: InterpretConfig) -> None:
    """The surprisal scorer needs prompt logprobs: refuse, before any load, a hosted API known not to give them."""
    icfg, explainer = settings.interpret, settings.explainer
    if "score" not in icfg.stages or "surprisal" not in icfg.score.scorers or explainer.kind != "openai":
        return
    host = next((h for h in NO_PROMPT_LOGPROBS if h in str(explainer.base_url or "")), None)
    if host is not None:
        raise ConfigError(f"interpret.score.scorers: surprisal needs prompt logprobs, which {host} does not return; "
                          "use explainer=local or a vLLM server (explainer=vllm), or drop surprisal")


def check_local_explainer(kind: str, model: str | None) -> None:
    """explainer.kind=local with explainer.model naming a file or folder: it must exist (a .gguf file or
    a folder with config.json); other names are hub ids or the analysed model's name."""
    if kind != "local" or not model:
        return
    path = Path(str(model)).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"explainer.model={model}: no such .gguf file")
    elif path.exists() or str(model).startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise ConfigError(f"explainer.model={model}: not a model folder (no config.json) or a .gguf file")


def interpret_ckpts(settings: InterpretConfig) -> list[str]:
    """`ckpt` as a list of paths (one entry for a single ckpt)."""
    ckpt = settings.ckpt
    ckpts = [ckpt] if isinstance(ckpt, (str, Path)) else list(ckpt) if isinstance(ckpt, (list, tuple)) else None
    if not ckpts or not all(isinstance(c, (str, Path)) and str(c) for c in ckpts):
        raise ConfigError(f"ckpt must be a path or a non-empty list of paths, got {ckpt!r}")
    return [str(c) for c in ckpts]


def exclude_first_tokens(run_cfg: DictConfig | None, imported: int) -> int:
    """Excluded first positions: the training run's data.exclude_first_tokens, else `imported.exclude_first_tokens`."""
    if run_cfg is not None and run_cfg.get("data") is not None:
        return int(run_cfg.data.get("exclude_first_tokens", DataConfig.exclude_first_tokens))  # older runs: the default
    return int(imported)


@dataclass
class DiscoverPlan:
    """What `validate_discover` checked: settings, sentences, the resolved SAE set, folders, fingerprint."""

    cfg: DictConfig
    settings: Any  # DiscoverConfig
    concepts: Any  # ConceptSentences | None (analyze without a CSV)
    saes: list[Any]  # [ResolvedSAE]; empty for discover.stage=analyze
    out: Path
    activations_dir: Path
    fingerprint: str
    devices: int


def validate_discover(cfg: DictConfig) -> DiscoverPlan:
    """`discover.py`: the CSV, the SAE set (files, hookpoints, widths) and the output folder, before any model load."""
    from saeforge.config import DiscoverConfig
    from saeforge.discover.concepts import read_concepts
    from saeforge.discover.extract import extraction_fingerprint
    from saeforge.discover.files import read_configurations
    from saeforge.discover.sae_set import resolve_sae_set
    from saeforge.lm.dimensions import model_dimensions

    settings = from_config(DiscoverConfig, cfg, "")
    stage = settings.discover.stage
    if stage != "analyze" and not settings.concepts:
        raise ConfigError("concepts is required: give concepts=<CSV with columns sentence, concept_strength_label>")
    if stage != "analyze" and not settings.saes:
        raise ConfigError("saes is required: give saes=<YAML or JSON SAE set>")
    concepts = read_concepts(settings.concepts) if settings.concepts else None
    name = Path(str(settings.concepts)).stem if settings.concepts else "concepts"
    out = Path(settings.run.dir).expanduser() if settings.run.dir else Path("runs") / f"discover-{name}"
    acts_dir = out / "activations"
    devices = settings.discover.devices
    if devices is None:
        trainer_devices = settings.trainer.get("devices")
        devices = trainer_devices if isinstance(trainer_devices, int) and trainer_devices > 0 else 1
    if stage == "analyze":
        if read_configurations(acts_dir) is None and not list(acts_dir.glob("layer_*_activations.npz")):
            raise ConfigError(f"discover.stage=analyze: {acts_dir} holds no extracted activations (run discover.stage=extract first)")
        return DiscoverPlan(cfg, settings, concepts, [], out, acts_dir, "", int(devices))
    try:
        dims = model_dimensions(cfg.model)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    saes = resolve_sae_set(str(settings.saes), dims.n_layers, dims.d_model)
    fingerprint = extraction_fingerprint(concepts, saes, cfg.model, settings.discover)
    try:
        existing = read_configurations(acts_dir)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if existing is not None and existing.get("fingerprint") != fingerprint and not settings.discover.overwrite:
        raise ConfigError(f"run.dir={str(out)!r} holds an extraction of other inputs (CSV, SAE set, model or "
                          "discover settings); set discover.overwrite=true to start over, or pick another run.dir")
    return DiscoverPlan(cfg, settings, concepts, saes, out, acts_dir, fingerprint, int(devices))


__all__ = ["DiscoverPlan", "TrainPlan", "exclude_first_tokens", "file_hookpoint_name", "interpret_ckpts", "model_given", "run_model", "trainer_kwargs_from", "validate_evaluate",
           "validate_discover", "validate_interpret", "validate_train"]
