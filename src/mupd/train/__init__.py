"""Training and fine-tuning: one accelerate loop (`trainer`) on an objective (`loss`: the
flow-matching loss of a pipeline; `vae`: the project VAE's), exact resume (`checkpoint`,
`order`), configs (`config`), data sources (`folders`, `store`), LoRA/full fine-tuning
(`finetune`) and the `mupd train` / `mupd finetune` commands (`commands`)."""
