"""MuPDPipeline: generate / translate contracts, its training objective, folders, and bad input."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import torch

from mupd.errors import CancelledError, ConditionError, ModelError, OutputExistsError
from mupd.models.attention import MODALITIES
from mupd.pipeline import MuPDPipeline
from mupd.progress import CancelToken
from mupd.train.loss import FlowMatchingObjective

T = 32
PROFILE = {"ERBB2": 40, "ESR1": 3, "ACTB": 900, "GAPDH": 300, "MKI67": 12, "OTHER": 200}


def randomize_zero_init(pipe: MuPDPipeline, seed: int = 0) -> MuPDPipeline:
    """Give the adaLN-Zero / zero-initialised layers random values, so that an untrained model's
    output depends on every input (a fresh one predicts exactly zero velocity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return pipe


def small_pipeline(seed: int = 0) -> MuPDPipeline:
    torch.manual_seed(seed)
    pipe = MuPDPipeline.from_config_name("tiny", tile_size=T, hidden_size=48, depth=2, num_heads=2,
                                         cond_dim=48)
    return randomize_zero_init(pipe, seed)


@pytest.fixture(scope="module")
def pipe() -> MuPDPipeline:
    return small_pipeline()


@pytest.fixture(scope="module")
def he_tiles() -> np.ndarray:
    from skimage.data import immunohistochemistry

    image = immunohistochemistry()  # real brightfield tissue, 512 x 512
    return np.stack([image[y:y + T, x:x + T] for y in (0, 200) for x in (0, 100, 300)])


def conditions(modalities, he_tiles) -> dict:
    return {"text": "dense tumour cells" if "text" in modalities else None,
            "rna": PROFILE if "rna" in modalities else None,
            "reference": he_tiles[0] if "reference" in modalities else None}


COMBINATIONS = [c for r in range(len(MODALITIES) + 1) for c in itertools.combinations(MODALITIES, r)]


# -- generate ------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::mupd.models.rna.MissingGenesWarning")
@pytest.mark.parametrize("modalities", COMBINATIONS, ids=lambda c: "+".join(c) or "none")
def test_generate_every_modality_combination(pipe, he_tiles, modalities):
    cond = conditions(modalities, he_tiles)
    plain = pipe.generate(**cond, num_images=2, steps=2, seed=1)
    assert plain.shape == (2, T, T, 3) and plain.dtype == np.uint8
    guided = pipe.generate(**cond, num_images=2, steps=2, seed=1,
                           guidance={m: 3.0 for m in modalities})
    assert guided.shape == plain.shape
    assert np.array_equal(guided, plain) == (not modalities)  # guidance acts on given modalities
    if modalities:
        assert not np.array_equal(plain, pipe.generate(num_images=2, steps=2, seed=1))


def test_marker_generation_is_one_map_in_unit_range(pipe):
    maps = pipe.generate(stain="ki-67", num_images=3, steps=2, text="proliferating tumour")
    assert maps.shape == (3, T, T) and maps.dtype == np.float32
    assert 0 <= maps.min() and maps.max() <= 1 and maps.std() > 0


def test_generation_is_seeded_and_independent_of_batching(pipe):
    a = pipe.generate(text="stroma", num_images=4, steps=3, seed=7)
    assert np.array_equal(a, pipe.generate(text="stroma", num_images=4, steps=3, seed=7))
    assert not np.array_equal(a, pipe.generate(text="stroma", num_images=4, steps=3, seed=8))
    one_by_one = pipe.generate(text="stroma", num_images=4, steps=3, seed=7, batch_size=1)
    assert np.abs(a.astype(int) - one_by_one.astype(int)).max() <= 1  # float rounding only
    heun = pipe.generate(text="stroma", num_images=4, steps=3, seed=7, sampler="heun")
    assert heun.shape == a.shape and not np.array_equal(heun, a)


@pytest.mark.filterwarnings("ignore::mupd.models.rna.MissingGenesWarning")
def test_guidance_is_the_documented_composition(pipe):
    """v = v_uncond + sum_m w_m (v_m - v_uncond): weight 0 is unconditional, weight 1 with a
    single modality is the plain conditional model, and two modalities compose."""
    kw = dict(num_images=2, steps=2, seed=3)
    uncond = pipe.generate(**kw).astype(int)
    text = pipe.generate(text="necrosis", **kw).astype(int)
    assert np.abs(pipe.generate(text="necrosis", guidance={"text": 0.0}, **kw) - uncond).max() <= 1
    assert np.abs(pipe.generate(text="necrosis", guidance={"text": 1.0}, **kw) - text).max() <= 1
    both = pipe.generate(text="necrosis", rna=PROFILE, guidance={"text": 1.0, "rna": 0.0}, **kw)
    assert np.abs(both - text).max() <= 1
    strong = pipe.generate(text="necrosis", rna=PROFILE, guidance={"text": 4.0, "rna": 2.0}, **kw)
    assert np.abs(strong.astype(int) - text).max() > 1


def test_progress_and_cancel(pipe):
    events = []
    pipe.generate(num_images=3, steps=2, batch_size=2, progress=events.append)
    assert [e.step for e in events] == [1, 2, 3, 4] and {e.total for e in events} == {4}
    token = CancelToken()
    token.cancel()
    with pytest.raises(CancelledError):
        pipe.generate(num_images=1, steps=2, cancel=token)


# -- translate -----------------------------------------------------------------------------
def test_translate_returns_each_stain_as_named(pipe, he_tiles):
    out = pipe.translate(he_tiles, ["her2", "H&E", "Ki67"], batch_size=4)
    assert list(out) == ["her2", "H&E", "Ki67"]
    assert out["her2"].shape == (len(he_tiles), T, T) and out["her2"].dtype == np.float32
    assert 0 <= out["her2"].min() and out["her2"].max() <= 1
    assert out["H&E"].shape == (len(he_tiles), T, T, 3) and out["H&E"].dtype == np.uint8
    assert not np.allclose(out["her2"], out["Ki67"])  # the stain token matters
    again = pipe.translate(he_tiles[:2], ["her2"], batch_size=1)["her2"]
    np.testing.assert_allclose(again, out["her2"][:2], atol=1e-5)  # same seed, any batching
    other = pipe.translate(he_tiles[::-1][:2].copy(), ["her2"])["her2"]
    assert not np.allclose(other, out["her2"][:2])  # the source matters
    multi = pipe.translate(he_tiles[:2], ["her2"], steps=3)["her2"]
    assert multi.shape == (2, T, T) and not np.allclose(multi, out["her2"][:2])


# -- training loss -------------------------------------------------------------------------
def batch(he_tiles, with_source=False, text=False, rna=False, reference=False, stains=None):
    x = torch.from_numpy(he_tiles[:4]).permute(0, 3, 1, 2).float() / 127.5 - 1
    b = {"target": x, "stain": stains or ["H&E", "HER2", "H&E", "Ki67"]}
    if with_source:
        b["source"] = x.flip(0)
    if text:
        b["text"] = ["tumour", None, "stroma", "fat"]
    if rna:
        b["rna_values"] = torch.rand(4, 64)
        b["rna_mask"] = torch.rand(4, 64) > 0.5
        b["rna_mask"][1] = False  # no RNA for sample 1
    if reference:
        b["reference"] = x.roll(1, 0)
    return b


@pytest.mark.parametrize("keys", [c for r in range(5) for c in
                                  itertools.combinations(("with_source", "text", "rna", "reference"), r)],
                         ids=lambda c: "+".join(c) or "target-only")
def test_training_loss_every_batch_layout(pipe, he_tiles, keys):
    b = batch(he_tiles, **{k: True for k in keys})
    pipe.transformer.zero_grad()
    loss = FlowMatchingObjective(pipe).training_loss(b, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = {n for n, p in pipe.transformer.named_parameters() if p.grad is not None and p.grad.any()}
    for key, module in (("text", "cross_kv.text"), ("rna", "rna_encoder"), ("reference", "reference_encoder")):
        assert any(module in n for n in grads) == (key in keys), module
    again = FlowMatchingObjective(pipe).training_loss(b, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loss.detach(), again.detach())  # noise, timesteps, dropout from the generator


def test_training_loss_refuses_mismatched_batches(pipe, he_tiles):
    b, objective = batch(he_tiles), FlowMatchingObjective(pipe)
    with pytest.raises(ConditionError, match=f"expected \\(B, 3, {T}, {T}\\)"):
        objective.training_loss(dict(b, target=b["target"][:, :, :16, :16]))
    with pytest.raises(ConditionError, match="3 stain names for 4 targets"):
        objective.training_loss(dict(b, stain=["H&E"] * 3))
    with pytest.raises(ConditionError, match="unknown stain 'XYZ'.*H&E"):
        objective.training_loss(dict(b, stain=["XYZ"] * 4))


# -- folders -------------------------------------------------------------------------------
def test_save_load_round_trip_gives_identical_outputs(tmp_path, he_tiles):
    pipe = small_pipeline(seed=5)
    pipe.catalogue.register("PanCK", kind="rgb")
    folder = pipe.save_pretrained(tmp_path / "model")
    assert {p.name for p in folder.iterdir()} == {"model_index.json", "transformer", "scheduler",
                                                  "codec", "catalogue.json", "rna_panel.json"}
    assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".ckpt", ".pth")]
    assert json.loads((folder / "model_index.json").read_text())["text_encoder"] == "default"
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 5e6  # no MiniLM copy
    loaded = MuPDPipeline.from_pretrained(folder)
    assert (loaded.tile_size, loaded.mpp) == (pipe.tile_size, pipe.mpp)
    assert loaded.catalogue.to_list() == pipe.catalogue.to_list()
    assert loaded.rna_tokenizer.genes == pipe.rna_tokenizer.genes
    kw = dict(text="tumour", num_images=2, steps=2, seed=4)
    assert np.array_equal(loaded.generate(**kw), pipe.generate(**kw))
    for stain in ("PanCK", "HER2"):
        np.testing.assert_array_equal(loaded.translate(he_tiles, [stain])[stain],
                                      pipe.translate(he_tiles, [stain])[stain])
    with pytest.raises(OutputExistsError, match="already holds a model"):
        pipe.save_pretrained(folder)
    pipe.save_pretrained(folder, overwrite=True)


