"""Train a sparse autoencoder: `python train.py sae.k=50 trainer.devices=4` (see configs/train.yaml)."""

import hydra
from omegaconf import DictConfig

from saeforge.pipelines.run import setup_logging
from saeforge.pipelines.train import train


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_logging()
    train(cfg)


if __name__ == "__main__":
    main()
