"""What a feature or latent store says about the network that reads it: the DiT's tokens, width, grid
and classes come from its store; a trained VAE is checked against the features it is given."""

from __future__ import annotations

import dataclasses

from flatdino_cli.config import DiTStageConfig, VAEModelConfig
from flatdino_cli.data.store import Store
from flatdino_cli.data.transforms import is_whole_image
from flatdino_cli.errors import UserError


def store_grid(store: Store, preset_grid) -> tuple[int, int] | None:
    """The 2-D layout of a store's rows as extract recorded it: the encoder's patch grid for features
    and per-patch (FAE) latents, None for flat tokens. Stores that do not record it keep the preset's."""
    extra = store.manifest.get("extra", {})
    grid = extra["grid"] if "grid" in extra else preset_grid
    return tuple(grid) if grid else None


def with_store_shape(cfg: DiTStageConfig, store: Store, where) -> DiTStageConfig:
    """The DiT's tokens, in_dim, grid and classes come from the store it trains on (as train-vae's input
    size comes from its feature store), so the preset's architecture is all the preset says. The
    preset's num_classes (ImageNet's 1000) gives way to the store's class count; a store without
    labels makes an unconditional model (num_classes 0: only the null class, no guidance)."""
    T, d = store.item_shape
    try:
        model = dataclasses.replace(cfg.model, tokens=T, in_dim=d, grid=store_grid(store, cfg.model.grid),
                                    num_classes=store.num_classes)
    except UserError as e:
        raise UserError(f"{where}: items of shape {(T, d)} do not fit this preset: {e}") from None
    flow = cfg.flow if model.num_classes else dataclasses.replace(cfg.flow, cfg_scale=1.0, cfg_schedule=())
    return dataclasses.replace(cfg, model=model, flow=flow)


def check_feature_shape(store: Store, vae_model_cfg: VAEModelConfig, where, encode_only: bool = False) -> None:
    """One-line UserError when a feature store does not have the shape this VAE was trained on.

    encode_only: the store is only encoded (`extract --vae`), so a FlatDINO encoder, which has no patch
    positions, takes any patch count of a whole-image store (the authors' k-NN protocol feeds it the 324
    patches of a 256-px image, though it was trained on 256)."""
    want = (vae_model_cfg.num_patches, vae_model_cfg.feature_dim)
    have = tuple(store.item_shape)
    if have == want:
        return
    if (encode_only and vae_model_cfg.kind == "flat" and have[-1] == want[-1]
            and is_whole_image(store.manifest.get("preprocessing"))):
        return
    raise UserError(f"{where}: features of shape {have}, but the VAE expects {want} "
                    "(was it trained on another encoder's store?)")
