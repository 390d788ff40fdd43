"""Write a DICOM WSI from pixels with wsidicom's own writer (wsidicomizer needs Python >= 3.12).

Tiles are stored uncompressed (Explicit VR Little Endian), so a reader must give back exactly the
pixels written; wsidicom makes the lower levels (add_missing_levels). Test helper, not product code.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image as PILImage
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from wsidicom import ImageData, WsiDataset, WsiDicom, WsiInstance
from wsidicom.codec import Encoder
from wsidicom.geometry import Size, SizeMm
from wsidicom.metadata import (Equipment, Image, Label, OpticalPath, Patient, Pyramid, Series, Slide,
                               SlideSample, Study, WsiMetadata)
from wsidicom.metadata.image import ImageType
from wsidicom.metadata.schema.dicom.wsi import WsiMetadataDicomSchema
from wsidicom.source import Source

TILE = 256


class _ArrayImageData(ImageData):
    """One level held as a (H, W, C) array: C=3 RGB, or C monochrome planes, one per optical path."""

    def __init__(self, pixels: np.ndarray, mpp_um: float, paths: Sequence[str]) -> None:
        self._pixels, self._mpp, self._paths = pixels, mpp_um, list(paths)
        super().__init__(Encoder.create(ExplicitVRLittleEndian, self.bits, self.photometric_interpretation))

    transfer_syntax = property(lambda self: ExplicitVRLittleEndian)
    image_size = property(lambda self: Size(self._pixels.shape[1], self._pixels.shape[0]))
    tile_size = property(lambda self: Size(TILE, TILE))
    pixel_spacing = property(lambda self: SizeMm(self._mpp / 1000, self._mpp / 1000))
    imaged_size = property(lambda self: None)
    samples_per_pixel = property(lambda self: 3 if len(self._paths) == 1 else 1)
    photometric_interpretation = property(lambda self: "RGB" if len(self._paths) == 1 else "MONOCHROME2")
    bits = property(lambda self: 8)
    image_coordinate_system = property(lambda self: None)
    thread_safe = property(lambda self: True)
    lossy_compression = property(lambda self: None)
    transcoder = property(lambda self: None)
    optical_paths = property(lambda self: self._paths)

    def get_decoded_tile(self, tile_point, z, path, cache=True) -> np.ndarray:
        y, x = tile_point.y * TILE, tile_point.x * TILE
        block = self._pixels[y:y + TILE, x:x + TILE]
        if len(self._paths) > 1:
            block = block[..., self._paths.index(path)]
        out = np.full((TILE, TILE, *block.shape[2:]), 255, np.uint8)  # edge tiles padded with glass
        out[:block.shape[0], :block.shape[1]] = block
        return out

    def get_encoded_tile(self, tile, z, path) -> bytes:
        return self.encoder.encode(self.get_decoded_tile(tile, z, path))


class _ArraySource(Source):
    def __init__(self, pixels: np.ndarray, mpp_um: float, channel_names: Optional[Sequence[str]]) -> None:
        super().__init__()
        paths = list(channel_names) if channel_names else ["1"]
        optical = [OpticalPath(identifier=p, description=p if channel_names else None) for p in paths]
        meta = WsiMetadata(study=Study(uid=generate_uid()), series=Series(uid=generate_uid()), patient=Patient(),
                           equipment=Equipment(), frame_of_reference_uid=generate_uid(),
                           dimension_organization_uids=[generate_uid()],
                           slide=Slide(identifier="test slide",
                                       samples=[SlideSample(identifier="sample", uid=generate_uid())]),
                           pyramid=Pyramid(image=Image(), optical_paths=optical, uid=generate_uid()),
                           label=Label())
        self._base = WsiMetadataDicomSchema().dump(meta, ImageType.VOLUME)
        self._levels = [WsiInstance.create_instance(_ArrayImageData(pixels, mpp_um, paths), copy.deepcopy(self._base),
                                                    ImageType.VOLUME, 0)]

    # a fresh copy each time: wsidicom fills instance attributes into the dataset it is given
    base_dataset = property(lambda self: WsiDataset(copy.deepcopy(self._base)))
    level_instances = property(lambda self: self._levels)
    label_instances = property(lambda self: [])
    overview_instances = property(lambda self: [])
    thumbnail_instances = property(lambda self: [])
    annotation_instances = property(lambda self: [])

    def close(self) -> None:
        pass


def write_dicom_wsi(folder: Path, pixels: np.ndarray, mpp_um: float, label: Optional[np.ndarray] = None,
                    channel_names: Optional[Sequence[str]] = None) -> list[Path]:
    """A DICOM WSI of `pixels` (level 0) plus wsidicom's downsampled levels, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    with WsiDicom(_ArraySource(pixels, mpp_um, channel_names)) as wsi:
        files = wsi.save(folder, add_missing_levels=True, workers=1,
                         label=PILImage.fromarray(label) if label is not None else None)
    return [Path(str(f)) for f in files]
