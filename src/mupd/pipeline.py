"""MuPDPipeline: the one object that trains (`training_loss`), generates and translates.

Objective: flow matching with the linear interpolant x_t = (1 - t) x_0 + t * noise, the model
predicting the velocity v = noise - x_0, training timesteps logit-normal (t = sigmoid(N(0, 1))),
except that a `readout_fraction` of translation samples is trained at t = 1 (the one-step
readout below, which logit-normal timesteps would almost never reach),
and each token modality (text, RNA, reference) dropped per sample with the config's probability
so that one model also gives the unconditional velocity for guidance.

Guidance (independent per modality, composable): with `guidance=None` the model is run once
with every given condition. With `guidance={"text": w_t, "rna": w_r, ...}` the velocity is the
compositional form v = v_uncond + sum_m w_m (v_m - v_uncond), v_m being the model given only
modality m (plus stain and source); all these passes run as one batch.

Sampling integrates dx/dt = v from t = 1 (noise) to t = 0 with Euler or Heun steps; one Euler
step is the one-step readout x_0 = noise - v(noise, 1), the default for translation.

The transformer predicts either v itself or (config `prediction: x0`) the clean latents x_0,
turned into v = (x_t - x_0) / t, so loss, guidance and samplers all work on v either way.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data.captions import RESTAIN_PROMPT
from .errors import ConditionError, ModelError, MuPDError, OutputExistsError
from .models.attention import MODALITIES
from .names import SOURCE
from .models.catalogue import StainCatalogue
from .models.codec import Codec, build_codec, encode_targets, load_codec, marker_codec, save_codec
from .models.configs import PREDICTIONS, READOUT_FRACTION, model_config
from .models.rna import RNATokenizer
from .models.text import DEFAULT as TEXT_DEFAULT
from .models.text import TextEncoder
from .models.transformer import MuPDTransformer
from .paths import STAIN_CATALOGUE
from .progress import CancelToken, ProgressCallback, ProgressEvent

INDEX_FILE = "model_index.json"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth", ".pkl")
#: Keys of model_index.json / codec.json whose string values are files or folders of the model.
REFERENCE_KEYS = ("codec", "catalogue", "rna_panel", "text_encoder", "folder", "path")
SAMPLERS = ("euler", "heun")
#: x0 models: t is clamped to this when x0 is turned into a velocity (no division by ~0).
MIN_T = 0.05


def _refuse_pickles(folder: Path) -> None:
    pickles = [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles and not any(folder.rglob("*.safetensors")):
        raise ModelError(f"{folder} holds pickle checkpoints ({', '.join(p.name for p in pickles[:3])}) "
                         f"and no safetensors; pickle weights are refused (they can run code): "
                         f"convert them to safetensors")


@contextmanager
def _loading(path: Path) -> Iterator[None]:
    """Whatever a broken model file raises (bad JSON, a missing key, truncated safetensors,
    shapes unlike the config) as a ModelError naming that file, for the CLI and the server."""
    try:
        yield
    except MuPDError:
        raise
    except Exception as exc:  # diffusers, safetensors and json raise many kinds
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ModelError(f"cannot load {path}: {reason}") from None


def _references(node: Any, key: str = "") -> Iterator[str]:
    """The file references in a model_index.json / codec.json tree: strings under a key that
    names a file or folder ("default", the bundled text encoder, is a name, not a path)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _references(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _references(v, key)
    elif isinstance(node, str) and key in REFERENCE_KEYS and node != TEXT_DEFAULT:
        yield node


def _check_references(folder: Path, index: dict[str, Any], roots: Sequence[Path]) -> Optional[Path]:
    """Refuse a model folder that reaches outside itself and `roots` (a symlink, the codec's VAE,
    a path in model_index.json); returns the text encoder folder (None: the default one)."""
    allowed = [p.resolve() for p in (folder, *roots)]

    def inside(path: Path) -> Path:
        for p in (path, *path.rglob("*")) if path.is_dir() else (path,):
            if not any(p.resolve().is_relative_to(root) for root in allowed):
                raise ModelError(f"model folder {folder} refers to {p}, which lies outside it"
                                 f"{' and the model roots' if roots else ''} (at {p.resolve()}); "
                                 f"copy it into the model folder")
        return path

    inside(folder)
    for ref in _references(index):
        inside(folder / Path(ref).expanduser())
    with _loading(folder / "codec" / "codec.json"):
        codec_spec = json.loads((folder / "codec" / "codec.json").read_text())
    for ref in _references(codec_spec):
        inside(folder / "codec" / ref)
    reference = index.get("text_encoder", TEXT_DEFAULT)
    return None if reference == TEXT_DEFAULT else folder / Path(str(reference)).expanduser()


class MuPDPipeline:
    """Transformer + codec + condition encoders + stain catalogue + gene panel."""

    def __init__(self, transformer: MuPDTransformer, codec: Codec, catalogue: StainCatalogue,
                 rna_tokenizer: RNATokenizer, text_encoder: TextEncoder,
                 config: dict[str, Any]) -> None:
        self.transformer, self.codec = transformer, codec
        self.catalogue, self.rna_tokenizer, self.text_encoder = catalogue, rna_tokenizer, text_encoder
        self.config = config
        block = codec.downsample * transformer.config.patch_size
        if self.tile_size % block:
            raise ModelError(f"tile size {self.tile_size} px is not a multiple of {block} px "
                             f"(codec downsample x patch size)")
        if self.prediction not in PREDICTIONS:
            raise ModelError(f"model config prediction {self.prediction!r} unknown; use "
                             f"{' or '.join(PREDICTIONS)}")
        if codec.latent_channels != transformer.config.latent_channels:
            raise ModelError(f"codec gives {codec.latent_channels} latent channels, the transformer "
                             f"expects {transformer.config.latent_channels}")
        # None: the image codec also codes marker targets (every model before `marker_codec`)
        self.marker_codec = marker_codec(str(config.get("marker_codec", "codec")), codec)

    # -- construction and folders ---------------------------------------------------------
    @property
    def tile_size(self) -> int:
        return int(self.config["tile_size"])

    @property
    def prediction(self) -> str:
        return str(self.config.get("prediction", "velocity"))

    def _as_velocity(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity from the transformer's output (`prediction`): itself, or from x0."""
        if self.prediction == "velocity":
            return out
        return (xt - out) / t.clamp(min=MIN_T).to(xt.dtype)[:, None, None, None]

    @property
    def mpp(self) -> float:
        return float(self.config["mpp"])

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def to(self, device: torch.device | str) -> "MuPDPipeline":
        self.transformer.to(device)
        self.codec.to(device)
        self.text_encoder.to(device)
        return self

    @classmethod
    def from_config_name(cls, name: str = "tiny", **overrides: Any) -> "MuPDPipeline":
        """An untrained pipeline of a named config (`configs.model_config` overrides apply)."""
        config = model_config(name, **overrides)
        codec = build_codec(config["codec"])
        text_encoder = TextEncoder(config["text_encoder"], config["text_max_length"])
        panel = config["rna_panel"]
        group = int(config["rna_group_size"])
        if panel is None:
            tokenizer = RNATokenizer.default(group)
        elif isinstance(panel, (list, tuple)):
            tokenizer = RNATokenizer(panel, name="custom", group_size=group)
        else:
            tokenizer = RNATokenizer.from_file(panel, group_size=group)
        catalogue = StainCatalogue.load(config["catalogue"] or STAIN_CATALOGUE)
        config["text_dim"] = int(config["text_dim"] or text_encoder.hidden_size)
        transformer = MuPDTransformer(latent_channels=codec.latent_channels,
                                      text_dim=config["text_dim"], num_genes=tokenizer.n_genes,
                                      rna_group_size=tokenizer.group_size, **config["transformer"])
        return cls(transformer, codec, catalogue, tokenizer, text_encoder, config)

    def save_pretrained(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write the whole model folder (safetensors weights; the text encoder by reference).

        Written into a sibling temporary folder, fsync'd, then swapped in: a kill mid-write
        leaves the previous model whole; other entries of `folder` (checkpoints) are kept."""
        from .io.atomic import atomic_output

        folder = Path(folder)
        if (folder / INDEX_FILE).exists() and not overwrite:
            raise OutputExistsError(f"{folder} already holds a model; pass overwrite=True to replace it")
        with atomic_output(folder, overwrite=True, fsync=True, keep_others=True) as tmp:
            tmp.mkdir()
            self.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
            save_codec(self.codec, tmp / "codec")
            self.catalogue.save(tmp / "catalogue.json")
            self.rna_tokenizer.save(tmp / "rna_panel.json")
            config = dict(self.config, rna_panel="rna_panel.json", catalogue="catalogue.json",
                          codec={"folder": "codec"}, text_encoder=self.text_encoder.reference)
            index = {"_class_name": type(self).__name__, "format": FORMAT_VERSION,
                     "transformer": ["mupd.models.transformer", "MuPDTransformer"], "codec": "codec",
                     "text_encoder": self.text_encoder.reference, "catalogue": "catalogue.json",
                     "rna_panel": "rna_panel.json", "config": config}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, roots: Sequence[str | Path] = ()) -> "MuPDPipeline":
        """Load a model folder. Every file it refers to (text encoder, codec, files named in
        model_index.json, symlinks) must lie inside it or inside one of `roots` (a server's
        model roots) and hold safetensors weights; a broken file is a ModelError naming it."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelError(f"model folder {folder} does not exist")
        _refuse_pickles(folder)
        needed = [INDEX_FILE, "transformer/config.json",
                  "transformer/diffusion_pytorch_model.safetensors", "codec/codec.json",
                  "catalogue.json", "rna_panel.json"]
        missing = [n for n in needed if not (folder / n).is_file()]
        if missing:
            raise ModelError(f"{folder} is not a complete MuPD model folder: missing {', '.join(missing)}")
        with _loading(folder / INDEX_FILE):
            index = json.loads((folder / INDEX_FILE).read_text())
            if index.get("_class_name") != cls.__name__:
                raise ModelError(f"{folder / INDEX_FILE} describes a {index.get('_class_name')!r}, "
                                 f"not a {cls.__name__}")
            config, reference = dict(index["config"]), str(index["text_encoder"])
            encoder = _check_references(folder, index, [Path(r) for r in roots])
        with _loading(folder / "transformer"):
            transformer = MuPDTransformer.from_pretrained(folder / "transformer", use_safetensors=True,
                                                          local_files_only=True)
        with _loading(folder / "rna_panel.json"):
            tokenizer = RNATokenizer.from_file(folder / "rna_panel.json")
        with _loading(folder / "codec"):
            codec = load_codec(folder / "codec")
        with _loading(folder / INDEX_FILE):  # a config key missing or of the wrong kind
            text_encoder = TextEncoder(reference, int(config.get("text_max_length", 64)), folder=encoder)
            pipeline = cls(transformer.eval(), codec, StainCatalogue.load(folder / "catalogue.json"),
                           tokenizer, text_encoder, config)
            if not pipeline.mpp > 0:  # read lazily later: a missing or bad mpp fails here
                raise ModelError(f"{folder / INDEX_FILE}: config mpp {pipeline.mpp} must be positive")
        return pipeline

    # -- conditions -----------------------------------------------------------------------
    def _stain_ids(self, stains: Sequence[str]) -> torch.Tensor:
        ids = [self.catalogue.index(s) for s in stains]
        limit = self.transformer.config.max_stains
        if max(ids) >= limit:
            raise ModelError(f"stain {stains[ids.index(max(ids))]!r} has id {max(ids)} but this model "
                             f"has room for {limit} stain tokens")
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def _check_tiles(self, images: Any, what: str) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        T = self.tile_size
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ConditionError(f"{what} must be RGB tiles (N, {T}, {T}, 3); got shape {images.shape}")
        if images.shape[1:3] != (T, T):
            raise ConditionError(f"{what} are {images.shape[1]}x{images.shape[2]} px; this model "
                                 f"works on {T}x{T} px tiles at {self.mpp} um/px (resample first)")
        if images.dtype != np.uint8:
            raise ConditionError(f"{what} must be uint8 RGB; got {images.dtype}")
        return images

    def _to_unit(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.codec.encode(images.float())

    def _text(self, texts: Optional[Sequence[Optional[str]]]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        if texts is None:
            return None
        return self.text_encoder.encode(list(texts), device=self.device)

    @staticmethod
    def _model_kwargs(cond: dict[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"stain": cond["stain"], "source": cond.get("source")}
        if cond.get("source_present") is not None:
            kwargs["source_present"] = cond["source_present"]
        if cond.get("text") is not None:
            kwargs["text"], kwargs["text_mask"] = cond["text"]
        if cond.get("rna") is not None:
            kwargs["rna_values"], kwargs["rna_mask"] = cond["rna"]
        if cond.get("reference") is not None:
            kwargs["reference"], kwargs["reference_present"] = cond["reference"]
        return kwargs

    # -- training -------------------------------------------------------------------------
    #: `training_loss` takes latents cached once before training (mupd.train.latents) in place
    #: of "target" / "source" pixels: "target_latents" / "source_latents".
    LATENT_BATCHES = True

    def _training_latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """The clean latents x0 of a batch: cached ones as given, else the target pixels encoded
        (marker maps through the marker codec, when the model has one)."""
        n = len(batch["target_latents"] if batch.get("target_latents") is not None else batch["target"])
        if len(batch["stain"]) != n:
            raise ConditionError(f"{len(batch['stain'])} stain names for {n} targets")
        if batch.get("target_latents") is not None:
            x0 = batch["target_latents"].to(self.device).float()
            lat = self.tile_size // self.codec.downsample
            if x0.ndim != 4 or x0.shape[1:] != (self.codec.latent_channels, lat, lat):
                raise ConditionError(f"cached training latents of shape {tuple(x0.shape)}; expected "
                                     f"(B, {self.codec.latent_channels}, {lat}, {lat}): was the cache "
                                     "built with another codec or tile size?")
            return x0
        target = batch["target"].to(self.device)
        if target.ndim != 4 or target.shape[1] != 3 or target.shape[2:] != (self.tile_size,) * 2:
            raise ConditionError(f"training target of shape {tuple(target.shape)}; expected "
                                 f"(B, 3, {self.tile_size}, {self.tile_size})")
        is_marker = [self.catalogue.get(s).kind == "marker" for s in batch["stain"]]
        return encode_targets(self.codec, self.marker_codec, target.float(), is_marker)

    def training_loss(self, batch: dict[str, Any], model: Optional[torch.nn.Module] = None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Flow-matching loss of one batch (see the module doc for the batch layout).

        batch: "target" (B, 3, H, W) in [-1, 1] or "target_latents" (cached); "stain" list[str];
        optional "source" (B, 3, H, W) or "source_latents", + optional "source_present" (B,) bool
        (a batch mixing tasks);
        "text" list[str | None]; "rna_values" (B, G) + "rna_mask" (B, G) bool;
        "reference" (B, 3, H, W) + optional "reference_present" (B,) bool;
        optional "target_valid" (B, 1, H, W) in [0, 1]: where the target counts in the loss."""
        model = model if model is not None else self.transformer
        device = self.device
        x0 = self._training_latents(batch)
        b = x0.shape[0]
        weight = None
        if batch.get("target_valid") is not None:
            # A latent cell weighs the fraction of its pixels that were measured: the values a
            # marker map interpolates between spot footprints are not a training signal.
            weight = F.avg_pool2d(batch["target_valid"].to(device).float(), self.codec.downsample)
            if weight.shape[0] != b or weight.shape[-2:] != x0.shape[-2:]:
                raise ConditionError(f"target mask of shape {tuple(batch['target_valid'].shape)} "
                                     f"does not match targets of latent shape {tuple(x0.shape)}")
        gen_device = generator.device if generator is not None else device

        def draw(shape: tuple[int, ...], normal: bool) -> torch.Tensor:
            fn = torch.randn if normal else torch.rand
            return fn(shape, generator=generator, device=gen_device).to(device)

        noise = draw(tuple(x0.shape), True)
        t = torch.sigmoid(draw((b,), True))
        keep = {m: draw((b,), False) >= self.config["dropout"].get(m, 0.0) for m in MODALITIES}
        cond: dict[str, Any] = {"stain": self._stain_ids(batch["stain"])}
        if batch.get("source_latents") is not None:
            cond["source"] = batch["source_latents"].to(device).float()
        elif batch.get("source") is not None:
            cond["source"] = self._encode(batch["source"].to(device))
        if "source" in cond:
            if batch.get("source_present") is not None:
                cond["source_present"] = batch["source_present"].to(device).bool()
        text = self._text(batch.get("text"))
        if text is not None:
            cond["text"] = (text[0], text[1] & keep["text"][:, None])
        if batch.get("rna_values") is not None:
            mask = batch["rna_mask"].to(device).bool() & keep["rna"][:, None]
            cond["rna"] = (batch["rna_values"].to(device).float(), mask)
        if batch.get("reference") is not None:
            present = batch.get("reference_present")
            present = keep["reference"] if present is None else present.to(device).bool() & keep["reference"]
            cond["reference"] = (self._encode(batch["reference"].to(device)), present)
        readout = float(self.config.get("readout_fraction", READOUT_FRACTION))
        if cond.get("source") is not None and readout > 0:  # train the one-step readout
            translating = cond.get("source_present", torch.ones(b, dtype=torch.bool, device=device))
            t = torch.where(translating & (draw((b,), False) < readout), torch.ones_like(t), t)
        tt = t[:, None, None, None]
        xt = (1 - tt) * x0 + tt * noise
        pred = self._as_velocity(model(xt, t, **self._model_kwargs(cond)), xt, t)
        error = (pred.float() - (noise - x0).float()) ** 2
        if weight is None:
            return error.mean()
        return (error * weight).sum() / (weight.sum() * error.shape[1]).clamp_min(1e-8)

    # -- sampling -------------------------------------------------------------------------
    def _check_guidance(self, guidance: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        if guidance is None:
            return None
        unknown = [k for k in guidance if k not in (*MODALITIES, SOURCE)]
        if unknown:
            raise ConditionError(f"guidance for unknown modality {', '.join(map(repr, unknown))}; "
                                 f"known: {', '.join((*MODALITIES, SOURCE))}")
        bad = [k for k, w in guidance.items() if not math.isfinite(float(w))]
        if bad:
            raise ConditionError(f"guidance scale for {', '.join(bad)} is not a finite number")
        return {k: float(w) for k, w in guidance.items()}

    def _velocity(self, x: torch.Tensor, t: float, cond: dict[str, Any],
                  guidance: Optional[dict[str, float]]) -> torch.Tensor:
        if guidance and SOURCE in guidance and cond.get("source") is not None:
            # image guidance on the source H&E: v = v(source hidden) + w (v(source) - v(source hidden))
            w, rest = guidance[SOURCE], {k: v for k, v in guidance.items() if k != SOURCE} or None
            v_on = self._velocity(x, t, cond, rest)
            if w == 1.0:
                return v_on
            hidden = {**cond, "source_present": torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)}
            v_off = self._velocity(x, t, hidden, rest)
            return v_off + w * (v_on - v_off)
        present = [m for m in MODALITIES if cond.get(m) is not None]
        b = x.shape[0]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda")
        if guidance is None or not present:
            tb = torch.full((b,), t, device=x.device)
            with autocast:
                v = self.transformer(x, tb, **self._model_kwargs(cond))
            return self._as_velocity(v.float(), x, tb)
        passes = [None, *present]  # unconditional, then each modality alone
        k = len(passes)
        batched: dict[str, Any] = {"stain": cond["stain"].repeat(k)}
        if cond.get("source") is not None:
            batched["source"] = cond["source"].repeat(k, 1, 1, 1)
        for m in present:
            data, mask = cond[m]
            on = torch.tensor([p == m for p in passes], device=x.device).repeat_interleave(b)
            batched[m] = (data.repeat(k, *([1] * (data.ndim - 1))),
                          mask.repeat(k, *([1] * (mask.ndim - 1))) & on.view(-1, *([1] * (mask.ndim - 1))))
        xk, tk = x.repeat(k, 1, 1, 1), torch.full((k * b,), t, device=x.device)
        with autocast:
            v = self.transformer(xk, tk, **self._model_kwargs(batched)).float()
        v = self._as_velocity(v, xk, tk).view(k, b, *v.shape[1:])
        return v[0] + sum(guidance.get(m, 1.0) * (v[i + 1] - v[0]) for i, m in enumerate(present))

    def _timesteps(self, steps: int, start: float = 1.0) -> list[float]:
        """`steps` + 1 noise levels from `start` down to 0 on the model's shifted schedule."""
        shift = float(self.config.get("time_shift", 1.0))
        u0 = start / (shift - (shift - 1) * start)  # the unshifted level whose shift is `start`
        ts = np.linspace(u0, 0.0, steps + 1)
        return (shift * ts / (1 + (shift - 1) * ts)).tolist()

    @torch.no_grad()
    def _sample(self, noise: torch.Tensor, cond: dict[str, Any], steps: int,
                guidance: Optional[dict[str, float]], sampler: str,
                progress: Optional[ProgressCallback], cancel: Optional[CancelToken],
                done: int, total: int, start: float = 1.0) -> torch.Tensor:
        """Integrate from noise level `start` (1: pure noise; below it `noise` is a noised image)."""
        ts = self._timesteps(steps, start)
        x = noise
        for i in range(steps):
            if cancel is not None:
                cancel.raise_if_cancelled()
            t, t_next = ts[i], ts[i + 1]
            v = self._velocity(x, t, cond, guidance)
            if sampler == "heun" and t_next > 0:
                v_next = self._velocity(x + (t_next - t) * v, t_next, cond, guidance)
                v = (v + v_next) / 2
            x = x + (t_next - t) * v
            if progress is not None:
                progress(ProgressEvent("sample", done + i + 1, total, f"step {i + 1}/{steps}"))
        return x

    def _decode(self, latents: torch.Tensor, kind: str) -> np.ndarray:
        codec = self.marker_codec if kind == "marker" and self.marker_codec is not None else self.codec
        with torch.no_grad():
            images = codec.decode(latents).float().clamp(-1, 1)
        if kind == "marker":
            return ((images.mean(dim=1) + 1) / 2).cpu().numpy().astype(np.float32)
        return ((images + 1) * 127.5).round().permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)

    @property
    def latent_step(self) -> int:
        """Image pixels per latent pixel: tiles placed on multiples of it can share one noise field."""
        return int(self.codec.downsample)

    def _noise(self, n: int, seed: int,
               positions: Optional[Sequence[tuple[int, int]]] = None) -> torch.Tensor:
        """Noise drawn on the CPU from `seed`: the same images on every device and batch size.

        With `positions` (each tile's (y, x) origin in image pixels of one shared frame) the
        noise of a tile is its window of one noise field over that frame, so tiles that overlap
        start from the same noise where they overlap; the field is drawn in tile-sized blocks
        keyed by (seed, block row, block column), so any tile is cut out without the whole field.
        """
        lat = self.tile_size // self.codec.downsample
        if positions is None:
            gen = torch.Generator().manual_seed(int(seed))
            return torch.randn((n, self.codec.latent_channels, lat, lat), generator=gen)
        if len(positions) != n:
            raise ConditionError(f"{len(positions)} tile positions given for {n} tiles")
        if seed < 0:
            raise ConditionError(f"seed must be >= 0 for positioned tiles (got {seed})")
        step = self.latent_step
        tiles = []
        for y, x in positions:
            if y % step or x % step or y < 0 or x < 0:
                raise ConditionError(f"tile position ({y}, {x}) px is not a non-negative multiple of "
                                     f"the model's latent step {step} px")
            tiles.append(_field_window(int(seed), y // step, x // step, lat, self.codec.latent_channels))
        return torch.from_numpy(np.stack(tiles))

    def _check_run(self, steps: int, sampler: str, batch_size: int) -> None:
        if steps < 1:
            raise ConditionError(f"steps must be at least 1 (got {steps})")
        if sampler not in SAMPLERS:
            raise ConditionError(f"sampler {sampler!r} unknown; use {' or '.join(SAMPLERS)}")
        if batch_size < 1:
            raise ConditionError(f"batch size must be at least 1 (got {batch_size})")

    def generate(self, text: Optional[str | Sequence[Optional[str]]] = None, rna: Any = None,
                 reference: Optional[np.ndarray] = None, stain: str = "H&E", num_images: int = 1,
                 steps: int = 20, guidance: Optional[dict[str, float]] = None, seed: int = 0,
                 sampler: str = "euler", rna_normalized: bool = False, batch_size: int = 8,
                 progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None) -> np.ndarray:
        """(N, T, T, 3) uint8 for an RGB stain, (N, T, T) float32 in [0, 1] for a marker.

        text: one prompt for all images or one per image; rna: one profile (dict, CSV/TSV path,
        one-row AnnData; raw counts unless `rna_normalized`); reference: one (T, T, 3) uint8 tile."""
        self._check_run(steps, sampler, batch_size)
        if num_images < 1:
            raise ConditionError(f"num_images must be at least 1 (got {num_images})")
        guidance = self._check_guidance(guidance)
        target = self.catalogue.get(stain)
        texts = [text] * num_images if isinstance(text, str) or text is None else list(text)
        if len(texts) != num_images:
            raise ConditionError(f"{len(texts)} prompts for {num_images} images")
        text_tokens = self._text(texts) if any(texts) else None
        rna_tokens = None
        if rna is not None:
            values, mask, _, _ = self.rna_tokenizer.align(rna, normalized=rna_normalized)
            rna_tokens = (torch.from_numpy(values).to(self.device)[None],
                          torch.from_numpy(mask).to(self.device)[None])
        ref_latents = None
        if reference is not None:
            ref_latents = self._encode(self._to_unit(self._check_tiles(reference, "reference tile")[:1]))
        noise = self._noise(num_images, seed)
        out = []
        for start in range(0, num_images, batch_size):
            n = min(batch_size, num_images - start)
            cond: dict[str, Any] = {"stain": self._stain_ids([target.name] * n)}
            if text_tokens is not None:
                cond["text"] = (text_tokens[0][start:start + n], text_tokens[1][start:start + n])
            if rna_tokens is not None:
                cond["rna"] = (rna_tokens[0].expand(n, -1), rna_tokens[1].expand(n, -1))
            if ref_latents is not None:
                cond["reference"] = (ref_latents.expand(n, -1, -1, -1),
                                     torch.ones(n, dtype=torch.bool, device=self.device))
            x = self._sample(noise[start:start + n].to(self.device), cond, steps, guidance, sampler,
                             progress, cancel, done=start // batch_size * steps,
                             total=-(-num_images // batch_size) * steps)
            out.append(self._decode(x, target.kind))
        return np.concatenate(out)

    def translate(self, images: np.ndarray, stains: Sequence[str], steps: int = 1,
                  guidance: Optional[dict[str, float]] = None, seed: int = 0, batch_size: int = 8,
                  sampler: str = "euler", progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None,
                  positions: Optional[Sequence[tuple[int, int]]] = None,
                  strength: Optional[float] = None, prompt: Optional[str] = None,
                  ) -> dict[str, np.ndarray]:
        """H&E tiles (N, T, T, 3) uint8 -> {stain as given: (N, T, T, 3) uint8 for an RGB stain,
        (N, T, T) float32 in [0, 1] for a marker}. steps=1 is the one-step readout.

        `positions`: each tile's (y, x) origin in pixels of one shared frame (multiples of
        `latent_step`); overlapping tiles then share their starting noise, so their predictions
        agree where they overlap (the output is dominated by that noise for a weak model).

        `strength` (RGB targets; SDEdit): the source latents are noised to t = strength and
        denoised under the target stain and `prompt` (default `RESTAIN_PROMPT`), so a frozen
        section keeps its structure and takes the look of the prompt; 0 returns the source
        through the codec, 1 ignores it."""
        self._check_run(steps, sampler, batch_size)
        guidance = self._check_guidance(guidance)
        tiles = self._check_tiles(images, "H&E tiles")
        if isinstance(stains, str):
            stains = [stains]
        targets = {s: self.catalogue.get(s) for s in stains}
        if not targets:
            raise ConditionError("no target stain given: name at least one stain or marker")
        if strength is not None:
            strength = check_image_to_image(list(targets.values()), strength)
        text = self._text([prompt or RESTAIN_PROMPT] * len(tiles)) if strength is not None else None
        noise = self._noise(len(tiles), seed, positions)
        chunks = -(-len(tiles) // batch_size)
        out: dict[str, list[np.ndarray]] = {s: [] for s in targets}
        for c, start in enumerate(range(0, len(tiles), batch_size)):
            source = self._encode(self._to_unit(tiles[start:start + batch_size]))
            n = source.shape[0]
            for j, (name, target) in enumerate(targets.items()):
                cond: dict[str, Any] = {"stain": self._stain_ids([target.name] * n)}
                x, level = noise[start:start + n].to(self.device), 1.0
                if strength is None:
                    cond["source"] = source
                else:  # SDEdit: start from the source itself, noised to t = strength
                    cond["text"] = (text[0][start:start + n], text[1][start:start + n])
                    x, level = (1 - strength) * source + strength * x, strength
                done = (c * len(targets) + j) * steps
                if level > 0:
                    x = self._sample(x, cond, steps, guidance, sampler, progress, cancel, done,
                                     chunks * len(targets) * steps, start=level)
                out[name].append(self._decode(x, target.kind))
        return {name: np.concatenate(parts) for name, parts in out.items()}


def check_image_to_image(targets: Sequence[Any], strength: float) -> float:
    """The strength of an image-to-image run over these catalogue targets, or a clear error."""
    value = float(strength)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ConditionError(f"strength must be between 0 and 1 (got {strength})")
    markers = [t.name for t in targets if t.kind != "rgb"]
    if markers:
        raise ConditionError(f"strength (image-to-image) applies to RGB stains; {', '.join(markers)} "
                             "are marker maps, read from the H&E in one step: leave strength unset")
    return value


def _field_window(seed: int, y: int, x: int, size: int, channels: int) -> np.ndarray:
    """The (channels, size, size) window at latent (y, x) of a standard-normal field made of
    size x size blocks, block (by, bx) drawn from the seed sequence (seed, by, bx)."""
    out = np.empty((channels, size, size), dtype=np.float32)
    for by in range(y // size, (y + size - 1) // size + 1):
        for bx in range(x // size, (x + size - 1) // size + 1):
            block = np.random.default_rng([seed, by, bx]).standard_normal(
                (channels, size, size), dtype=np.float32)
            ya, xa = max(y, by * size), max(x, bx * size)
            yb, xb = min(y + size, (by + 1) * size), min(x + size, (bx + 1) * size)
            out[:, ya - y : yb - y, xa - x : xb - x] = block[:, ya - by * size : yb - by * size,
                                                             xa - bx * size : xb - bx * size]
    return out
