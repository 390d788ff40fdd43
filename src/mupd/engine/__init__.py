"""Engines: the one interface the plugin talks to (local in-process, or remote over HTTP)."""

from .api import (
    Engine,
    EngineInfo,
    FinetuneRequest,
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
