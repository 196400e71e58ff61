"""Concept discovery: `python discover.py concepts=<csv> saes=<set.yaml> [discover.stage=extract|analyze|all]`.

Finds the SAE features, over every layer and SAE of a set, whose activations track a 0–3 concept
label. The CSV and the SAE set are checked before any model loads; extraction resumes after a kill.
"""

import hydra
from omegaconf import DictConfig

from saeforge.pipelines.run import check_command_line, config_errors_exit, setup_logging


@hydra.main(config_path="configs", config_name="discover", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_logging()
    with config_errors_exit():  # a bad setting, CSV row or SAE entry: one line on stderr, exit status 2
        from saeforge.pipelines.validate import validate_discover

        plan = validate_discover(cfg)  # cheap: CSV, SAE set, hookpoints, widths, before torch loads the LM
        from saeforge.pipelines.discover import discover

        discover(plan)


if __name__ == "__main__":
    check_command_line("discover")  # unknown keys fail here, before Hydra composes anything
    main()
