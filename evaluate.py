"""Evaluate an SAE in its LM: `python evaluate.py ckpt=<run dir|.ckpt|SAE dir>`, or `compare=[runs...]`."""

import hydra
from omegaconf import DictConfig

from saeforge.pipelines.evaluate import evaluate
from saeforge.pipelines.run import setup_logging


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_logging()
    evaluate(cfg)


if __name__ == "__main__":
    main()