def test_pickle_and_incomplete_folders_are_refused(tmp_path, pipe):
    pickled = tmp_path / "pickled"
    (pickled / "transformer").mkdir(parents=True)
    (pickled / "model_index.json").write_text("{}")
    (pickled / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelError, match="pickle checkpoints.*diffusion_pytorch_model.bin"):
        MuPDPipeline.from_pretrained(pickled)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(ModelError, match="not a complete MuPD model folder: missing model_index.json"):
        MuPDPipeline.from_pretrained(tmp_path / "notes")
    with pytest.raises(ModelError, match="does not exist"):
        MuPDPipeline.from_pretrained(tmp_path / "absent")
    folder = pipe.save_pretrained(tmp_path / "m")
    (folder / "catalogue.json").unlink()
    with pytest.raises(ModelError, match="missing catalogue.json"):
        MuPDPipeline.from_pretrained(folder)


def test_missing_text_encoder_directory_is_named(tmp_path, pipe):
    folder = pipe.save_pretrained(tmp_path / "m")
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder"] = str(tmp_path / "gone-encoder")
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="gone-encoder"):
        MuPDPipeline.from_pretrained(folder)


# -- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("tiles, message", [
    (np.zeros((2, 48, 48, 3), np.uint8), f"48x48 px; this model works on {T}x{T} px tiles"),
    (np.zeros((2, T, T, 4), np.uint8), r"RGB tiles \(N, 32, 32, 3\); got shape \(2, 32, 32, 4\)"),
    (np.zeros((2, T, T), np.uint8), "RGB tiles"),
    (np.zeros((2, T, T, 3), np.float32), "uint8"),
])
def test_bad_tiles_are_refused(pipe, tiles, message):
    with pytest.raises(ConditionError, match=message):
        pipe.translate(tiles, ["HER2"])


