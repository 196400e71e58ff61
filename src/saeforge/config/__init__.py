"""saeforge's settings: one dataclass per config group (the schema and the defaults), registered
with Hydra's ConfigStore. The bottom layer: imports nothing from saeforge but `saeforge.paths`."""

from saeforge.config.checks import (
    ENV_NAME,
    ConfigError,
    check_env_name,
    check_key_path,
    check_overrides,
    check_secret_overrides,
    check_trainer_key,
    from_config,
    looks_like_key,
    mask,
    require,
    require_at_least,
)
from saeforge.config.schema import (
    CORPUS_KINDS,
    DEFAULT_STRENGTHS,
    DISCOVER_LAYOUTS,
    DISCOVER_STAGES,
    EXPLAIN_SOURCES,
    EXPLAIN_STRATEGIES,
    EXPLAINER_KINDS,
    SCORERS,
    STAGES,
    STRENGTH_PRESETS,
    ChatParamsConfig,
    ConceptAnalysisConfig,
    DiscoverConfig,
    DiscoverSettings,
    CorpusConfig,
    DataConfig,
    EvaluateConfig,
    EvaluateSettings,
    ExplainConfig,
    ExplainerConfig,
    ImportedSAEConfig,
    InterpretConfig,
    InterpretSettings,
    LoggerConfig,
    LogitLensConfig,
    LoraConfig,
    MaxActConfig,
    ModelConfig,
    PromptsConfig,
    SAESettings,
    ScoreConfig,
    SteeringConfig,
    TinyModelConfig,
    TrainConfig,
    corpus_identity,
    parse_strengths,
    template_fields,
    template_text,
)

SCHEMAS = {"train": TrainConfig, "evaluate": EvaluateConfig, "interpret": InterpretConfig, "discover": DiscoverConfig}
"""Entry-point config name → its schema (configs/<name>.yaml starts from `<name>_schema`)."""


def register_configs() -> None:
    """Store the top-level schemas (`train_schema`, ...) and each group's schema (`<group>/schema`)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=node)
    for group, node in (("model", ModelConfig), ("corpus", CorpusConfig), ("data", DataConfig), ("sae", SAESettings),
                        ("explainer", ExplainerConfig), ("logger", LoggerConfig)):
        cs.store(group=group, name="schema", node=node)


try:  # register on import, so that every compose of configs/*.yaml finds the schemas
    register_configs()
except ImportError:  # pragma: no cover - hydra not installed
    pass


__all__ = [
    "CORPUS_KINDS", "DEFAULT_STRENGTHS", "DISCOVER_LAYOUTS", "DISCOVER_STAGES", "ConceptAnalysisConfig", "DiscoverConfig", "DiscoverSettings", "EXPLAIN_SOURCES", "EXPLAIN_STRATEGIES", "EXPLAINER_KINDS", "SCHEMAS", "SCORERS", "STAGES", "STRENGTH_PRESETS", "ChatParamsConfig", "ConfigError", "ENV_NAME", "CorpusConfig",
    "DataConfig", "EvaluateConfig", "EvaluateSettings", "ExplainConfig", "ExplainerConfig", "ImportedSAEConfig",
    "InterpretConfig", "InterpretSettings", "LoggerConfig", "LogitLensConfig", "LoraConfig", "MaxActConfig", "ModelConfig",
    "PromptsConfig", "SAESettings", "ScoreConfig", "SteeringConfig", "TinyModelConfig", "TrainConfig", "check_env_name", "check_key_path", "check_overrides", "check_secret_overrides", "looks_like_key", "mask",
    "check_trainer_key", "corpus_identity", "from_config", "parse_strengths", "register_configs", "require",
    "require_at_least", "template_fields", "template_text",
]
