"""Engines: the one interface the plugin talks to (local in-process, or remote over HTTP)."""

from ..requests import FinetuneRequest
from .api import (
    Engine,
    EngineInfo,
    GenerateRequest,
    GenerateResult,
    JobStatus,
    TranslateRequest,
    TranslateResult,
)

__all__ = [
    "Engine",
    "EngineInfo",
    "FinetuneRequest",
    "GenerateRequest",
    "GenerateResult",
    "JobStatus",
    "TranslateRequest",
    "TranslateResult",
]
