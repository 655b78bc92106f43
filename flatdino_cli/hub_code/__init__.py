"""Code files that `flatdino export DIT_RUN OUT --format diffusers` copies into the folder it writes, for
diffusers to import there (`DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)`); nothing in
flatdino imports them."""
