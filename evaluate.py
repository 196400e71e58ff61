"""Evaluate an SAE in its LM: `python evaluate.py ckpt=<run dir|.ckpt|SAE dir>`, or `compare=[runs...]`."""

import hydra
from omegaconf import DictConfig

from saeforge.pipelines.run import check_command_line, config_errors_exit, setup_logging


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_logging()
    with config_errors_exit():  # a bad setting: one line on stderr, exit status 2
        from saeforge.pipelines.validate import validate_evaluate

        validate_evaluate(cfg)  # cheap: before torch and the LM stack are imported
        from saeforge.pipelines.evaluate import evaluate

        evaluate(cfg)


if __name__ == "__main__":
    check_command_line("evaluate")  # unknown keys fail here, before Hydra composes anything
    main()
