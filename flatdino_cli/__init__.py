"""flatdino: FlatDINO (laminated DINOv2 latents) + flow-matching generation, as a CLI toolkit."""

__version__ = "0.1.0"
