"""`mupd train-vae` and the latent cache, on real H&E (two TCGA-style tiles of he_patches/misc_he).

One slide's tiles (patient P1) train the tiny VAE; the other slide's (P2) are held out, excluded
from training through the manifest, and only used to measure reconstruction.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mupd.cli import main
from mupd.errors import DataError, ModelError
from mupd.models.codec import VAECodec, build_codec, load_codec, save_codec, vae_config
from mupd.train.batches import Sample, collate
from mupd.train.vae import reconstruction_error

TILE = 32
IMAGES = {"P1": "tiatoolbox_TCGA-HE-7130-01Z-00-DX1.png", "P2": "tiatoolbox_target_image.png"}
STEPS = 40


def _tiles(path: Path, count: int) -> np.ndarray:
    from PIL import Image

    image = np.asarray(Image.open(path).convert("RGB"))[300:700, 300:700]
    found = [image[y:y + TILE, x:x + TILE] for y in range(0, 400 - TILE + 1, TILE)
             for x in range(0, 400 - TILE + 1, TILE)]
    return np.stack(found[:count])


@pytest.fixture(scope="module")
def he_store(shared_data, tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A patch store of 96 training tiles (P1) and 32 held-out tiles (P2); returns both sets."""
    from mupd.data.store import write_patch_store

    folder = shared_data / "he_patches" / "misc_he"
    train, held = _tiles(folder / IMAGES["P1"], 96), _tiles(folder / IMAGES["P2"], 32)
    n = len(train) + len(held)
    manifest = pd.DataFrame({"patient": ["P1"] * len(train) + ["P2"] * len(held),
                             "slide": ["P1-a"] * len(train) + ["P2-a"] * len(held),
                             "x": np.arange(n) * TILE, "y": 0, "mpp": 0.5, "tile_size": TILE,
                             "source": "misc_he"})
    store = tmp_path_factory.mktemp("vae") / "store"
    write_patch_store(store, np.concatenate([train, held]), manifest)
    return store, train, held


@pytest.fixture(scope="module")
def trained(he_store, tmp_path_factory) -> Path:
    """`mupd train-vae` for STEPS steps on P1 (P2 excluded); returns the run folder."""
    store, _, _ = he_store
    run = tmp_path_factory.mktemp("vae-run") / "run"
    torch.set_num_threads(1)
    assert main(["train-vae", "--store", str(store), "--out", str(run), "--config", "tiny",
                 "--steps", str(STEPS), "--batch-size", "8", "--lr", "1e-3", "--ema-decay", "0.9",
                 "--exclude-patients", "P2", "--checkpoint-every", "20"]) == 0
    return run


def test_training_lowers_held_out_reconstruction_error(he_store, trained):
    _, train_tiles, held = he_store
    torch.manual_seed(0)
    from diffusers import AutoencoderKL

    before = reconstruction_error(VAECodec(AutoencoderKL.from_config(vae_config("tiny"))), held)
    after = reconstruction_error(build_codec({"type": "vae", "path": str(trained / "vae")}), held)
    # Beyond the untrained VAE, and beyond painting every tile in the training set's mean colour.
    mean_colour = float(np.abs(held.astype(float) - train_tiles.reshape(-1, 3).mean(0)).mean())
    assert after < 0.7 * before and after < mean_colour, (before, after, mean_colour)
    info = json.loads((trained / "vae_train.json").read_text())
    assert info["steps"] == STEPS and info["exclude_patients"] == ["P2"]
    assert info["stores"] == [f"{he_store[0]}: 96 tiles of 128"]
    assert info["final_loss"] < info["first_loss"] and info["parameters"] == 2_702_087
    log = pd.read_csv(trained / "train_log.csv")
    assert log["step"].iloc[-1] == STEPS


