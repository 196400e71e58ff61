"""`python discover.py`: extraction (discover/extract.py) then analysis (discover/analyze.py) of a concept.

Output folder (run.dir, default runs/discover-<CSV name>): `activations/` holds one
`layer_{L}_l0_{L0}_activations.npz` per configuration, `batch_progress.json` and
`configurations.json` (the resolved SAE set with Neuronpedia ids, read by the analysis);
`analysis/` holds what the analysis writes. `discover.stage` picks one half.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from saeforge.discover.extract import CACHE_DIR, ExtractStats, extract_concepts
from saeforge.discover.files import CONFIGURATIONS_FILE, PROGRESS_FILE, write_configurations
from saeforge.pipelines.validate import DiscoverPlan

log = logging.getLogger(__name__)


def clear_extraction(folder: Path) -> None:
    """discover.overwrite=true: remove the folder's activation files, progress, configurations and cache."""
    for path in folder.glob("layer_*_l0_*_activations.npz"):
        path.unlink()
    for name in (PROGRESS_FILE, CONFIGURATIONS_FILE):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / CACHE_DIR, ignore_errors=True)


def run_extraction(plan: DiscoverPlan) -> ExtractStats:
    """Extract every configuration not yet written (all of them after discover.overwrite=true)."""
    settings = plan.settings.discover
    folder = plan.activations_dir
    if settings.overwrite:
        clear_extraction(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_configurations(folder, plan.fingerprint, [s.to_dict() for s in plan.saes])
    return extract_concepts(plan.concepts, plan.saes, plan.cfg.model, folder, fingerprint=plan.fingerprint,
                            layout=settings.layout, batch_size=settings.batch_size, encode_rows=settings.encode_rows,
                            max_tokens=settings.max_tokens, devices=plan.devices)


def run_analysis(plan: DiscoverPlan) -> Path:
    """Rank features against the label from the extracted files; returns ranking.csv's path."""
    try:
        from saeforge.discover.analyze import analyze_concepts  # type: ignore[import-not-found]
    except ImportError as err:
        raise RuntimeError("the analysis half (saeforge.discover.analyze) is not installed in this checkout") from err
    from saeforge.pipelines.run import make_wandb_logger

    logger = make_wandb_logger(plan.cfg, plan.out, "discover")
    csv = Path(str(plan.settings.concepts)) if plan.settings.concepts else None
    return analyze_concepts(plan.activations_dir, plan.out / "analysis", plan.settings.discover.analysis,
                            concepts_csv=csv, logger=logger)


def discover(plan: DiscoverPlan) -> None:
    """Run the stages `discover.stage` names (extract, analyze, or all)."""
    stage = plan.settings.discover.stage
    if stage in ("extract", "all"):
        stats = run_extraction(plan)
        log.info("discover: extraction done in %s (LM %.1f s over %d batches, encode %.1f s, write %.1f s)",
                 plan.activations_dir, stats.lm_seconds, stats.lm_batches, stats.encode_seconds, stats.write_seconds)
    if stage in ("analyze", "all"):
        ranking = run_analysis(plan)
        log.info("discover: ranking in %s", ranking)