def test_bad_conditions_are_refused(pipe, he_tiles):
    with pytest.raises(ConditionError, match="unknown stain 'CD999'; this model knows: H&E, HER2"):
        pipe.translate(he_tiles, ["CD999"])
    with pytest.raises(ConditionError, match="unknown stain 'PAS'"):
        pipe.generate(stain="PAS")
    with pytest.raises(ConditionError, match="NaN.*ERBB2"):
        pipe.generate(rna={"ERBB2": float("nan"), "ACTB": 3})
    with pytest.raises(ConditionError, match="negative.*ESR1"):
        pipe.generate(rna={"ESR1": -1, "ACTB": 3})
    with pytest.raises(ConditionError, match="guidance for unknown modality 'image'"):
        pipe.generate(guidance={"image": 2.0})
    with pytest.raises(ConditionError, match="sampler 'ddim'"):
        pipe.generate(sampler="ddim")
    with pytest.raises(ConditionError, match="steps must be at least 1"):
        pipe.translate(he_tiles, ["HER2"], steps=0)
    with pytest.raises(ConditionError, match="reference tile are 48x48"):
        pipe.generate(reference=np.zeros((48, 48, 3), np.uint8))
    with pytest.raises(ConditionError, match="2 prompts for 3 images"):
        pipe.generate(text=["a", "b"], num_images=3)


