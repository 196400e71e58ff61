"""Interpret an SAE's features: `python interpret.py ckpt=<run dir|.ckpt|SAE dir> interpret.stages=[...]`.

Exits with `EXIT_INCOMPLETE` (3) when a stage left features failed (e.g. the explainer was
unreachable) and `interpret.allow_partial` is false; the outputs are written and a rerun retries
only the failed features.
"""

import sys

import hydra
from omegaconf import DictConfig

from saeforge.pipelines.run import check_command_line, config_errors_exit, setup_logging


@hydra.main(config_path="configs", config_name="interpret", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_logging()
    with config_errors_exit():  # a bad setting: one line on stderr, exit status 2
        from saeforge.pipelines.validate import validate_interpret

        validate_interpret(cfg)  # cheap: before torch and the LM stack are imported
        from saeforge.pipelines.interpret import EXIT_INCOMPLETE, IncompleteStages, interpret

        try:
            interpret(cfg)
        except IncompleteStages:  # the summary of the failures is already printed
            sys.exit(EXIT_INCOMPLETE)


if __name__ == "__main__":
    check_command_line("interpret")  # unknown keys fail here, before Hydra composes anything
    main()
