"""Train a sparse autoencoder: `python train.py sae.k=50 trainer.devices=4` (see configs/train.yaml)."""

import hydra
from omegaconf import DictConfig

from saeforge.pipelines.run import check_command_line, config_errors_exit, setup_logging


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_logging()
    with config_errors_exit():  # a bad setting: one line on stderr, exit status 2
        from saeforge.pipelines.validate import validate_train

        plan = validate_train(cfg)  # cheap: before Lightning is even imported
        from saeforge.pipelines.train import train

        train(cfg, plan)


if __name__ == "__main__":
    check_command_line("train")  # unknown keys fail here, before Hydra composes anything
    main()
