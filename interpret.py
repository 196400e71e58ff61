"""Interpret an SAE's features: `python interpret.py ckpt=<run dir|.ckpt|SAE dir> interpret.stages=[...]`."""

import hydra
from omegaconf import DictConfig

from saeforge.pipelines.interpret import interpret
from saeforge.pipelines.run import setup_logging


@hydra.main(config_path="configs", config_name="interpret", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_logging()
    interpret(cfg)


if __name__ == "__main__":
    main()
