"""`flatdino` CLI with the laminator's posterior sampling switched off (z = mu), for test_train.py.

Each DDP rank and each micro-batch draws its own VAE noise (the loop seeds from step, micro-batch and
rank), so a 2-process run and a 1-process run differ by design. Using z = mu in training makes the
forward deterministic, so what remains compared is the loop: sharding, gradient averaging, logging.

Usage: python -m torch.distributed.run --nproc-per-node 2 tests/_mean_latent_cli.py train-vae ...
"""

import torch

from flatdino_cli.models.vae import FlatVAE


def mean_latent_forward(self: FlatVAE, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mu, logvar = self.encode(feats)  # (B, T, d) x2
    return self.decode(mu), mu, logvar


def patch() -> None:
    FlatVAE.forward = mean_latent_forward


if __name__ == "__main__":
    patch()
    from flatdino_cli.cli import app

    app(prog_name="flatdino")
