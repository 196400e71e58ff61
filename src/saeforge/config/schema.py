"""Every setting of saeforge, once: one dataclass per config group, with its defaults and a docstring
under every field. `register_configs()` puts the top-level ones in Hydra's ConfigStore; the YAML
files under configs/ only pick group options and override values.

No `from __future__ import annotations` here: OmegaConf reads these annotations at run time.
"""

import math
import numbers
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from saeforge.config.checks import ConfigError, check_env_name, from_config, require, require_at_least

# ---------------------------------------------------------------------------------------------- model


@dataclass
class TinyModelConfig:
    """Sizes of the tiny random Llama (`model=tiny`)."""

    hidden_size: int = 64
    """d_model."""
    intermediate_size: int = 128
    """MLP width."""
    num_hidden_layers: int = 4
    """Decoder blocks → hookpoints layers.0 … layers.N-1."""
    num_attention_heads: int = 4
    """Attention heads."""
    num_key_value_heads: int = 2
    """GQA key/value heads."""
    max_position_embeddings: int = 512
    """Longest ctx_len accepted."""
    vocab_size: int = 512
    """BPE target size (the trained vocabulary may be smaller)."""


@dataclass
class ModelConfig:
    """The LM (`model` group): a hub id / local folder / GGUF file, the embedded SmolLM2, or the tiny model."""

    name: Optional[str] = None
    """Hub id, local folder or .gguf file; recorded in manifests and exported SAE cfgs."""
    gguf_package: Optional[str] = None
    """Installed package whose folder holds the GGUF (found without importing it)."""
    gguf_file: Optional[str] = None
    """GGUF file name inside `name` (folder/repo) or inside `gguf_package`'s folder."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit; hub ids only)."""
    dtype: str = "float32"
    """float32 | bfloat16 | float16 (fp32 on CPU: bf16 is 5-10x slower there)."""
    device: str = "auto"
    """auto (cuda if present) | cpu | cuda | cuda:N."""
    trust_remote_code: bool = False
    """Run model code from the hub only when you ask for it."""
    hookpoint: Optional[str] = None
    """This model's default hookpoint (its middle layer); null → layers.<num_hidden_layers // 2>.
    `data.hookpoint`, when given, overrides it."""
    seed: int = 0
    """Weight initialisation seed (tiny model only)."""
    tiny: Optional[TinyModelConfig] = None
    """Sizes of the tiny random model; set → build it instead of loading one."""

    def __post_init__(self) -> None:
        require(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype",
                f"must be one of float32, bfloat16, float16, got {self.dtype!r}")


# --------------------------------------------------------------------------------------------- corpus

CORPUS_KINDS = {
    "gutenberg": ("kind", "split", "column", "shuffle", "shuffle_seed"),
    "files": ("kind", "data_files", "builder", "split", "column", "template", "shuffle", "shuffle_seed"),
    "datasets": ("kind", "path", "name", "split", "column", "template", "shuffle", "shuffle_seed"),
}
"""The keys that define each kind of corpus (and enter the activation-store cache key)."""


@dataclass
class CorpusConfig:
    """The text source (`corpus` group)."""

    kind: str = "gutenberg"
    """gutenberg (bundled) | files (local files) | datasets (any `datasets` repo)."""
    path: Optional[str] = None
    """datasets: repo id, e.g. roneneldan/TinyStories."""
    name: Optional[str] = None
    """datasets: dataset config name."""
    data_files: Optional[List[str]] = None
    """files: list of local files (one format)."""
    builder: Optional[str] = None
    """files: datasets builder (text|json|parquet|csv); null → from the file suffix."""
    split: str = "train"
    """Split, slice syntax allowed (train[:10%])."""
    column: str = "text"
    """Text column (with `template`: the name the filled-in text takes)."""
    template: Optional[str] = None
    """files/datasets: build each row's text from several columns, e.g. "{question}\\n{reasoning}\\n{answer}"
    (Python format fields name columns; a null cell gives ""; the escapes \\n, \\t, \\\\ are read as newline,
    tab, backslash, so the template can be typed on the command line). null → the text is `column`."""
    shuffle: bool = False
    """Shuffle rows/documents (seeded)."""
    shuffle_seed: int = 0
    """Shuffle seed."""

    def __post_init__(self) -> None:
        require(self.kind in CORPUS_KINDS, "corpus.kind", f"must be one of {', '.join(CORPUS_KINDS)}, got {self.kind!r}")
        if self.template is not None:
            require(self.kind != "gutenberg", "corpus.template", "needs corpus=files or a datasets corpus (gutenberg has one text column)")
            require(bool(template_fields(self.template)), "corpus.template",
                    f"must name at least one column as {{column}}, got {self.template!r}")


def template_text(template: str) -> str:
    """A `corpus.template` with its \\n, \\t and \\\\ escapes read."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], template)


def template_fields(template: str) -> list[str]:
    """The column names a `corpus.template` refers to, in order; ConfigError for a malformed template."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ConfigError(f"corpus.template: {err} in {template!r}") from err
    bad = [f for f in fields if not f or f.isdigit() or "." in f or "[" in f]
    require(not bad, "corpus.template", f"fields must be plain column names like {{question}}, got {template!r}")
    return list(dict.fromkeys(fields))


