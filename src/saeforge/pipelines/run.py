"""Helpers shared by the entry points: the run directory, secret stripping, logging to W&B."""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from saeforge.config import LoggerConfig, from_config
from saeforge.config.checks import SECRET_KEY_PATTERN, looks_like_key, mask

log = logging.getLogger(__name__)
SECRET_KEY = re.compile(SECRET_KEY_PATTERN, re.IGNORECASE)


def run_dir(cfg: DictConfig) -> Path:
    """Where this run writes: Hydra's output dir when Hydra runs us (DDP children share it), else run.dir."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        path = Path(HydraConfig.get().runtime.output_dir)
    else:
        path = Path(str(cfg.run.dir))
    path.mkdir(parents=True, exist_ok=True)
    return path


def strip_secrets(node: Any) -> Any:
    """A plain copy of a config with secret-looking values removed (names of env vars are kept)."""
    if isinstance(node, (DictConfig,)):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, dict):
        return {k: ("<redacted>" if SECRET_KEY.search(str(k)) and v else strip_secrets(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [strip_secrets(v) for v in node]
    return node


def make_wandb_logger(cfg: DictConfig, directory: Path, job: str) -> Any | None:
    """A Lightning WandbLogger (offline by default) or None for `logger=none`."""
    settings = from_config(LoggerConfig, cfg.get("logger") or {"kind": "none"}, "logger")
    if settings.kind == "none":
        return None
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    scrub_argv()  # W&B records sys.argv in the run's metadata
    return WandbLogger(
        project=settings.project,
        entity=settings.entity,
        name=settings.name or f"{job}-{directory.name}",
        save_dir=str(directory),
        mode=settings.mode,
        tags=list(settings.tags),
        job_type=job,
        config=strip_secrets(cfg),
        save_code=False,
        settings=_wandb_settings(),
    )


def _wandb_settings() -> Any:
    import wandb

    return wandb.Settings(disable_code=True, save_code=False)


def scrub_argv() -> None:
    """Mask secret-looking command-line values in place (`key=sk-…` → `key=sk-***`), so nothing that
    records sys.argv (W&B's run metadata) keeps them. The command line refuses such values already."""
    import sys

    for i, arg in enumerate(sys.argv):
        key, sep, value = arg.partition("=")
        leaf = key.lstrip("+~").rsplit(".", 1)[-1]
        if sep and value and (SECRET_KEY.search(leaf) or looks_like_key(value)):
            sys.argv[i] = f"{key}={mask(value)}"
        elif not sep and looks_like_key(arg):
            sys.argv[i] = mask(arg)


def setup_logging() -> None:
    """Quiet the chattiest libraries; keep our INFO lines."""
    logging.getLogger("saeforge").setLevel(logging.INFO)
    for name in ("httpx", "httpx2", "httpcore", "urllib3", "datasets", "filelock", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def check_command_line(config_name: str, argv: list[str] | None = None) -> None:
    """Before Hydra composes: no override may carry a secret (an API key belongs in the environment
    variable that explainer.api_key_env names), and every override's key must exist in the schema of
    `config_name` (`+data.batchsize=16` included); otherwise print one line and exit 2."""
    import sys

    from saeforge.config import SCHEMAS, ConfigError, check_overrides, check_secret_overrides

    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    try:
        check_secret_overrides(args)  # first: Hydra would write a secret into .hydra/ and its log
        check_overrides(args, SCHEMAS[config_name])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


@contextmanager
def config_errors_exit() -> Iterator[None]:
    """A ConfigError (a bad setting, found before any work) becomes one line on stderr and exit status 2."""
    import sys

    from saeforge.config import ConfigError

    try:
        yield
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
