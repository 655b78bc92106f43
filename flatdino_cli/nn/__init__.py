"""Shared neural-network building blocks (one concept a file); models/ only composes these."""

from flatdino_cli.nn.attention import Attention, apply_rope, fuse_qkv, rotate_half
from flatdino_cli.nn.block import AdaLNBlock, Block, FinalLayer
from flatdino_cli.nn.cells import group_cells, ungroup_cells
from flatdino_cli.nn.embed import GaussianFourierEmbedder, LabelEmbedder, rope_1d, rope_2d, sincos_1d, sincos_2d
from flatdino_cli.nn.mlp import MLP_KINDS, GeluMLP, SwiGLU, make_mlp
from flatdino_cli.nn.modulate import AdaLN, modulate
from flatdino_cli.nn.norm import NORM_KINDS, FP32LayerNorm, RMSNorm, make_norm

__all__ = [
    "Attention", "apply_rope", "fuse_qkv", "rotate_half",
    "Block", "AdaLNBlock", "FinalLayer",
    "group_cells", "ungroup_cells",
    "sincos_1d", "sincos_2d", "rope_1d", "rope_2d", "GaussianFourierEmbedder", "LabelEmbedder",
    "SwiGLU", "GeluMLP", "make_mlp", "MLP_KINDS",
    "AdaLN", "modulate",
    "RMSNorm", "FP32LayerNorm", "make_norm", "NORM_KINDS",
]
