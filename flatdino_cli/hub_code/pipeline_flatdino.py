"""A flatdino DiT run as a diffusers pipeline: class labels -> images, as `flatdino sample` makes them.

`pipe(class_labels=[207] * 4, seed=0)` gives the images of `flatdino sample -c 207 -n 4 --seed 0` (image
i from the noise of image i: the same sampler, time grid, guidance and seeds, in fp32). Sampling is
flatdino's own (pip install flatdino); the scheduler component records the flow-matching schedule in
diffusers' terms and is not stepped.
"""

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from PIL import Image

from flatdino_cli.classes import resolve_classes
from flatdino_cli.errors import UserError
from flatdino_cli.pipeline import Pipeline
from flatdino_cli.pipeline.generate import generate
from flatdino_cli.pipeline.options import sampling_flow
from flatdino_cli.runtime import Runtime


class FlatDINOPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer->vae->decoder"
    _optional_components = ["vae", "scheduler"]

    def __init__(self, transformer, decoder, vae=None, scheduler=None):
        super().__init__()
        self.register_modules(transformer=transformer, decoder=decoder, vae=vae, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, class_labels=None, num_images: int | None = None, seed: int = 0,
                 guidance_scale: float | None = None, num_inference_steps: int | None = None, batch_size: int = 16,
                 output_type: str = "pil", return_dict: bool = True):
        """class_labels: ids or class names, one image each (an unconditional DiT takes none, and
        num_images); guidance_scale / num_inference_steps: the run's flow settings unless given.
        output_type "pil" (a list of images) or "np" (uint8 (B, S, S, 3))."""
        t = self.transformer
        cfg = t.stage_cfg
        K = cfg.model.num_classes
        if K == 0:
            if class_labels is not None or guidance_scale not in (None, 1.0):
                raise UserError("this DiT is unconditional: pass num_images, and no class_labels or guidance_scale")
            labels, guidance_scale = [0] * (num_images or 1), 1.0
        else:
            if class_labels is None:
                raise UserError(f"pass class_labels (ids 0..{K - 1} or class names)")
            labels = resolve_classes([str(c) for c in class_labels], K, t.config.class_names or [])
        flow = sampling_flow(cfg.flow, guidance_scale, num_inference_steps)
        pipe = Pipeline(cfg, t.net, self.decoder.net, self.vae.net if self.vae is not None else None, t.stats)
        images = generate(pipe, labels, list(range(len(labels))), seed, flow, batch_size,
                          Runtime(t.device, "fp32", False))
        if output_type == "pil":
            images = [Image.fromarray(a) for a in images]
        return ImagePipelineOutput(images=images) if return_dict else (images,)
