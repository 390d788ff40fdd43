"""Features from a user-supplied image encoder: a transformers model folder on a local path
(e.g. a pathology foundation model the user has downloaded). Never fetched from a hub."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelError


class ImageEncoder:
    """Pooled embedding per tile: `pooler_output` when the model has one, else the mean token."""

    def __init__(self, folder: str | Path, batch_size: int = 32) -> None:
        from transformers import AutoImageProcessor, AutoModel

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise ModelError(f"encoder folder {self.folder} has no config.json (a transformers model folder)")
        try:
            self.processor = AutoImageProcessor.from_pretrained(self.folder, local_files_only=True)
            self.model = AutoModel.from_pretrained(self.folder, local_files_only=True).eval()
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load image encoder from {self.folder}: {exc}") from None
        self.batch_size = batch_size
        self.name = getattr(self.model.config, "_name_or_path", "") or self.folder.name

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(tiles), self.batch_size):
                batch = self.processor(images=list(tiles[start:start + self.batch_size]), return_tensors="pt")
                result = self.model(**batch)
                pooled = getattr(result, "pooler_output", None)
                if pooled is None:
                    pooled = result.last_hidden_state.mean(dim=1)
                out.append(pooled.reshape(len(pooled), -1).float().numpy())
        return np.concatenate(out).astype(np.float64)
