"""Helpers shared by the entry points: the run directory, secret stripping, logging to W&B."""

from __future__ import annotations

import logging
import os
import re
from contextlib import ExitStack, contextmanager
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


def move_run_aside(directory: Path) -> Path | None:
    """overwrite=[run]: move everything in `directory` to `<directory>.replaced-<time>` beside it (kept, not
    deleted), so training starts fresh there. Left in place: this process's lock and log files (`*.lock`,
    `*.log`: the log is appended to across runs). Returns the folder moved to (None when nothing was there)."""
    from datetime import datetime

    entries = [p for p in directory.iterdir() if p.suffix not in (".lock", ".log")]
    if not entries or not is_primary_process():
        return None
    stamp = f"{datetime.now():%Y-%m-%dT%H-%M-%S}"
    aside = directory.parent / f"{directory.name}.replaced-{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = directory.parent / f"{directory.name}.replaced-{stamp}-{n}"
    aside.mkdir()
    for entry in entries:
        entry.rename(aside / entry.name)
    log.warning("overwrite=[run]: moved the old run in %s to %s", directory, aside)
    return aside


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
"""Set by Lightning's launcher (its child processes), torchrun and SLURM: a nonzero one means a secondary process."""


def is_primary_process() -> bool:
    """True in the process that owns a run: not a DDP child, not a process of another node."""
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


RUN_LOCK = ".saeforge.lock"
"""`<run dir>/.saeforge.lock`: held by the train, evaluate or interpret process writing into the run."""
_RUN_LOCKS: set[Path] = set()
"""Run directories this process holds (a job inside another job of the same process, e.g. an interpret
callback during training, needs no second lock)."""


@contextmanager
def run_lock(directory: Path, purpose: str, wait: bool = False) -> Iterator[None]:
    """Hold `<directory>/.saeforge.lock` for the `with` block: one process per run directory.

    Held by another live process: `runlock.LockedError` (one line naming its host, pid and command), or with
    `wait` (run.wait=true) wait for it to end. A lock whose holder died is taken over with a warning. DDP
    children and other nodes' processes take no lock: the launching process holds it for them."""
    from saeforge.runlock import LockedError, hold

    key = directory.resolve()
    if key in _RUN_LOCKS or not is_primary_process():
        yield
        return
    announced: list[bool] = []

    def waiting(holder: Any) -> None:
        if not announced:
            log.warning("waiting for %s to release %s (run.wait=true)", holder or "another process", directory)
            announced.append(True)

    stack = ExitStack()
    try:
        stack.enter_context(hold(directory / RUN_LOCK, purpose, wait=wait, on_wait=waiting))
    except LockedError as err:
        err.args = (f"{err} (run.wait=true waits for it)",)
        raise
    with stack:
        _RUN_LOCKS.add(key)
        try:
            yield
        finally:
            _RUN_LOCKS.discard(key)


