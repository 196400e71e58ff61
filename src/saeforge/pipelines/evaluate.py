"""`python evaluate.py`: spliced-LM evaluation of one SAE, or a comparison table/plot of several runs."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from saeforge.atomic import atomic_path, atomic_write_json
from saeforge.activations.corpus import iter_texts, load_corpus
from saeforge.activations.windows import pack_windows
from saeforge.sae.spliced import evaluate_spliced
from saeforge.lm.loading import LoadedLM, load_lm
from saeforge.paths import cache_root
from saeforge.config import EvaluateConfig
from saeforge.pipelines.run import make_wandb_logger, read_wandb_run, run_lock
from saeforge.pipelines.validate import exclude_first_tokens, run_model, validate_evaluate
from saeforge.sae.source import SAESource, resolve_sae

log = logging.getLogger(__name__)
RESULT = "evaluation.json"


def heldout_windows(corpus_cfg: Any, data_cfg: Any | None, lm: LoadedLM, ctx_len: int, n_tokens: int, cache: Path) -> torch.Tensor:
    """Windows from the corpus after the ones training used (same packing), so evaluation is held out."""
    skip = int(data_cfg.n_tokens) if data_cfg is not None else 0
    skip_seq = -(-skip // ctx_len)
    prepend_bos = bool(data_cfg.get("prepend_bos", True)) if data_cfg is not None else True
    corpus = load_corpus(corpus_cfg, cache)
    windows = pack_windows(iter_texts(corpus, corpus_cfg.get("column", "text")), lm.tokenizer, ctx_len,
                           skip_seq * ctx_len + n_tokens, prepend_bos)
    if windows.shape[0] <= skip_seq:
        raise ValueError(f"the corpus has no text left after the {skip} training tokens for held-out evaluation")
    return windows[skip_seq:]


def source_configs(cfg: DictConfig, source: SAESource) -> tuple[Any, Any, Any]:
    """(model, corpus, data) configs: the training run's when the SAE came from one, else the command line's."""
    if source.run_cfg is not None:
        return run_model(source.run_cfg, cfg, source.run_dir), source.run_cfg.corpus, source.run_cfg.data
    return cfg.model, cfg.corpus, None


def output_dir(cfg: DictConfig, source: SAESource) -> Path:
    if cfg.run.get("dir"):
        return Path(str(cfg.run.dir))
    if source.run_dir is not None:
        return source.run_dir / "eval"
    return Path("runs") / f"eval-{datetime.now():%Y-%m-%d_%H-%M-%S}"


def evaluate(cfg: DictConfig, lm: LoadedLM | None = None) -> dict[str, Any]:
    """Evaluate `cfg.ckpt`; writes <out>/evaluation.json and a W&B summary; returns the metrics."""
    settings = validate_evaluate(cfg)  # first: bad settings fail here, before any load
    if settings.compare:
        return compare_runs([str(p) for p in settings.compare], Path(str(settings.run.dir or "runs/compare")), cfg)
    source = resolve_sae(settings.ckpt, settings.hookpoint)
    out = output_dir(cfg, source)
    # one process per run directory: the training run's when the results go into it, else the output folder
    held = source.run_dir if source.run_dir is not None and out.is_relative_to(source.run_dir) else out
    with run_lock(held, "evaluating", settings.run.wait):
        return evaluate_source(cfg, settings, source, out, lm)


def evaluate_source(cfg: DictConfig, settings: EvaluateConfig, source: SAESource, out: Path,
                    lm: LoadedLM | None = None) -> dict[str, Any]:
    """`evaluate` of a resolved SAE into `out`, once this process holds the run directory."""
    model_cfg, corpus_cfg, data_cfg = source_configs(cfg, source)
    lm = lm or load_lm(model_cfg)
    ev = settings.evaluate
    ctx_len = int(ev.ctx_len or (data_cfg.ctx_len if data_cfg is not None else 128))
    skip = exclude_first_tokens(source.run_cfg, settings.imported.exclude_first_tokens)
    tokens = heldout_windows(corpus_cfg, data_cfg, lm, ctx_len, ev.n_tokens, cache_root(data_cfg and data_cfg.get("cache_dir")))
    result = evaluate_spliced(lm, source.sae, source.hookpoint, tokens, ev.batch_size, skip)
    result.update({"ckpt": str(settings.ckpt), "sae": source.description, "hookpoint": source.hookpoint, "model": lm.name,
                   "k": source.sae.cfg.k, "d_sae": source.sae.cfg.d_sae})
    atomic_write_json(out / RESULT, result, default=str)
    logger = make_wandb_logger(cfg, out, "evaluate", attach=source.run_dir)  # the training run's W&B run, if any
    if logger is not None:
        logger.experiment.summary.update({f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))})
        logger.experiment.finish()
    print(format_table([result]))
    print(f"written {out / RESULT}")
    return result


COLUMNS = [("run", "{}"), ("l0", "{:.1f}"), ("fvu", "{:.4f}"), ("mse", "{:.3g}"), ("cosine", "{:.3f}"),
           ("dead_frac", "{:.3f}"), ("ce_clean", "{:.3f}"), ("ce_sae", "{:.3f}"), ("ce_loss_recovered", "{:.3f}"),
           ("kl_div", "{:.4f}")]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of the headline metrics."""
    header = [name for name, _ in COLUMNS]
    body = [[(fmt.format(r[name]) if r.get(name) is not None else "-") if name != "run" else str(r.get("run", r.get("ckpt", "")))
             for name, fmt in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def _result_file(p: Path) -> Path | None:
    for candidate in (p, p / RESULT, p / "eval" / RESULT):
        if candidate.is_file():
            return candidate
    return None


def _run_dir_of(result: Path) -> Path:
    """The run directory an evaluation.json belongs to (`<run>/eval/evaluation.json` → `<run>`)."""
    return result.parent.parent if result.parent.name == "eval" else result.parent


def rows_from_wandb(root: Path) -> list[dict[str, Any]]:
    """Evaluation rows from the offline W&B run files under `root` (no server): each run whose summary
    holds eval/* values gives one row, named after the W&B run, with its group."""
    from saeforge.pipelines.wandb_records import read_file, read_runs

    runs = [{**read_file(root), "files": [root]}] if root.is_file() else read_runs(root)
    rows = []
    for run in runs:
        values = {k.removeprefix("eval/"): v for k, v in run["summary"].items() if k.startswith("eval/")}
        if values.get("l0") is not None:
            rows.append({"run": run.get("name") or run["id"], "wandb_id": run["id"], "group": run.get("group"), **values})
    return rows


def collect_results(path: str) -> list[dict[str, Any]]:
    """Rows for one `compare=` entry: a run dir or evaluation.json; a sweep directory (every run dir
    under it that holds eval/evaluation.json); else the offline W&B run files under it (or a .wandb file)."""
    p = Path(path)
    direct = _result_file(p)
    if direct is not None:
        group = (read_wandb_run(_run_dir_of(direct)) or {}).get("group")
        return [{"run": path, "group": group, **json.loads(direct.read_text())}]
    if p.is_dir():
        found = sorted(f for f in p.rglob(RESULT) if "wandb" not in f.parts)
        if found:
            rows = []
            for f in found:
                run = _run_dir_of(f)
                rows.append({"run": str(run), "group": (read_wandb_run(run) or {}).get("group"), **json.loads(f.read_text())})
            return rows
    if p.exists():
        rows = rows_from_wandb(p)
        if rows:
            return rows
    raise FileNotFoundError(f"compare: no {RESULT} and no offline W&B run with eval/* under {path} "
                            f"(run `python evaluate.py ckpt=<run dir>` first)")


def compare_runs(paths: list[str], out: Path, cfg: DictConfig | None = None) -> dict[str, Any]:
    """Print a table and write a PNG (FVU and CE recovered against L0) for several evaluated runs.

    Each path is a run dir, a sweep directory or a directory of offline W&B runs (`collect_results`).
    With a W&B logger in `cfg`, the plot and table go to a `compare` run in the runs' group (when
    they share one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((row for p in paths for row in collect_results(p)), key=lambda r: r["l0"])
    names = point_names([str(r["run"]) for r in rows])
    print(format_table([{**r, "run": name} for r, name in zip(rows, names)]))  # compare.json keeps the full paths
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "fvu", "FVU (lower is better)"), (axes[1], "ce_loss_recovered", "CE loss recovered")):
        points = [r for r in rows if r.get(key) is not None]  # CE recovered is undefined when ablation does not hurt
        ax.plot([r["l0"] for r in points], [r[key] for r in points], "o-")
        for r, name in zip(rows, names):
            if r.get(key) is not None:
                ax.annotate(name, (r["l0"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if not points:
            ax.text(0.5, 0.5, "undefined: ablation does not raise the loss", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="gray")
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("SAE sparsity / fidelity trade-off")
    fig.tight_layout()
    png = out / "compare.png"
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    atomic_write_json(out / "compare.json", rows, default=str)
    print(f"written {png}")
    if cfg is not None:
        log_compare(cfg, out, rows, png)
    return {"rows": rows, "plot": str(png)}


def point_names(runs: list[str]) -> list[str]:
    """Short plot labels: each run's path below the runs' common folder, without the comma-separated
    parts that every run shares (a sweep's `data.ctx_len=64,...,sae.k=16,...` → `sae.k=16`)."""
    import os

    if len(runs) < 2:
        return [Path(r).name for r in runs]
    try:
        common = os.path.commonpath(runs)
        names = [os.path.relpath(r, common) if r != common else Path(r).name for r in runs]
    except ValueError:  # mixed absolute and relative paths
        names = [Path(r).name for r in runs]
    parts = [n.split(",") for n in names]
    shared = set.intersection(*(set(q) for q in parts))
    return [",".join(x for x in q if x not in shared) or n for q, n in zip(parts, names)]


def log_compare(cfg: DictConfig, out: Path, rows: list[dict[str, Any]], png: Path) -> None:
    """The frontier plot and the table as a `compare` W&B run in the runs' shared group (if any)."""
    groups = {r.get("group") for r in rows}
    group = groups.pop() if len(groups) == 1 else None
    logger = make_wandb_logger(cfg, out, "compare", group=group)
    if logger is None:
        return
    import wandb

    columns = [name for name, _ in COLUMNS]
    run = logger.experiment
    run.log({"compare/frontier": wandb.Image(str(png)),
             "compare/table": wandb.Table(columns=columns, data=[[r.get(c) if c != "run" else str(r["run"]) for c in columns]
                                                                  for r in rows])})
    run.finish()
