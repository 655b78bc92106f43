"""The named encoders: the timm DINOv2-reg4 family at the sizes the stages use, and the tiny random ones
the tests and toy runs use; `--encoder NAME` resolves here."""

from __future__ import annotations

from dataclasses import dataclass

from flatdino_cli.errors import UserError

NUM_REGISTERS = 4
NUM_PREFIX_TOKENS = 1 + NUM_REGISTERS  # CLS + registers; FrozenEncoder checks timm's own count against it


@dataclass(frozen=True)
class EncoderSpec:
    """A named encoder: the timm DINOv2-reg4 family at a given size, and where its weights come from."""

    name: str
    image_size: int  # square input side in pixels
    patch_size: int
    dim: int
    depth: int
    heads: int
    description: str
    interpolation: str = "bicubic"  # default resize to image_size (generator pipeline, DESIGN.md)
    hub_repos: tuple[str, ...] = ()  # HF repos whose cached weights fit; the first one is downloadable
    seed: int = 0  # random init when there are no weights (tiny)
    arch: str = "vit_base_patch14_reg4_dinov2"  # timm family; width/depth/heads/patch/size from the spec

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return g, g

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


ENCODERS: dict[str, EncoderSpec] = {s.name: s for s in [
    EncoderSpec("dinov2-b-reg4", image_size=224, patch_size=14, dim=768, depth=12, heads=12,
                description="DINOv2 ViT-B/14 + 4 registers (LVD-142M), 224 px -> 16x16 patches",
                hub_repos=("timm/vit_base_patch14_reg4_dinov2.lvd142m", "facebook/dinov2-with-registers-base")),
    # RAE's DiT-XL anchor numbers (seed 002) were measured on DINOv2-S features (16x16 x 384)
    EncoderSpec("dinov2-s-reg4", image_size=224, patch_size=14, dim=384, depth=12, heads=6,
                description="DINOv2 ViT-S/14 + 4 registers (LVD-142M), 224 px -> 16x16 patches x 384",
                hub_repos=("timm/vit_small_patch14_reg4_dinov2.lvd142m", "facebook/dinov2-with-registers-small"),
                arch="vit_small_patch14_reg4_dinov2"),
    # FAE's ImageNet numbers (seed 004) use DINOv2-g/14 (1536-d); its MLP is SwiGLU (hidden 4096)
    EncoderSpec("dinov2-g-reg4", image_size=224, patch_size=14, dim=1536, depth=40, heads=24,
                description="DINOv2 ViT-g/14 + 4 registers (LVD-142M), 224 px -> 16x16 patches x 1536",
                hub_repos=("timm/vit_giant_patch14_reg4_dinov2.lvd142m", "facebook/dinov2-with-registers-giant"),
                arch="vit_giant_patch14_reg4_dinov2"),
    # Same timm architecture (LayerScale, registers, no pos-embed on prefix tokens), CPU-sized: width 64,
    # 4 blocks, 4 heads, 48 px / patch 8 -> 6x6 = 36 patches. Random DINOv2 init has LayerScale 1e-5,
    # so the blocks are near identity and features are ~ LN(patch embedding + pos embedding), with a
    # sin-cos pos embedding in place of timm's near-zero random one (see _give_position).
    EncoderSpec("tiny", image_size=48, patch_size=8, dim=64, depth=4, heads=4,
                description="for testing only: random weights (fixed seed), DINOv2-reg4 architecture"),
    # The same tiny encoder at patch 4: a 12x12 = 144-patch grid, long against a 16-token laminator as
    # DINOv2-B's 256 patches are against FlatDINO's 32 tokens (9x vs 8x): `flatdino compare`'s toy grid.
    EncoderSpec("tiny-p4", image_size=48, patch_size=4, dim=64, depth=4, heads=4,
                description="for testing only: the tiny encoder at patch 4, 48 px -> 12x12 patches x 64"),
]}


def get_spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise UserError(f"--encoder {name!r}: unknown encoder; valid names: {', '.join(ENCODERS)}")
    return ENCODERS[name]
