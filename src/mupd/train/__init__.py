"""Training and fine-tuning: one accelerate loop (`trainer`), exact resume (`checkpoint`,
`order`), configs (`config`), data sources (`folders`, `store`), LoRA/full fine-tuning
(`finetune`) and the `mupd train` / `mupd finetune` commands (`commands`)."""