def test_config_overrides_are_checked():
    with pytest.raises(ModelError, match="unknown model config key 'width'.*hidden_size"):
        MuPDPipeline.from_config_name("tiny", width=3)
    with pytest.raises(ModelError, match="unknown model config 'huge'"):
        MuPDPipeline.from_config_name("huge")
    with pytest.raises(ModelError, match="tile size 36 px is not a multiple of 8"):
        MuPDPipeline.from_config_name("tiny", tile_size=36)


# -- hardening: what a model folder may refer to, and saves that die midway -----------------
class _Unpickled:
    """Unpickling this creates `marker`: proof that a pickle ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickled_encoder(folder, marker):
    """A transformers-looking text encoder folder whose only weights are a pickle."""
    from mupd.models.text import default_encoder_dir

    folder.mkdir(parents=True)
    (folder / "config.json").write_text((default_encoder_dir() / "config.json").read_text())
    torch.save({"weight": _Unpickled(marker)}, folder / "pytorch_model.bin")
    return folder


def _point_text_encoder(model, reference):
    index = json.loads((model / "model_index.json").read_text())
    index["text_encoder"] = index["config"]["text_encoder"] = str(reference)
    (model / "model_index.json").write_text(json.dumps(index))


def test_a_model_folder_refers_only_to_safetensors_files_inside_it(tmp_path, pipe):
    marker = tmp_path / "pickle-ran"
    outside = _pickled_encoder(tmp_path / "elsewhere" / "encoder", marker)
    model = pipe.save_pretrained(tmp_path / "m")
    _point_text_encoder(model, outside)  # outside the model folder: refused by where it is
    with pytest.raises(ModelError, match=r"refers to .*elsewhere/encoder.*outside"):
        MuPDPipeline.from_pretrained(model)
    with pytest.raises(ModelError, match=r"no \.safetensors weights .*pytorch_model\.bin"):
        MuPDPipeline.from_pretrained(model, roots=[tmp_path / "elsewhere"])  # a root: by its weights
    _pickled_encoder(model / "encoder", marker)
    _point_text_encoder(model, "encoder")  # inside, relative to the model folder: by its weights
    with pytest.raises(ModelError, match=r"m/encoder has no \.safetensors .*pytorch_model\.bin"):
        MuPDPipeline.from_pretrained(model)
    assert not marker.exists()

    other = pipe.save_pretrained(tmp_path / "m2")
    spec = json.loads((other / "codec" / "codec.json").read_text())
    (other / "codec" / "codec.json").write_text(json.dumps({**spec, "type": "vae", "path": "../../vae"}))
    with pytest.raises(ModelError, match=r"refers to .*vae.*outside"):  # the codec's VAE
        MuPDPipeline.from_pretrained(other)
    (other / "codec" / "codec.json").write_text(json.dumps(spec))
    weights = other / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.rename(tmp_path / "weights.safetensors")
    weights.symlink_to(tmp_path / "weights.safetensors")  # a symlink leaving the folder
    with pytest.raises(ModelError, match=r"diffusion_pytorch_model\.safetensors.*outside"):
        MuPDPipeline.from_pretrained(other)
    assert MuPDPipeline.from_pretrained(other, roots=[tmp_path]).tile_size == pipe.tile_size


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsync'd files through /proc")
def test_a_save_that_dies_midway_leaves_the_old_model_whole(tmp_path, he_tiles, monkeypatch):
    import mupd.model_folder as model_folder

    old, new = small_pipeline(seed=1), small_pipeline(seed=2)
    folder = old.save_pretrained(tmp_path / "model")
    (folder / "run").mkdir()
    (folder / "run" / "step-10.safetensors").write_bytes(b"checkpoint")  # a fine-tune's, beside it
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def die(*args):
        raise RuntimeError("killed")  # after the transformer is written, before the codec

    monkeypatch.setattr(model_folder, "save_codec", die)
    with pytest.raises(RuntimeError, match="killed"):
        new.save_pretrained(folder, overwrite=True)
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left
    monkeypatch.undo()

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd)))
    new.save_pretrained(folder, overwrite=True)
    assert (folder / "run" / "step-10.safetensors").read_bytes() == b"checkpoint"  # kept
    assert any(s.endswith("transformer/diffusion_pytorch_model.safetensors") for s in synced)
    assert str(tmp_path) in synced  # the rename itself is flushed
    kw = dict(text="tumour", num_images=1, steps=2, seed=4)
    assert np.array_equal(MuPDPipeline.from_pretrained(folder).generate(**kw), new.generate(**kw))
