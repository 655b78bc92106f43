#!/usr/bin/env bash
# The paper's recipe on ImageNet-1k at 256 px with torchrun on N GPUs (FlatDINO, arXiv 2602.04873).
# Each step resumes if killed: rerun the script. Paper numbers beside each step are what the
# authors report; yours depend on hardware, epochs and seeds.
#
#   IMAGENET=/data/imagenet GPUS=8 bash examples/imagenet.sh
#
# Needs: DINOv2-B/14-reg4 weights in the Hugging Face cache (timm vit_base_patch14_reg4_dinov2.lvd142m)
# or ENCODER_WEIGHTS=/path/to/file; RAE's ViT-XL decoder (nyu-visionx/RAE-collections:
# decoders/dinov2/wReg_base/ViTXL_n08/model.pt) as RAE_DECODER; the ADM reference batch
# VIRTUAL_imagenet256_labeled.npz as REF; Inception weights for FID (clean-fid's cache or INCEPTION).
set -euo pipefail
IMAGENET=${IMAGENET:?set IMAGENET to the folder holding train/ and val/ (synset folders)}
GPUS=${GPUS:-8}
OUT=${OUT:-runs/imagenet}
RAE_DECODER=${RAE_DECODER:-models/decoders/dinov2/wReg_base/ViTXL_n08/model.pt}
REF=${REF:-VIRTUAL_imagenet256_labeled.npz}
ENC=(--encoder dinov2-b-reg4)
[ -n "${ENCODER_WEIGHTS:-}" ] && ENC+=(--encoder-weights "$ENCODER_WEIGHTS")
INDEX=(${CLASS_INDEX:+--class-index "$CLASS_INDEX"})   # synset -> 0..999 (LOC_synset_mapping.txt)
run() { torchrun --nproc-per-node "$GPUS" -m flatdino_cli.cli "$@"; }

# 1. DINOv2-B/14-reg4 features, ADM crop 256 -> 224 (1.28M train, 50k val; ~23.4 GFLOPs per image)
flatdino extract "$IMAGENET/train" "$OUT/features-train" "${ENC[@]}" "${INDEX[@]}" --batch-size 256 --workers 16
flatdino extract "$IMAGENET/val" "$OUT/features-val" "${ENC[@]}" "${INDEX[@]}" --batch-size 256 --workers 16

# 2. The laminator: vae-32x128 (ViT-B encoder, ViT-L decoder), 150 epochs, batch 512
#    (paper: rFID ~0.97 for 32x64 at 50 epochs; the generator uses 32x128)
run train-vae --preset vae-32x128 --features "$OUT/features-train" --out "$OUT/vae-32x128"

# 3. Latents (posterior mean mu) for the generator
flatdino extract "$OUT/features-train" "$OUT/latents-train" --vae "$OUT/vae-32x128"

# 4. LightningDiT-XL on 32 x 128 latents, 600 epochs, batch 1024, EMA 0.9995
#    (8.3x fewer forward FLOPs than DiT-XL on RAE's 256 x 768 grid)
run train-dit --preset xl-32x128 --latents "$OUT/latents-train" --out "$OUT/dit-xl"

# 5. 50k class-balanced samples (50 per class), 50 Euler steps; with CFG 4.5 on 0.225 < t < 1
flatdino sample --dit "$OUT/dit-xl" --vae "$OUT/vae-32x128" --decoder "$RAE_DECODER" \
  --classes all --per-class 50 --cfg 1.0 --out "$OUT/samples-nocfg" --batch-size 125
flatdino sample --dit "$OUT/dit-xl" --vae "$OUT/vae-32x128" --decoder "$RAE_DECODER" \
  --classes all --per-class 50 --cfg 4.5 --out "$OUT/samples-cfg4.5" --batch-size 125

# 6. gFID-50k against ADM's reference batch (paper: 3.34 without guidance, 1.85 with guidance)
flatdino fid "$OUT/samples-nocfg" --ref "$REF" --json | tee "$OUT/gfid-nocfg.json"
flatdino fid "$OUT/samples-cfg4.5" --ref "$REF" --json | tee "$OUT/gfid-cfg4.5.json"

# 7. rFID: reconstructions of the 50k validation images vs the ADM-cropped originals
flatdino reconstruct "$IMAGENET/val" --vae "$OUT/vae-32x128" --decoder "$RAE_DECODER" --out "$OUT/recon-val"
flatdino fid "$OUT/recon-val/images" --ref "$IMAGENET/val" --json | tee "$OUT/rfid.json"