def corpus_identity(corpus: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a corpus node that define its kind (what the store cache key hashes)."""
    keys = CORPUS_KINDS.get(str(corpus.get("kind")))
    if keys is None:
        return dict(corpus)
    # a null template is left out, so stores built before `template` existed keep their cache key
    return {k: corpus.get(k) for k in keys if k in corpus and not (k == "template" and corpus.get(k) is None)}


# ----------------------------------------------------------------------------------------------- data

STORE_FORMATS = ("safetensors", "h5")
STORE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class LoraConfig:
    """LoRA capture (`data=lora`): rank-r A-activations of every adapted module, concatenated per token."""

    adapter: Optional[str] = None
    """Folder with a peft LoRA adapter (adapter_config.json + weights)."""
    types: List[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    """Module types to capture, concatenated in this fixed order per layer."""


@dataclass
class DataConfig:
    """What to capture into the activation store, and how training streams it (`data` group)."""

    hookpoint: Optional[str] = "${model.hookpoint}"
    """The hookpoint an SAE is trained on (aliases: blocks.N.hook_resid_post); by default the model's."""
    hookpoints: Optional[List[Optional[str]]] = field(default_factory=lambda: ["${data.hookpoint}"])
    """Everything captured in the store (one forward pass for all)."""
    n_tokens: int = 2_000_000
    """Tokens to extract (rounded up to whole windows)."""
    ctx_len: int = 128
    """Tokens per window."""
    prepend_bos: bool = True
    """Every window starts with BOS."""
    format: str = "safetensors"
    """safetensors (shards) | h5 (one file per hookpoint)."""
    store_dtype: str = "float32"
    """float32 | float16 | bfloat16 (safetensors only)."""
    extract_batch_size: int = 8
    """Windows per forward pass."""
    extract_devices: int = 1
    """Processes that extract the store, each a disjoint set of shards: cuda:0..N-1 when the model runs on
    CUDA, else N CPU processes sharing the cores. The store is byte-identical for any N. (`trainer.devices`
    is for training only.)"""
    shard_tokens: int = 65536
    """Rows per shard (rounded down to whole windows)."""
    cache_dir: Optional[str] = "${oc.env:SAEFORGE_CACHE,.cache/saeforge}"
    """Stores live under <cache_dir>/activations/<cache key>."""
    lora: Optional[LoraConfig] = None
    """LoRA capture settings (data=lora)."""
    path: Optional[str] = None
    """Train from a user file instead: file.h5 or a folder of .safetensors."""
    h5_key: str = "activations"
    """Dataset/tensor name inside user files."""
    batch_size: int = 4096
    """Rows per optimisation step (per DDP rank)."""
    shuffle_buffer: int = 262144
    """Rows held in the token-level shuffle buffer."""
    read_rows: int = 16384
    """Rows read from disk at a time."""
    val_fraction: float = 0.02
    """Held-out fraction (whole chunks at the end) for validation/calibration."""
    exclude_first_tokens: int = 2
    """Drop the first N positions of every window (BOS and the first token: attention sinks with ~100x
    the norm). The one home of this setting: evaluate and interpret use the training run's value."""
    skip_nonfinite: bool = False
    """Drop NaN/Inf rows with a count instead of failing."""
    verify: bool = False
    """Check the store's shard hashes on every open (false: once, on first use of each hookpoint)."""
    prefetch_batches: int = 2
    """Training batches read and shuffled ahead in a background thread while the step computes (0: read
    between steps). The batches and their order do not depend on it."""
    num_workers: int = 0
    """DataLoader worker processes for the training stream: 0 (read in the training process, see
    `prefetch_batches`) or 1 (a worker process). The stream is one ordered sequence per rank, so more
    workers would only repeat it."""

    def __post_init__(self) -> None:
        require_at_least(self, "data", 1, ("n_tokens", "ctx_len", "extract_batch_size", "extract_devices", "shard_tokens", "batch_size",
                                            "shuffle_buffer", "read_rows"))
        require_at_least(self, "data", 0, ("exclude_first_tokens", "num_workers", "prefetch_batches"))
        require(self.num_workers <= 1, "data.num_workers",
                f"must be 0 or 1 (the stream is one ordered sequence per rank; more workers would repeat it), got {self.num_workers}")
        require(self.exclude_first_tokens < self.ctx_len, "data.exclude_first_tokens",
                f"must be smaller than data.ctx_len={self.ctx_len}, got {self.exclude_first_tokens}")
        require(0.0 <= self.val_fraction < 1.0, "data.val_fraction", f"must lie in [0, 1), got {self.val_fraction}")
        require(self.format in STORE_FORMATS, "data.format", f"must be one of {', '.join(STORE_FORMATS)}, got {self.format!r}")
        require(self.store_dtype in STORE_DTYPES, "data.store_dtype",
                f"must be one of {', '.join(STORE_DTYPES)}, got {self.store_dtype!r}")


# ------------------------------------------------------------------------------------------------ sae

ARCHITECTURES = ("batchtopk", "topk")
B_DEC_INITS = ("geometric_median", "mean")
DECODER_INITS = ("random", "rows")


@dataclass
class SAESettings:
    """The SAE and its optimisation (`sae` group); read by saeforge.sae.module.SAEModule."""

    d_sae: Optional[int] = None
    """Number of latents; null → expansion_factor × d_in (see `resolve`)."""
    expansion_factor: float = 8
    """Latents per input dimension, used when d_sae is null."""
    k: float = 32
    """Active latents per token: the mean over the batch for batchtopk (may be fractional), exactly per row for topk."""
    architecture: str = "batchtopk"
    """batchtopk (JumpReLU at a calibrated threshold for inference) | topk."""
    lr: Optional[float] = None
    """Adam learning rate; null → 2e-4 / sqrt(d_sae / 2**14) (see `default_lr`)."""
    warmup_steps: int = 100
    """Linear LR warm-up over this many optimizer steps."""
    decay_start: float = 0.8
    """Fraction of training after which the LR decays linearly to 0."""
    b_dec_init: str = "geometric_median"
    """Decoder bias init from the sample: geometric_median | mean."""
    normalize_input: bool = True
    """Scale inputs so that E‖x‖ = sqrt(d_in) (folded into the export)."""
    mean_center: bool = False
    """Subtract the sample mean before scaling (folded into the export)."""
    dead_tokens: int = 10_000_000
    """Tokens without firing before a latent counts as dead; capped at total_tokens // 4."""
    k_aux: Optional[int] = None
    """Dead latents per token in the AuxK loss; null → d_in // 2."""
    auxk_coef: float = 1 / 32
    """AuxK loss weight."""
    threshold_momentum: float = 0.01
    """EMA rate of the training threshold towards each batch's smallest kept activation (batchtopk only)."""
    decoder_init: str = "random"
    """random (unit Gaussian rows) | rows (unit random data rows minus b_dec); the encoder starts as the decoder's transpose."""
    resample_every: int = 50
    """Every N optimizer steps, move weak latents (see resample_min_fires) and near-duplicates (resample_dup_cos)
    to the residuals of the batch's worst-reconstructed rows (saeforge.sae.resample); 0 → off. On by default:
    planted-dictionary MMCS 0.90 → 0.98 and FVU halved at equal L0; a no-op on the demo's SmolLM2 layer (bench/README.md)."""
    resample_min_fires: float = 0.05
    """With resample_every: a latent with fewer fires above the threshold in the window than this × the median latent's is weak."""
    resample_dup_cos: float = 1.0
    """With resample_every: also resample a live latent whose decoder cosine to an earlier live latent exceeds this; 1.0 → dead only."""
    resample_until: float = 0.7
    """With resample_every: resample only during this fraction of training."""

    def __post_init__(self) -> None:
        require(self.decoder_init in DECODER_INITS, "sae.decoder_init",
                f"must be one of {', '.join(DECODER_INITS)}, got {self.decoder_init!r}")
        require(int(self.resample_every) >= 0, "sae.resample_every", f"must be >= 0, got {self.resample_every}")
        require(float(self.resample_min_fires) >= 0, "sae.resample_min_fires", f"must be >= 0, got {self.resample_min_fires}")
        require(0.0 < float(self.resample_dup_cos) <= 1.0, "sae.resample_dup_cos", f"must lie in (0, 1], got {self.resample_dup_cos}")
        require(0.0 <= float(self.resample_until) <= 1.0, "sae.resample_until", f"must be a fraction in [0, 1], got {self.resample_until}")
        require(self.architecture in ARCHITECTURES, "sae.architecture",
                f"must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        require(self.b_dec_init in B_DEC_INITS, "sae.b_dec_init", f"must be one of {', '.join(B_DEC_INITS)}, got {self.b_dec_init!r}")
        require(float(self.k) > 0, "sae.k", f"must be positive, got {self.k}")
        require(self.d_sae is None or int(self.d_sae) >= 1, "sae.d_sae", f"must be >= 1 or null, got {self.d_sae}")
        require(float(self.expansion_factor) > 0, "sae.expansion_factor", f"must be > 0, got {self.expansion_factor}")
        require(0.0 <= float(self.decay_start) <= 1.0, "sae.decay_start", f"must be a fraction in [0, 1], got {self.decay_start}")
        require(int(self.warmup_steps) >= 0, "sae.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(int(self.dead_tokens) > 0, "sae.dead_tokens", f"must be > 0, got {self.dead_tokens}")
        require(self.lr is None or float(self.lr) > 0, "sae.lr", f"must be > 0 or null, got {self.lr}")

    def d_sae_for(self, d_in: int) -> int:
        """d_sae, or expansion_factor × d_in when it is null."""
        return int(self.d_sae) if self.d_sae is not None else int(round(float(self.expansion_factor) * d_in))

    @staticmethod
    def default_lr(d_sae: int) -> float:
        """2e-4 / sqrt(d_sae / 2**14) (the scaling law of Gao et al.)."""
        return 2e-4 / math.sqrt(d_sae / 2**14)

    def check_k(self, d_in: int) -> None:
        """sae.k must be smaller than d_sae (cheap: needs only the width of the data)."""
        d_sae = self.d_sae_for(d_in)
        if not 0 < float(self.k) < d_sae:
            raise ConfigError(f"sae.k={self.k} must be positive and smaller than d_sae={d_sae} "
                              f"(sae.d_sae, or sae.expansion_factor={self.expansion_factor} × d_in={d_in})")

    def resolve(self, d_in: int) -> "SAESettings":
        """A copy with d_sae and lr filled in (what the module trains with)."""
        d_sae = self.d_sae_for(d_in)
        values = {**self.__dict__, "d_sae": d_sae, "lr": float(self.lr) if self.lr is not None else self.default_lr(d_sae)}
        return SAESettings(**values)


# ---------------------------------------------------------------------------------- explainer, prompts


@dataclass
class ChatParamsConfig:
    """Per-request sampling of the explainer (`explainer.params`); becomes an explainers.ChatParams."""

    temperature: float = 0.0
    """0 → greedy."""
    top_p: float = 1.0
    """Nucleus mass when sampling."""
    max_tokens: int = 128
    """Most tokens generated per answer."""
    logprobs: bool = False
    """Return per-token log-probabilities."""
    top_logprobs: Optional[int] = None
    """With logprobs: alternatives per position."""
    seed: Optional[int] = 0
    """Sampling seed (best effort on remote servers)."""
    repetition_penalty: float = 1.0
    """> 1 penalises repeated tokens; 1.0 → off (keep 1.0 for OpenAI: not one of its parameters)."""
    stop: List[str] = field(default_factory=list)
    """Strings that end generation (not returned)."""

    def __post_init__(self) -> None:
        require(self.temperature >= 0, "explainer.params.temperature", f"must be >= 0, got {self.temperature}")
        require(0 < self.top_p <= 1, "explainer.params.top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.max_tokens >= 1, "explainer.params.max_tokens", f"must be >= 1, got {self.max_tokens}")
        require(self.repetition_penalty > 0, "explainer.params.repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        require(self.top_logprobs is None or self.top_logprobs >= 0, "explainer.params.top_logprobs",
                f"must be >= 0, got {self.top_logprobs}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        require(all(self.stop), "explainer.params.stop", "strings must be non-empty")


EXPLAINER_KINDS = ("local", "openai")


@dataclass
class ExplainerConfig:
    """The LLM that writes and scores explanations (`explainer` group)."""

    kind: str = "local"
    """local (the run's LM, in process) | openai (any OpenAI-compatible server: vLLM, OpenRouter, OpenAI)."""
    model: Optional[str] = None
    """Model id on the server; local: a separate explainer LM to load (hub id, local folder or .gguf
    file), null (or the analysed model's name) → the analysed LM itself."""
    base_url: Optional[str] = None
    """openai: the server's /v1 root."""
    api_key_env: Optional[str] = None
    """openai: NAME of the env var holding the key (never the key itself); null → "EMPTY"."""
    max_in_flight: int = 32
    """openai: concurrent requests on the wire."""
    max_retries: int = 5
    """openai: retries after the first attempt (429/5xx/timeouts/connection)."""
    timeout_s: float = 120.0
    """openai: per-attempt timeout in seconds."""
    max_batch: int = 8
    """local: requests generated together (left-padded batch)."""
    prefill: bool = True
    """Continue the prompts' reply prefill (e.g. "LABEL:"); hosted APIs do not continue assistant messages."""
    cache_dir: Optional[str] = "${oc.env:SAEFORGE_CACHE,.cache/saeforge}/explainer"
    """On-disk response cache; null → off."""
    params: ChatParamsConfig = field(default_factory=ChatParamsConfig)
    """Per-request sampling."""

    def __post_init__(self) -> None:
        require(self.kind in EXPLAINER_KINDS, "explainer.kind", f"must be one of {', '.join(EXPLAINER_KINDS)}, got {self.kind!r}")
        if self.kind == "openai":
            for key in ("base_url", "model"):
                require(bool(getattr(self, key)), f"explainer.{key}", "is required for kind=openai")
        require_at_least(self, "explainer", 1, ("max_in_flight", "max_batch"))
        require_at_least(self, "explainer", 0, ("max_retries",))
        require(self.timeout_s > 0, "explainer.timeout_s", f"must be > 0, got {self.timeout_s}")
        check_env_name("explainer.api_key_env", self.api_key_env)  # a key pasted here is refused, never echoed


@dataclass
class PromptsConfig:
    """Explainer/scorer prompts (`prompts`)."""

    override: Optional[str] = None
    """YAML file replacing only the prompts it names (see src/saeforge/interpret/prompts.yaml)."""


@dataclass
class LoggerConfig:
    """Where metrics go (`logger` group)."""

    kind: str = "wandb"
    """wandb | none."""
    mode: str = "offline"
    """offline | online | disabled (sync later with `wandb sync <run.dir>/wandb/offline-run-*`)."""
    project: str = "saeforge"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team/user); null = default."""
    name: Optional[str] = None
    """Run name; null = derived from run.dir."""
    tags: List[str] = field(default_factory=list)
    """Run tags."""

    def __post_init__(self) -> None:
        require(self.kind in ("wandb", "none"), "logger.kind", f"must be one of wandb, none, got {self.kind!r}")


# ------------------------------------------------------------------------------------ interpret stages


NON_ACTIVATING_SOURCES = ("random", "neighbours", "faiss")


@dataclass
class MaxActConfig:
    """Settings of the max-activation pass (`interpret.maxact.*`). The excluded first positions are
    `data.exclude_first_tokens` of the training run (not a setting of this stage)."""

    batch_size: int = 8
    """Windows per forward / encode step."""
    n_examples: int = 20
    """Top examples kept per feature."""
    one_per_window: bool = True
    """Top examples take at most one token per window (its max), like delphi; false → top-N over all tokens."""
    n_quantiles: int = 10
    """Equal-width buckets of [0, A_max] for the quantile examples."""
    examples_per_quantile: int = 5
    """Windows sampled (uniformly, seeded) per quantile bucket."""
    bucket_resolution: int = 2
    """Fine buckets per quantile bucket while streaming; bucket edges are exact to ±A_max/(n_quantiles·this)."""
    hist_bins: int = 32
    """Bins of the activation histogram in the output."""
    hist_resolution: int = 8
    """Internal histogram bins per output bin (the output re-bins them; quantiles interpolate them)."""
    quantile_levels: List[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 0.9])
    """Levels of the reported quantiles of the nonzero activations."""
    context_left: int = 16
    """Tokens shown before the max token."""
    context_right: int = 8
    """Tokens shown after the max token."""
    exclude_bos: bool = True
    """Zero the activations at BOS positions (attention sinks) before any statistic."""
    n_non_activating: int = 20
    """Non-activating windows per feature (windows where the feature never fires)."""
    non_activating_source: str = "random"
    """Where non-activating windows come from: random (seeded) | neighbours (top examples of the
    features nearest by decoder cosine) | faiss (contexts nearest by MiniLM embedding to the feature's
    top examples, through faiss-cpu). Hard sources fill up with random windows when they find too few."""
    n_neighbours: int = 10
    """neighbours: how many nearest features (by decoder cosine) give their top examples."""
    faiss_candidates: int = 4096
    """faiss: windows (a seeded sample; all when fewer) embedded as the candidate contexts."""
    seed: int = 0
    """Seed of the reservoir keys and of the non-activating slices."""
    progress: bool = True
    """Show a tqdm bar (tokens/s)."""

    def __post_init__(self) -> None:
        self.quantile_levels = tuple(float(q) for q in self.quantile_levels)  # type: ignore[assignment]
        require_at_least(self, "interpret.maxact", 1, ("batch_size", "n_examples", "n_quantiles", "examples_per_quantile",
                                                       "bucket_resolution", "hist_bins", "hist_resolution"))
        require_at_least(self, "interpret.maxact", 0, ("context_left", "context_right", "n_non_activating"))
        require_at_least(self, "interpret.maxact", 1, ("n_neighbours", "faiss_candidates"))
        require(self.non_activating_source in NON_ACTIVATING_SOURCES, "interpret.maxact.non_activating_source",
                f"must be one of {', '.join(NON_ACTIVATING_SOURCES)}, got {self.non_activating_source!r}")
        if any(not 0.0 <= q <= 1.0 for q in self.quantile_levels):
            raise ConfigError(f"interpret.maxact.quantile_levels must lie in [0, 1], got {self.quantile_levels}")

    @classmethod
    def from_mapping(cls, cfg: Optional[Mapping[str, Any]]) -> "MaxActConfig":
        """From a mapping / DictConfig; missing keys take the defaults, unknown keys raise."""
        return from_config(cls, cfg, "interpret.maxact")

    @property
    def context_len(self) -> int:
        return self.context_left + 1 + self.context_right


@dataclass
class LogitLensConfig:
    """Settings of the logit-lens stage (`interpret.logit_lens.*`)."""

    top_n: int = 10
    """Top and bottom tokens per feature."""
    n_neighbours: int = 5
    """Nearest features by decoder cosine."""

    def __post_init__(self) -> None:
        require_at_least(self, "interpret.logit_lens", 1, ("top_n",))
        require_at_least(self, "interpret.logit_lens", 0, ("n_neighbours",))


DEFAULT_STRENGTHS = [-2.0, -1.0, 1.0, 2.0]
STRENGTH_PRESETS = {
    "default": DEFAULT_STRENGTHS,
    "wide": [-4.0, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0],
}


def parse_strengths(value: Any) -> List[float]:
    """A preset name or a list of numbers → distinct floats in the given order; ConfigError otherwise."""
    if isinstance(value, str):
        if value not in STRENGTH_PRESETS:
            raise ConfigError(
                f"interpret.steering.strengths={value!r}: not a preset ({sorted(STRENGTH_PRESETS)}) or a list of numbers"
            )
        value = STRENGTH_PRESETS[value]
    if value is None or isinstance(value, (bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"interpret.steering.strengths must be a list of numbers or a preset name, got {value!r}")
    out: List[float] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, numbers.Real) or not math.isfinite(float(item)):
            raise ConfigError(f"interpret.steering.strengths: {item!r} is not a finite number (got {list(value)!r})")
        if float(item) not in out:
            out.append(float(item))
    if not out:
        raise ConfigError("interpret.steering.strengths is empty: give at least one strength")
    return out


@dataclass
class SteeringConfig:
    """Settings of the steering stage (`interpret.steering.*`); validated on construction."""

    strengths: Any = field(default_factory=lambda: list(DEFAULT_STRENGTHS))
    """Multipliers s of A_max × d_f (a list, or the name of a preset: default | wide); a list of floats after init."""
    n_prompts: int = 2
    """Prompts sampled from the corpus per run (one per stratum of documents; when no prompts_file is given)."""
    prompts_file: Optional[str] = None
    """A .txt file (one prompt per line) or .json list of prompts; overrides corpus sampling."""
    max_new_tokens: int = 50
    """Tokens generated per continuation."""
    do_sample: bool = False
    """Greedy (false) or sampled (true) generation."""
    temperature: float = 1.0
    """Sampling temperature (do_sample only)."""
    top_p: float = 1.0
    """Nucleus sampling mass (do_sample only)."""
    seed: int = 0
    """Seed for prompt sampling and for `torch.manual_seed` before each generate chunk."""
    max_batch: int = 64
    """Most rows (prompt × strength, originals included) per `generate` call (memory budget)."""
    file_suffix: str = ""
    """Optional name slot of the steered-text files (records.steering_text_path): `…_feature_{F}_{file_suffix}_prompt_{P}.json` ("" → no slot)."""

    def __post_init__(self) -> None:
        self.strengths = parse_strengths(self.strengths)
        if "/" in str(self.file_suffix) or "\\" in str(self.file_suffix):
            raise ConfigError(f"interpret.steering.file_suffix must be a plain name part, got {self.file_suffix!r}")
        require_at_least(self, "interpret.steering", 1, ("n_prompts", "max_new_tokens", "max_batch"))
        if self.temperature <= 0:
            raise ConfigError(f"interpret.steering.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"interpret.steering.top_p must be in (0, 1], got {self.top_p}")

    @classmethod
    def from_mapping(cls, cfg: Optional[Mapping[str, Any]]) -> "SteeringConfig":
        """From a mapping / DictConfig; missing keys take the defaults, unknown keys raise."""
        return from_config(cls, cfg, "interpret.steering")


EXPLAIN_SOURCES = ("auto", "maxact", "steering", "both")
EXPLAIN_STRATEGIES = ("default", "contrastive", "single_token")


@dataclass
class ExplainConfig:
    """Settings of the explain stage (`interpret.explain.*`; sampling is `explainer.params`)."""

    source: str = "auto"
    """What the explainer sees: auto | maxact | steering | both (both: maxact is the scored entry, the
    steering explanation is stored under the entry's `steering` key). auto: steering when the
    stages include steering and explain but not maxact (the steering workflow), else maxact."""
    strategy: str = "default"
    """How max-act examples are shown: default (highlighted activating examples) | contrastive (also
    `n_contrastive` non-activating examples, held out of scoring) | single_token (the tokens each
    example peaks on, counted, then the examples: for features that fire on a few tokens)."""
    n_contrastive: int = 10
    """contrastive: non-activating windows shown to the explainer (seeded; never scored)."""
    n_shown: int = 20
    """Activating windows held out for the explainer (train split); the rest are for scoring."""
    shown_top_fraction: float = 0.5
    """Fraction of the shown windows drawn from the top examples (the rest from quantile examples)."""
    max_examples_in_prompt: int = 20
    """At most this many of the shown windows (highest activation first) go into the prompt."""
    highlight_threshold: float = 0.3
    """Tokens at ≥ this × the example's max activation are marked <<…>> (and listed with their activation)."""
    n_steering_prompts: int = 2
    """Steering prompts shown per feature."""
    max_chars: int = 200
    """Steering snippets (prompt and each continuation) are cut to this many characters."""
    repair: bool = True
    """Give an unparseable reply one follow-up turn asking for the format."""
    seed: int = 0
    """Seed of the train/test split."""

    @classmethod
    def from_mapping(cls, cfg: Optional[Mapping[str, Any]]) -> "ExplainConfig":
        """From a mapping / DictConfig; missing keys take the defaults, unknown keys raise."""
        return from_config(cls, cfg, "interpret.explain")

    def source_for(self, stages: Sequence[str]) -> str:
        """The source the explain stage uses in a run of `stages` (`auto` resolved)."""
        if self.source != "auto":
            return self.source
        return "steering" if "steering" in stages and "maxact" not in stages else "maxact"

    def __post_init__(self) -> None:
        if self.source not in EXPLAIN_SOURCES:
            raise ConfigError(f"interpret.explain.source must be one of {EXPLAIN_SOURCES}, got {self.source!r}")
        if self.strategy not in EXPLAIN_STRATEGIES:
            raise ConfigError(f"interpret.explain.strategy must be one of {EXPLAIN_STRATEGIES}, got {self.strategy!r}")
        require_at_least(self, "interpret.explain", 0, ("n_contrastive",))
        require_at_least(self, "interpret.explain", 1, ("n_shown", "max_examples_in_prompt", "n_steering_prompts", "max_chars"))
        if not 0.0 <= self.shown_top_fraction <= 1.0:
            raise ConfigError(f"interpret.explain.shown_top_fraction must lie in [0, 1], got {self.shown_top_fraction}")
        if not 0.0 <= self.highlight_threshold <= 1.0:
            raise ConfigError(f"interpret.explain.highlight_threshold must lie in [0, 1], got {self.highlight_threshold}")


SCORERS = ("detection", "fuzz", "embedding", "simulation", "surprisal", "intruder")
INTRUDER_SOURCES = ("non_activating", "other_feature")


@dataclass
class ScoreConfig:
    """Settings of the score stage (`interpret.score.*`; sampling is `explainer.params`)."""

    scorers: Any = field(default_factory=lambda: ["detection", "fuzz", "embedding"])
    """Which scorers run: any of detection, fuzz, embedding, simulation, surprisal, intruder (a tuple
    after init). surprisal needs prompt logprobs: explainer.kind=local, or an OpenAI-compatible
    server whose completions endpoint echoes prompt logprobs (vLLM)."""
    n_test: int = 20
    """Most activating held-out windows scored per feature (seeded sample)."""
    n_negatives: int = 20
    """Most non-activating windows scored per feature."""
    batch_size: int = 5
    """Examples per scorer prompt (delphi: 5)."""
    highlight_threshold: float = 0.3
    """Fuzz: tokens at ≥ this × the example's max activation are marked."""
    logprobs: bool = True
    """Ask for top-5 logprobs so detection/fuzz also report an AUC (servers that ignore it: no AUC)."""
    baseline: bool = True
    """Also score a deranged (other feature's) explanation on the same examples."""
    n_intruder: int = 10
    """Intruder: prompts per feature, each with `intruder_examples` activating windows and one intruder."""
    intruder_examples: int = 4
    """Intruder: activating held-out windows shown beside the intruder (chance is 1 / (this + 1))."""
    intruder_source: str = "non_activating"
    """Intruder: where the intruder comes from: non_activating (a window where the feature never
    fires) or other_feature (an activating window of another scored feature, the baseline partner)."""
    embedding_model: Optional[str] = None
    """Folder of a sentence-transformers model; None → the embedded all-MiniLM-L6-v2."""
    seed: int = 0
    """Seed of the test sample, shuffling, fuzz marks and the baseline derangement."""

    @classmethod
    def from_mapping(cls, cfg: Optional[Mapping[str, Any]]) -> "ScoreConfig":
        """From a mapping / DictConfig; missing keys take the defaults, unknown keys raise."""
        return from_config(cls, cfg, "interpret.score")

    def __post_init__(self) -> None:
        self.scorers = tuple(str(s) for s in self.scorers)
        bad = [s for s in self.scorers if s not in SCORERS]
        if bad:
            raise ConfigError(f"interpret.score.scorers: unknown {bad}; valid are {list(SCORERS)}")
        if self.intruder_source not in INTRUDER_SOURCES:
            raise ConfigError(f"interpret.score.intruder_source must be one of {list(INTRUDER_SOURCES)}, got {self.intruder_source!r}")
        require_at_least(self, "interpret.score", 1, ("n_test", "batch_size", "n_intruder", "intruder_examples"))
        require_at_least(self, "interpret.score", 0, ("n_negatives",))


STAGES = ("maxact", "logit_lens", "steering", "explain", "score", "dashboard")
SELECT = ("alive_first", "frequency", "random")


@dataclass
class InterpretSettings:
    """The `interpret` section: which stages, which features, and each stage's settings."""

    stages: List[str] = field(default_factory=lambda: list(STAGES))
    """Run in this order; any subset of maxact, logit_lens, steering, explain, score, dashboard."""
    features: Optional[List[int]] = None
    """Explicit feature ids; null: choose max_latents with `select`."""
    max_latents: Optional[int] = 50
    """Features to interpret when `features` is null; null → every alive feature."""
    min_examples: int = 1
    """Features with fewer activating examples (windows where they fire) than this skip the stages
    after maxact and logit_lens; the skips are logged and recorded in the stages file."""
    hookpoints: Optional[List[str]] = None
    """Several SAEs in one run, the LM running once per batch for all of them: the SAEs of `ckpt`
    (a run dir) at these hookpoints, or with a list of `ckpt`s one hookpoint per ckpt (same order);
    null → `hookpoint`. Outputs go to interpret/<hookpoint>/ each."""
    select: str = "alive_first"
    """alive_first (ids in order, dead skipped) | frequency (most frequent first) | random (seeded, alive)."""
    n_tokens: int = 65536
    """Tokens of windows for the max-act pass (the run's store tokens when present)."""
    ctx_len: int = 64
    """Window length when windows are packed from the corpus."""
    allow_partial: bool = False
    """true: exit 0 when features failed (e.g. explainer down); false: exit 3. Either way the failures
    are summarised and a rerun retries only them."""
    maxact: MaxActConfig = field(default_factory=lambda: MaxActConfig(seed="${seed}"))  # type: ignore[arg-type]
    """Max-activating examples."""
    logit_lens: LogitLensConfig = field(default_factory=LogitLensConfig)
    """Logit lens."""
    steering: SteeringConfig = field(default_factory=lambda: SteeringConfig(seed="${seed}"))  # type: ignore[arg-type]
    """Steering."""
    explain: ExplainConfig = field(default_factory=lambda: ExplainConfig(seed="${seed}"))  # type: ignore[arg-type]
    """Explanations."""
    score: ScoreConfig = field(default_factory=lambda: ScoreConfig(seed="${seed}"))  # type: ignore[arg-type]
    """Scoring."""

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        require(not bad, "interpret.stages", f"has unknown stages {bad}; valid: {', '.join(STAGES)}")
        require(self.select in SELECT, "interpret.select", f"must be one of {', '.join(SELECT)}, got {self.select!r}")
        require_at_least(self, "interpret", 1, ("n_tokens", "ctx_len", "min_examples"))
        require(self.max_latents is None or self.max_latents >= 1, "interpret.max_latents",
                f"must be >= 1 or null (all alive features), got {self.max_latents}")
        if self.hookpoints is not None:
            self.hookpoints = [str(h) for h in self.hookpoints]
            require(bool(self.hookpoints) and len(set(self.hookpoints)) == len(self.hookpoints), "interpret.hookpoints",
                    f"must be a non-empty list of distinct hookpoints or null, got {self.hookpoints}")


# ------------------------------------------------------------------------------------ top level


@dataclass
class InterpretCallbackConfig:
    """Interpretation during training (`interpret_callback`)."""

    every_n_steps: int = 0
    """Run interpret stages every N steps during training (0: off)."""
    overrides: List[str] = field(default_factory=lambda: [
        "interpret.stages=[maxact,logit_lens]", "interpret.max_latents=8", "interpret.n_tokens=8192",
        "interpret.select=alive_first", "logger=none"])
    """Overrides applied to configs/interpret.yaml."""


# ----------------------------------------------------------------------------------- concept discovery


@dataclass
class ConceptAnalysisConfig:
    """Settings of concept discovery's analysis half (`discover.analysis.*`): statistics per feature
    against the 0–3 label, permutation p-values and Benjamini–Hochberg q-values."""

    n_permutations: int = 1000
    """Label shuffles of the permutation test (vectorised)."""
    fdr_alpha: float = 0.05
    """Benjamini–Hochberg level over all features × SAEs; q below it counts as significant."""
    top_features: int = 20
    """Features (over all SAEs) in the report, with their top sentences and fragments."""
    seed: int = 0
    """Seed of the label shuffles."""
    activation: str = "max"
    """Sentence-level activation the ranking uses: max (over the sentence's fragments) | final (last
    token). The ρ of both is reported either way (spearman_max, spearman_final)."""
    skip_first_tokens: int = 0
    """Fragments ending at token positions below this are left out of the sentence max (1 drops the
    first token, an attention sink with a huge norm in SmolLM2 and many LMs); 0 keeps every fragment,
    as the reference does. The final-token value is kept either way."""
    examples_per_feature: int = 10
    """Top sentences and top fragments kept per top feature (top_features.json and the report)."""
    interpret_features: int = 10
    """Features per SAE in the printed `python interpret.py ... interpret.features=[...]` commands."""

    def __post_init__(self) -> None:
        require_at_least(self, "discover.analysis", 1, ("n_permutations", "top_features", "examples_per_feature",
                                                        "interpret_features"))
        require(self.skip_first_tokens >= 0, "discover.analysis.skip_first_tokens",
                f"must be >= 0, got {self.skip_first_tokens}")
        require(self.activation in ("max", "final"), "discover.analysis.activation",
                f"must be max or final, got {self.activation!r}")
        if not 0.0 < self.fdr_alpha < 1.0:
            raise ConfigError(f"discover.analysis.fdr_alpha must lie in (0, 1), got {self.fdr_alpha}")


@dataclass
class TrainRunConfig:
    """`run`: where a training run writes."""

    dir: Optional[str] = "runs/${now:%Y-%m-%d_%H-%M-%S}"
    """Everything this run writes; rerun with the same dir to resume."""
    wait: bool = False
    """Another process (train, evaluate, interpret) holds run.dir: wait for it to end instead of failing at once."""


@dataclass
class OutputRunConfig:
    """`run` of evaluate / interpret."""

    dir: Optional[str] = None
    """Where results go; null: next to the SAE's training run (or runs/<job>-<time> for imports)."""
    wait: bool = False
    """Another process (train, evaluate, interpret) holds the run directory: wait for it to end instead of failing at once."""


@dataclass
class TrainConfig:
    """`python train.py`: the top-level settings and every group."""

    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sae: SAESettings = field(default_factory=SAESettings)
    trainer: Dict[str, Any] = field(default_factory=dict)
    """Lightning Trainer kwargs, passed through (checked against lightning.Trainer's arguments)."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    """One seed for data order, init and everything else."""
    extract_only: bool = False
    """Build (or reuse) the activation store, then exit."""
    overwrite: List[str] = field(default_factory=list)
    """[cache]: rebuild the activation store even when the cache key matches; [run]: move an existing run.dir's
    contents aside (to <run.dir>.replaced-<time>, not deleted) and train from scratch, whatever its settings."""
    ckpt_path: Optional[str] = None
    """Resume from a Lightning checkpoint; `last` = <run.dir>/checkpoints/last.ckpt (automatic when it exists)."""
    checkpoint_every_n_steps: int = 500
    """Checkpoint (and SAE export) cadence."""
    ddp_timeout_s: float = 60.0
    """DDP: seconds a rank waits in a collective for the others before it fails (Lightning's default: 30 min).
    With the interpret callback on, at least 1800 (the other ranks wait while rank 0 interprets). A rank
    that dies on this machine ends the others within a second anyway (pipelines/callbacks.DeadRankWatchdog)."""
    interpret_callback: InterpretCallbackConfig = field(default_factory=InterpretCallbackConfig)
    run: TrainRunConfig = field(default_factory=TrainRunConfig)

    def __post_init__(self) -> None:
        require(int(self.checkpoint_every_n_steps) >= 1, "checkpoint_every_n_steps", f"must be >= 1, got {self.checkpoint_every_n_steps}")
        require(float(self.ddp_timeout_s) > 0, "ddp_timeout_s", f"must be > 0, got {self.ddp_timeout_s}")
        bad = [o for o in self.overwrite if o not in ("cache", "run")]
        require(not bad, "overwrite", f"may only contain cache and run, got {bad}")


@dataclass
class ImportedSAEConfig:
    """Settings for SAEs that do not come from a saeforge training run (evaluate / interpret)."""

    exclude_first_tokens: int = 2
    """For imported SAEs only: the first N positions of every window are never replaced, counted or shown
    (attention sinks). An SAE from a saeforge run uses that run's `data.exclude_first_tokens`."""

    def __post_init__(self) -> None:
        require(int(self.exclude_first_tokens) >= 0, "imported.exclude_first_tokens", f"must be >= 0, got {self.exclude_first_tokens}")


@dataclass
class EvaluateSettings:
    """The `evaluate` section."""

    n_tokens: int = 16384
    """Held-out tokens (taken from the corpus AFTER the training tokens)."""
    ctx_len: Optional[int] = None
    """Window length; null: the training run's data.ctx_len (else 128)."""
    batch_size: int = 8
    """Windows per forward."""

    def __post_init__(self) -> None:
        require_at_least(self, "evaluate", 1, ("n_tokens", "batch_size"))
        require(self.ctx_len is None or self.ctx_len >= 1, "evaluate.ctx_len", f"must be >= 1 or null, got {self.ctx_len}")


@dataclass
class EvaluateConfig:
    """`python evaluate.py`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Used for imported SAEs; a saeforge run dir brings its own model config."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """Held-out text (a run dir brings its own corpus config)."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    ckpt: Optional[str] = None
    """What to evaluate: a run dir, a Lightning .ckpt, or an exported/imported SAE dir."""
    hookpoint: Optional[str] = None
    """Which SAE of a run / the hookpoint of an imported SAE (null: from the SAE cfg)."""
    compare: Optional[List[str]] = None
    """Run dirs (or their evaluation.json files) to tabulate and plot."""
    seed: int = 0
    """Seed for anything sampled."""
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    imported: ImportedSAEConfig = field(default_factory=ImportedSAEConfig)
    run: OutputRunConfig = field(default_factory=OutputRunConfig)


@dataclass
class InterpretConfig:
    """`python interpret.py`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """For imported SAEs; a saeforge run dir brings its own model/corpus/store."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """Text for max-act windows and steering prompts."""
    explainer: ExplainerConfig = field(default_factory=ExplainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    ckpt: Any = None
    """What to interpret: a run dir, a .ckpt, or an exported/imported SAE dir; or a list of them
    (several SAEs of one model, interpreted together: see interpret.hookpoints)."""
    hookpoint: Optional[str] = None
    """Which SAE of a run / the hookpoint of an imported SAE (null: from the SAE cfg)."""
    seed: int = 0
    """One seed for feature sampling and every stage."""
    run: OutputRunConfig = field(default_factory=OutputRunConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    interpret: InterpretSettings = field(default_factory=InterpretSettings)
    imported: ImportedSAEConfig = field(default_factory=ImportedSAEConfig)


DISCOVER_STAGES = ("extract", "analyze", "all")
DISCOVER_LAYOUTS = ("auto", "dense", "csr")


@dataclass
class DiscoverSettings:
    """The `discover` section of `python discover.py`: extraction settings (analysis: `discover.analysis.*`)."""

    stage: str = "all"
    """extract (SAE activations of every sentence prefix, the GPU-heavy half), analyze (statistics
    from the extracted files, CPU), or all (both)."""
    layout: str = "auto"
    """Activation matrix in each npz: dense (float32 [n_fragments, d_sae], the reference's), csr
    (scipy CSR parts), or auto (CSR when most entries are zero)."""
    overwrite: bool = False
    """Start extraction over: delete the folder's activation files, progress and cache first. Without
    it a rerun continues where the last one stopped (and refuses a folder extracted from other inputs)."""
    batch_size: int = 16
    """Sentences per LM forward."""
    encode_rows: int = 1024
    """Fragments encoded per SAE step (bounds the memory of one encode: rows × d_sae floats)."""
    max_tokens: int = 128
    """Tokens kept per sentence (longer sentences are cut, with a warning)."""
    devices: Optional[int] = None
    """Processes that share the per-SAE encoding (CUDA devices when the model is on CUDA, else CPU
    processes); null: `trainer.devices` when it is an integer, else 1. The LM runs once either way."""
    analysis: ConceptAnalysisConfig = field(default_factory=ConceptAnalysisConfig)

    def __post_init__(self) -> None:
        require(self.stage in DISCOVER_STAGES, "discover.stage", f"must be one of {DISCOVER_STAGES}, got {self.stage!r}")
        require(self.layout in DISCOVER_LAYOUTS, "discover.layout", f"must be one of {DISCOVER_LAYOUTS}, got {self.layout!r}")
        require_at_least(self, "discover", 1, ("batch_size", "encode_rows", "max_tokens"))
        require(self.devices is None or self.devices >= 1, "discover.devices", f"must be >= 1 or null, got {self.devices}")


@dataclass
class DiscoverConfig:
    """`python discover.py concepts=<csv> saes=<yaml|json>`: concept discovery."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The LM every SAE of the set reads."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    concepts: Optional[str] = None
    """CSV with columns sentence, concept_strength_label (integer 0–3)."""
    saes: Optional[str] = None
    """The SAE set: a YAML or JSON file (saeforge.discover.sae_set)."""
    trainer: Dict[str, Any] = field(default_factory=dict)
    """Only `devices` is read (processes for the per-SAE encoding, as discover.devices)."""
    seed: int = 0
    """Seed for anything sampled."""
    run: OutputRunConfig = field(default_factory=OutputRunConfig)
    """run.dir: the output folder; null: runs/discover-<CSV name>. Activation files go to
    <run.dir>/activations, the analysis to <run.dir>/analysis."""
    discover: DiscoverSettings = field(default_factory=DiscoverSettings)
