#!/usr/bin/env bash
# The paper's recipe on ImageNet-1k at 256 px with torchrun on N GPUs (FlatDINO, arXiv 2602.04873).
# Each step resumes if killed: rerun the script. Paper numbers beside each step are what the
# authors report; yours depend on hardware, epochs and seeds.
#
#   IMAGENET=/data/imagenet GPUS=8 bash examples/imagenet.sh
#
# Everything lands in the workspace WS (runs/<stage>-<preset>, stores/...); `flatdino workspace`
# lists it, and after this script `flatdino sample --class 207 --cfg 4.5` works there as typed.
#
# Needs: DINOv2-B/14-reg4 weights in the Hugging Face cache (timm vit_base_patch14_reg4_dinov2.lvd142m)
# or ENCODER_WEIGHTS=/path/to/file; RAE's ViT-XL decoder (nyu-visionx/RAE-collections:
# decoders/dinov2/wReg_base/ViTXL_n08/model.pt) as RAE_DECODER; the ADM reference batch
# VIRTUAL_imagenet256_labeled.npz as REF; Inception weights for FID (clean-fid's cache or INCEPTION).
set -euo pipefail
IMAGENET=${IMAGENET:?set IMAGENET to the folder holding train/ and val/ (synset folders)}
GPUS=${GPUS:-8}
WS=${WS:-runs/imagenet}
# absolute paths: the script works inside the workspace
RAE_DECODER=$(realpath "${RAE_DECODER:-models/decoders/dinov2/wReg_base/ViTXL_n08/model.pt}")
REF=$(realpath "${REF:-VIRTUAL_imagenet256_labeled.npz}")
INDEX=(${CLASS_INDEX:+--class-index "$(realpath "$CLASS_INDEX")"})   # synset -> 0..999 (LOC_synset_mapping.txt)
IMAGENET=$(realpath "$IMAGENET")
INCEPTION=${INCEPTION:+$(realpath "$INCEPTION")}
ENCODER_WEIGHTS=${ENCODER_WEIGHTS:+$(realpath "$ENCODER_WEIGHTS")}
mkdir -p "$WS" && cd "$WS"   # the workspace: every path below is relative to it
run() { torchrun --nproc-per-node "$GPUS" -m flatdino_cli.cli "$@"; }

# 0. Workspace defaults, set once: the pixel decoder, fid's reference batch and Inception weights,
#    the DINOv2 weights (when not in the Hugging Face cache)
flatdino workspace set decoder "$RAE_DECODER"
flatdino workspace set reference-batch "$REF"
if [ -n "${INCEPTION:-}" ]; then flatdino workspace set inception-weights "$INCEPTION"; fi
if [ -n "${ENCODER_WEIGHTS:-}" ]; then flatdino workspace set encoder-weights "$ENCODER_WEIGHTS"; fi

# 1. DINOv2-B/14-reg4 features, ADM crop 256 -> 224 (1.28M train, 50k val; ~23.4 GFLOPs per image)
flatdino extract "$IMAGENET/train" stores/in1k-train "${INDEX[@]}" --batch-size 256 --workers 16
flatdino extract "$IMAGENET/val" stores/in1k-val "${INDEX[@]}" --batch-size 256 --workers 16

# 2. The laminator: vae-32x128 (ViT-B encoder, ViT-L decoder), 150 epochs, batch 512
#    (paper: rFID ~0.97 for 32x64 at 50 epochs; the generator uses 32x128)
run train-vae --preset vae-32x128 --features stores/in1k-train            # -> runs/vae-vae-32x128

# 3. Latents (posterior mean mu) for the generator
flatdino extract stores/in1k-train --vae runs/vae-vae-32x128   # -> stores/in1k-train-latents-vae-vae-32x128

# 4. LightningDiT-XL on 32 x 128 latents, 600 epochs, batch 1024, EMA 0.9995
#    (8.3x fewer forward FLOPs than DiT-XL on RAE's 256 x 768 grid)
run train-dit --preset xl-32x128                    # finds the latents -> runs/dit-xl-32x128

# 5. 50k class-balanced samples (50 per class), 50 Euler steps; with CFG 4.5 on 0.225 < t < 1
#    (the newest DiT, its VAE and the workspace's decoder)
flatdino sample --classes all --per-class 50 --cfg 1.0 --out samples-nocfg --batch-size 125
flatdino sample --classes all --per-class 50 --cfg 4.5 --out samples-cfg4.5 --batch-size 125

# 6. gFID-50k against ADM's reference batch (paper: 3.34 without guidance, 1.85 with guidance)
flatdino fid samples-nocfg --json | tee gfid-nocfg.json
flatdino fid samples-cfg4.5 --json | tee gfid-cfg4.5.json

# 7. rFID: reconstructions of the 50k validation images vs the ADM-cropped originals
flatdino reconstruct "$IMAGENET/val" --vae runs/vae-vae-32x128 --decoder "$RAE_DECODER" --out recon-val
flatdino fid recon-val/images --ref "$IMAGENET/val" --json | tee rfid.json
