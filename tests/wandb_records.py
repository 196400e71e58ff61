"""The offline W&B run reader now lives in the package; kept here for the tests that import it."""

from saeforge.pipelines.wandb_records import payloads, read_file, read_run, read_runs  # noqa: F401