def strip_secrets(node: Any) -> Any:
    """A plain copy of a config with secret-looking values removed (names of env vars are kept)."""
    if isinstance(node, (DictConfig,)):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, dict):
        return {k: ("<redacted>" if SECRET_KEY.search(str(k)) and v else strip_secrets(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [strip_secrets(v) for v in node]
    return node


WANDB_RUN = "wandb_run.json"
"""`<run.dir>/wandb_run.json`: the training run's W&B id, project, entity, group and name, written by
train; evaluate and interpret attach to that W&B run (one W&B run per SAE)."""


def read_wandb_run(directory: Path | None) -> dict[str, Any] | None:
    """The W&B identity recorded in a run directory, or None."""
    import json

    path = directory / WANDB_RUN if directory is not None else None
    if path is None or not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("unreadable %s: logging to a new W&B run", path)
        return None
    return doc if isinstance(doc, dict) and doc.get("id") else None


def write_wandb_run(logger: Any, directory: Path) -> None:
    """Record the logger's W&B run identity in `<directory>/wandb_run.json` (atomically, rank 0 only)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from saeforge.atomic import atomic_write_json

    if logger is None or getattr(rank_zero_only, "rank", 0) != 0:
        return
    run = logger.experiment
    atomic_write_json(directory / WANDB_RUN, {"id": run.id, "project": run.project, "entity": getattr(run, "entity", None),
                                              "group": run.group or None, "name": run.name})


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """`{"sae": {"k": 8}}` → `{"sae.k": 8}` (lists stay values), for flat, sortable W&B config columns."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) and value else {name: value})
    return out


def sweep_identity() -> tuple[str | None, str | None]:
    """(group, name) under a Hydra multirun: the sweep directory and the job's values of the swept keys
    (e.g. `sae.k=16`; else Hydra's override_dirname); (None, None) otherwise."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return None, None
    if not HydraConfig.initialized():
        return None, None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None, None
    import sys

    swept = swept_keys(sys.argv[1:])
    own = [o for o in hc.overrides.task if o.partition("=")[0].lstrip("+~") in swept]
    return str(hc.sweep.dir), (",".join(own) or hc.job.override_dirname or None)


def swept_keys(argv: list[str]) -> set[str]:
    """The keys a multirun command line sweeps (`sae.k=16,32`, `x=range(1,4)`, `y=choice(a,b)`, `z=glob(*)`):
    the run names keep only these of the job's overrides (`sae.k=16`), the rest being shared."""
    keys = set()
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("-"):
            continue
        depth, top_comma = 0, False
        for ch in value:
            depth += ch in "[({"
            depth -= ch in "])}"
            top_comma |= ch == "," and depth == 0
        if top_comma or value.startswith(("range(", "choice(", "glob(")):
            keys.add(key.lstrip("+~"))
    return keys


def make_wandb_logger(cfg: DictConfig, directory: Path, job: str, attach: Path | None = None,
                      group: str | None = None) -> Any | None:
    """A Lightning WandbLogger (offline by default) or None for `logger=none`.

    `attach`: a run directory; when it holds `wandb_run.json` (written by train) the logger resumes
    that W&B run (same id, group and name; files under `attach`) instead of starting a new one, and
    adds no config (the training config is already there). Under a Hydra multirun a new run joins
    the sweep's group and is named after its overrides; `group` sets the group of a new run. The config is logged nested and flattened
    (`sae.k`), secrets stripped either way; argv is scrubbed before W&B records it."""
    settings = from_config(LoggerConfig, cfg.get("logger") or {"kind": "none"}, "logger")
    if settings.kind == "none":
        return None
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    scrub_argv()  # W&B records sys.argv in the run's metadata
    known = read_wandb_run(attach)
    common = dict(mode=settings.mode, tags=list(settings.tags), save_code=False, settings=_wandb_settings())
    if known is not None:
        log.info("W&B: attaching %s to run %s (%s)", job, known["id"], attach)
        return WandbLogger(project=known.get("project") or settings.project, entity=known.get("entity") or settings.entity,
                           id=known["id"], resume="allow", name=known.get("name"), group=known.get("group"),
                           save_dir=str(attach), **common)
    sweep_group, name = sweep_identity()
    group = group or sweep_group
    plain = strip_secrets(cfg)
    return WandbLogger(
        project=settings.project,
        entity=settings.entity,
        name=settings.name or name or f"{job}-{directory.name}",
        group=group,
        save_dir=str(directory),
        job_type=job,
        config={**plain, **flatten(plain)},
        **common,
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


EXIT_DISK_FULL = 4
"""Exit status of an entry script stopped by a full disk (2: a bad setting; interpret's 3: failed features)."""


@contextmanager
def config_errors_exit() -> Iterator[None]:
    """A ConfigError (a bad setting, found before any work) or a run directory held by another process
    (runlock.LockedError) becomes one line on stderr and exit status 2; a full disk (`saeforge.atomic.DiskFullError`,
    or ENOSPC wrapped in another error) one line naming the file and the free bytes, and exit status
    `EXIT_DISK_FULL`. Outputs written so far stay: a rerun resumes."""
    import sys

    from saeforge.atomic import disk_full_error
    from saeforge.config import ConfigError
    from saeforge.runlock import LockedError

    try:
        yield
    except (ConfigError, LockedError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:
        full = disk_full_error(err)
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        raise SystemExit(EXIT_DISK_FULL) from None