def test_saved_vae_is_a_diffusers_folder_with_latent_statistics(he_store, trained):
    folder = trained / "vae"
    assert {p.name for p in folder.iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert not list(trained.glob(".tmp-*")) and not list(trained.glob(".old-*"))
    codec = build_codec({"type": "vae", "path": str(folder)})
    config = json.loads((folder / "config.json").read_text())
    assert codec.scale == pytest.approx(config["scaling_factor"]) and codec.scale != 1.0
    assert codec.shift == pytest.approx(config["shift_factor"]) and codec.shift != 0.0
    # The factors normalise the training tiles' latents: mean 0, std 1 (all 96 tiles < 512).
    x = collate([Sample(target=t, stain="H&E") for t in he_store[1]])["target"]
    z = codec.encode(x)
    assert abs(float(z.mean())) < 1e-3 and float(z.std()) == pytest.approx(1.0, abs=1e-3)
    assert codec.downsample == 4 and z.shape[1:] == (4, TILE // 4, TILE // 4)


def test_vae_codec_round_trip_and_refusals(he_store, trained, tmp_path):
    codec = build_codec({"type": "vae", "path": str(trained / "vae")})
    save_codec(codec, tmp_path / "codec")
    again = load_codec(tmp_path / "codec")
    x = collate([Sample(target=t, stain="H&E") for t in he_store[2][:4]])["target"]
    assert torch.equal(codec.encode(x), again.encode(x))
    assert (again.scale, again.shift) == (codec.scale, codec.shift)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((trained / "vae" / "config.json").read_text())
    torch.save(codec.vae.state_dict(), pickled / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelError, match="no .safetensors weights"):
        build_codec({"type": "vae", "path": str(pickled)})
    with pytest.raises(ModelError, match="unknown VAE config 'huge'"):
        vae_config("huge")


def test_train_vae_refuses_a_finished_run_and_an_empty_selection(he_store, trained):
    from mupd.errors import OutputExistsError
    from mupd.train.vae import train_vae

    with pytest.raises(OutputExistsError, match="pass --resume"):
        train_vae([str(he_store[0])], trained, "tiny")
    with pytest.raises(DataError, match="patients"):
        train_vae([str(he_store[0])], trained.parent / "other", "tiny", patients=["Z"])


class LatentStandIn:
    """Test double of a pipeline that trains on cached latents (LATENT_BATCHES)."""

    LATENT_BATCHES = True
    rna_tokenizer = None
    tile_size, mpp = TILE, 0.5

    def __init__(self, codec: VAECodec) -> None:
        torch.manual_seed(0)
        self.codec, self.transformer = codec, torch.nn.Conv2d(4, 4, 3, padding=1)
        self.encoded, self.batches = 0, []
        encode = codec.encode

        def counting(images: torch.Tensor) -> torch.Tensor:
            self.encoded += len(images)
            return encode(images)

        codec.encode = counting

    def to(self, device):
        self.transformer.to(device)
        return self

    def training_loss(self, batch, model=None, generator=None):
        self.batches.append(batch)
        x0 = batch["target_latents"]
        noise = torch.randn(x0.shape, generator=generator)
        return F.mse_loss(model(noise), x0)

    def save_pretrained(self, folder, overwrite=False):
        Path(folder).mkdir(parents=True, exist_ok=overwrite)


def test_latent_cache_is_built_once_and_rebuilt_for_another_vae(he_store, trained, tmp_path):
    from mupd.train.config import config_from_dict
    from mupd.train.run import train

    store, train_tiles, _ = he_store
    codec = build_codec({"type": "vae", "path": str(trained / "vae")})
    expected = codec.encode(collate([Sample(target=t, stain="H&E") for t in train_tiles[:2]])["target"])
    pipeline = LatentStandIn(codec)

    def run(steps: int, resume: bool) -> Path:
        config = config_from_dict({"output": str(tmp_path / "run"),
                                   "data": {"store": str(store), "conditions": [],
                                            "exclude_patients": ["P2"]},
                                   "optim": {"max_steps": steps, "batch_size": 4},
                                   "checkpoint": {"every": 2}, "log_every": 2})
        train(config, resume=resume, pipeline=pipeline, objective=pipeline)
        (folder,) = (tmp_path / "run" / "latents").iterdir()
        return folder

    first = run(2, resume=False)
    assert pipeline.encoded == 96  # every training tile once, none of held-out P2
    assert all("target" not in b and b["target_latents"].shape == (4, 4, 8, 8)
               for b in pipeline.batches)
    cached = np.memmap(first / "latents.f32", dtype=np.float32, mode="r", shape=(96, 4, 8, 8))
    np.testing.assert_allclose(cached[:2], expected.numpy(), atol=1e-5)
    assert run(4, resume=True) == first and pipeline.encoded == 96  # reused: no encode
    with torch.no_grad():
        codec.vae.decoder.conv_out.bias.add_(0.1)  # the decoder alone: latents are unchanged,
    second = run(6, resume=True)  # but the VAE is another one, so the cache is rebuilt
    assert second != first and not first.exists() and pipeline.encoded == 192


def test_collate_of_cached_latents_flags_absent_sources_and_refuses_mixing():
    z = np.arange(16, dtype=np.float32).reshape(1, 4, 2, 2)[0]
    translate = Sample(target=None, stain="HER2", name="a", latents={"target": z, "source": z + 1})
    generate = Sample(target=None, stain="H&E", name="b", latents={"target": z * 2})
    batch = collate([translate, generate])
    assert "target" not in batch and "source" not in batch
    assert torch.equal(batch["target_latents"][1], torch.from_numpy(z * 2))
    assert torch.equal(batch["source_latents"][0], torch.from_numpy(z + 1))
    assert not batch["source_latents"][1].any() and batch["source_present"].tolist() == [True, False]
    pixels = Sample(target=np.zeros((8, 8, 3), np.uint8), stain="H&E", name="c")
    with pytest.raises(DataError, match="mixes cached latents and pixels"):
        collate([generate, pixels])


def test_pipeline_loss_from_cached_latents_equals_the_loss_from_pixels(he_store, trained):
    """MuPDPipeline takes the cache's latents in place of pixels: same loss for the same draws."""
    from mupd.pipeline import MuPDPipeline
    from mupd.train.loss import FlowMatchingObjective

    _, train_tiles, _ = he_store
    pipe = MuPDPipeline.from_config_name("tiny", tile_size=TILE,
                                         codec={"type": "vae", "path": str(trained / "vae")})
    objective = FlowMatchingObjective(pipe)
    assert objective.LATENT_BATCHES
    samples = [Sample(target=t, stain="HER2" if i % 2 else "H&E", source=train_tiles[-1 - i] if i % 2 else None)
               for i, t in enumerate(train_tiles[:4])]
    pixels = collate(samples)
    with torch.no_grad():
        latents = {k: v for k, v in pixels.items() if k not in ("target", "source")}
        latents["target_latents"] = pipe.codec.encode(pixels["target"])
        latents["source_latents"] = pipe.codec.encode(pixels["source"])
        a = objective.training_loss(pixels, generator=torch.Generator().manual_seed(3))
        b = objective.training_loss(latents, generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(a) and torch.allclose(a, b, atol=1e-5)
    with pytest.raises(Exception, match="cached training latents of shape"):
        objective.training_loss({**latents, "target_latents": latents["target_latents"][:, :2]})


def test_crop_training_sees_seeded_random_windows_and_refuses_a_bad_crop(he_store, tmp_path):
    """`--crop`: each tile of a batch is cut to its own random window (seeded by the step's
    generator, so a resumed run repeats it); a crop the VAE cannot downsample is refused."""
    from diffusers import AutoencoderKL

    from mupd.train.vae import VAEObjective, train_vae

    _, train_tiles, _ = he_store
    objective = VAEObjective(AutoencoderKL.from_config(vae_config("tiny")), crop=16)
    seen: list[torch.Tensor] = []
    objective.module.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    batch = collate([Sample(target=t, stain="H&E") for t in train_tiles[:4]])
    for _ in range(2):
        objective.training_loss(batch, generator=torch.Generator().manual_seed(3))
    assert seen[0].shape == (4, 3, 16, 16)
    torch.testing.assert_close(seen[0], seen[1])
    windows = [(i, y, x) for i in range(4) for y in range(17) for x in range(17)
               if torch.equal(seen[0][i], batch["target"][i, :, y:y + 16, x:x + 16])]
    assert len(windows) >= 4 and len({(y, x) for _, y, x in windows}) > 1  # not one fixed window
    with pytest.raises(DataError, match="--crop 18 is not a multiple"):
        train_vae([str(he_store[0])], tmp_path / "run", "tiny", crop=18)


def test_bundled_vae_folder_loads_and_codes_real_he():
    """The bundled vae-tiny (trained on stores/he-all, which includes this CMU slide: a check
    of the committed artifact, not a held-out number; those are in its model card) loads as a
    codec, gives normalised latents and reconstructs far better than the tile's mean colour."""
    from mupd.data.tiling import read_tiles, tile_grid
    from mupd.io.samples import sample_slide_path
    from mupd.io.reader import open_slide
    from mupd.paths import RESOURCES

    codec = build_codec({"type": "vae", "path": str(RESOURCES / "models" / "vae-tiny")})
    assert (codec.downsample, codec.latent_channels) == (4, 4)
    slide = open_slide(sample_slide_path())
    _, tiles = read_tiles(slide, tile_grid(slide, 1.0, 128), limit=6)
    x = collate([Sample(target=t, stain="H&E") for t in tiles])["target"]
    z = codec.encode(x)
    assert z.shape == (len(tiles), 4, 32, 32) and abs(float(z.mean())) < 0.5 and 0.5 < float(z.std()) < 2
    floor = float((x - x.mean(dim=(2, 3), keepdim=True)).abs().mean()) * 127.5
    mae = reconstruction_error(codec, list(tiles))
    assert mae < floor / 2, (mae, floor)


def test_latent_cache_codes_marker_maps_through_the_model_marker_codec(tmp_path):
    """With `marker_codec: area` the cache holds exactly what the pipeline would encode: marker
    maps (the 2-D targets) by area mean, H&E through the VAE, and the marker codec is in the key."""
    from mupd.models.codec import AreaCodec
    from mupd.paths import RESOURCES
    from mupd.train.latents import LatentSamples, build_latent_cache

    codec = build_codec({"type": "vae", "path": str(RESOURCES / "models" / "vae-tiny")})
    markers = AreaCodec(codec.downsample, codec.latent_channels)
    rng = np.random.default_rng(0)
    he = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    level = np.full((32, 32), 0.2, np.float32)
    samples = [Sample(target=he, stain="H&E", name="t1"),
               Sample(target=level, stain="HER2", source=he, name="t1")]
    folder = build_latent_cache(samples, codec, tmp_path / "a", [tmp_path], {}, markers=markers)
    plain = build_latent_cache(samples, codec, tmp_path / "b", [tmp_path], {})
    assert folder.name != plain.name
    cached = LatentSamples(samples, folder)
    x = collate([Sample(target=he, stain="H&E")])["target"]
    torch.testing.assert_close(torch.from_numpy(cached[0].latents["target"]), codec.encode(x)[0],
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(cached[1].latents["source"], cached[0].latents["target"])
    np.testing.assert_allclose(cached[1].latents["target"], np.full((4, 8, 8), -0.6), atol=1e-6)
    assert np.ptp(LatentSamples(samples, plain)[1].latents["target"]) > 0  # VAE-coded: not flat
