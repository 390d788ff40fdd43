"""The Engine interface and the plain data it exchanges.

Requests and results are dataclasses of JSON-able fields plus numpy arrays, so the same
objects travel in-process (LocalEngine) and over HTTP (RemoteEngine: JSON + npz/PNG, never
pickle). Coordinates are level-0 pixels of the source slide; placements are micrometres.
The fine-tune request and the fields' limits live in `mupd.requests`, which `train` shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from ..progress import CancelToken, ProgressCallback
from ..regions.outputs import StainLayer
from ..requests import MAX_SEED, MAX_STEPS, MPP_RANGE, FinetuneRequest, bounded
from ..scores import CellReadout, MarkerScore


@dataclass
class EngineInfo:
    device: str
    model_name: str
    model_path: str
    targets: list[dict[str, Any]]  # catalogue entries: name, kind ("rgb"|"marker"), colormap, ...
    tile_size: int
    mpp: float
    model_card: str = ""
    remote: bool = False
    rna_genes: list[str] = field(default_factory=list)  # the model's gene panel, in order
    guidance: dict[str, float] = field(default_factory=dict)  # the model's generation defaults


@dataclass
class TranslateRequest:
    slide_path: str
    stains: list[str]
    # Either a box (x, y, width, height) or a polygon [(x, y), ...], level-0 pixels; a polygon
    # may have holes (rings cut out of it: tiles inside one are not run, its cells not scored).
    box: Optional[tuple[int, int, int, int]] = None
    polygon: Optional[list[tuple[float, float]]] = None
    holes: list[list[tuple[float, float]]] = field(default_factory=list)
    steps: int = bounded(1, 1, MAX_STEPS)
    guidance: dict[str, float] = field(default_factory=dict)
    seed: int = bounded(0, 0, MAX_SEED)
    slide_mpp: Optional[float] = bounded(None, *MPP_RANGE)  # user override when the file has no mpp
    render_brightfield: bool = True  # also render marker maps as a DAB-on-hematoxylin IHC image
    output_path: Optional[str] = None  # OME-Zarr written here when given (never overwritten)
    ome_tiff: bool = False  # with output_path: also a pyramidal OME-TIFF per layer
    stain_norm: Optional[str] = None  # "macenko" / "reinhard" onto the training stain (mupd.stain_norm)
    strength: Optional[float] = bounded(None, 0.0, 1.0)  # image-to-image for RGB stains (SDEdit)
    prompt: Optional[str] = None  # with strength: the look to take (default: the FFPE caption)
    #: a lab's IHC the DAB renderings match (mupd.render.IhcLook.to_dict; None: the defaults)
    ihc_look: Optional[dict[str, float]] = None


@dataclass
class TranslateResult:
    layers: list[StainLayer]  # each placed over the source slide (`regions.outputs`)
    output_path: Optional[str] = None
    n_tiles: int = 0
    seconds: float = 0.0
    #: Per-marker predicted read-outs over the region's cells (`mupd.scores`) and the cells
    #: (level-0 outlines, each marker's level); present when markers were rendered as IHC.
    scores: list[MarkerScore] = field(default_factory=list)
    cells: Optional[CellReadout] = None


@dataclass
class GenerateRequest:
    text: Optional[str] = None
    rna: Optional[dict[str, float]] = None  # gene symbol -> value
    rna_normalized: bool = False  # False: raw counts, CPM + log1p applied
    reference: Optional[np.ndarray] = None  # (H, W, 3) uint8 H&E tile for the reference stream
    stain: str = "H&E"
    num_images: int = bounded(4, 1, 2**31 - 1)
    steps: int = bounded(20, 1, MAX_STEPS)
    guidance: dict[str, float] = field(default_factory=dict)  # modality -> CFG scale; {}: the model's
    seed: int = bounded(0, 0, MAX_SEED)


@dataclass
class GenerateResult:
    images: np.ndarray  # (N, H, W, 3) uint8
    missing_genes: list[str] = field(default_factory=list)
    used_genes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class JobStatus:
    job_id: str
    state: str  # "queued" | "running" | "done" | "failed" | "cancelled"
    step: int = 0
    total: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)  # e.g. [{"step": 1, "loss": .3}]
    message: str = ""
    result_path: Optional[str] = None


@runtime_checkable
class Engine(Protocol):
    """What the plugin, CLI and server call. Local and remote engines behave identically."""

    def info(self) -> EngineInfo: ...

    def load_model(self, path: Optional[str]) -> EngineInfo: ...

    def translate(
        self,
        request: TranslateRequest,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> TranslateResult: ...

    def generate(
        self,
        request: GenerateRequest,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> GenerateResult: ...

    def start_finetune(self, request: FinetuneRequest) -> JobStatus: ...

    def job_status(self, job_id: str) -> JobStatus: ...

    def cancel_job(self, job_id: str) -> JobStatus: ...

    def list_models(self) -> Sequence[str]: ...
