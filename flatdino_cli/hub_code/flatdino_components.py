"""flatdino's networks as diffusers models, the custom components of an exported FlatDINO pipeline.

A thin wrapper: config.json holds the flatdino stage config, `net` is the network flatdino itself builds
from it (pip install flatdino), so a diffusers pipeline computes exactly what `flatdino sample` does.
"""

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from flatdino_cli.config_yaml import config_from_dict
from flatdino_cli.models import build_model
from flatdino_cli.models.stats import LatentStats


class FlatDINOModel(ModelMixin, ConfigMixin):
    """The network of `stage_config` (a DiT, a VAE or a pixel decoder) as `net`; a DiT trained on
    normalised features also holds its latent statistics (`stats`, the divisor stored as is)."""

    @register_to_config
    def __init__(self, stage_config: dict, stats_shape: list | None = None, class_names: list | None = None):
        super().__init__()
        self.stage_cfg = config_from_dict(stage_config, "config.json")
        self.net = build_model(self.stage_cfg).eval()
        self.stats = None
        if stats_shape is not None:
            self.stats = LatentStats(torch.zeros(stats_shape), torch.ones(stats_shape), eps=0.0)
