"""Does a wider field of view around each spot (context) carry marker information beyond the
128 um tile the model sees today? Ridge proxy, leave one patient-C section out (HER2ST patient C
only; patients A and B are never read), same structure as probe_area_targets.py.

Views (all 128 px tiles from `spot_tiles`, centred on the spot): 1.0 um/px (128 um, today),
2.0 um/px (256 um), 4.0 um/px (512 um), and 1.0 + 4.0 concatenated. Feature spaces: the 45
handcrafted features (`mupd.eval.features`) and ImageNet EfficientNet-Lite0 pooled features
(`mupd.eval.pretrained.EfficientNetLite0Features`, 128 px tiles resized to 224 px inside, as the
evaluation feeds it). Target: log1p(CPM) of the catalogue marker genes; scored by Pearson r on the
left-out section and partial r given log depth. Bar: hematoxylin density of view 1.
Spots: the tissue spots of view 1 (`is_tissue`), the same spots for every view.
Boxes past the image edge are filled black by `centred_tiles`; the script counts those spots.
Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_context.py [CACHE_DIR] [--hand-only]"""
import os, sys, time
os.environ.setdefault("OMP_NUM_THREADS", "1")
from pathlib import Path
import numpy as np
from mupd.data.spatial import her2st_spots, spot_tiles

from mupd.data.crops import image_size
from mupd.eval.features import features, FEATURE_NAMES
from mupd.eval.baselines import RidgeBaseline
from mupd.eval.metrics import pearson, partial_pearson
from patient_c import DATA, GENES, MARKERS, SECTIONS, depth_and_counts, tissue_spots

T0 = time.time()
args = [a for a in sys.argv[1:] if not a.startswith("--")]
HAND_ONLY = "--hand-only" in sys.argv
CACHE = Path(args[0] if args else "/tmp/ctx")
CACHE.mkdir(parents=True, exist_ok=True)
H = FEATURE_NAMES.index("hematoxylin_mean")
TILE = 128
MPPS = (1.0, 2.0, 4.0)
_cnn = None


def cnn():
    global _cnn
    if _cnn is None:
        import torch
        torch.set_num_threads(1)
        from mupd.eval.pretrained import EfficientNetLite0Features
        _cnn = EfficientNetLite0Features()
        print("CNN:", _cnn.name, flush=True)
    return _cnn


def base(sec):
    """Spots kept (tissue in view 1), depth, marker counts, and edge statistics per view."""
    cache = CACHE / f"{sec}_base.npz"
    if cache.exists():
        return dict(np.load(cache))
    table, sub, _ = tissue_spots(sec, TILE)
    ids = list(table.obs_names)
    depth, counts = depth_and_counts(sub, sec)
    info = table.uns["mupd"]
    W, Hh = image_size(Path(info["image_path"]))
    xy = sub.obs[["x_px", "y_px"]].to_numpy(float)
    edge = []  # spots whose box reaches past the image edge, per view (geometry)
    for mpp in MPPS:
        half = TILE * mpp / float(info["mpp"]) / 2
        out = (xy[:, 0] - half < 0) | (xy[:, 1] - half < 0) | (xy[:, 0] + half > W) | (xy[:, 1] + half > Hh)
        edge.append(int(out.sum()))
    d = dict(depth=depth, counts=counts, n_all=len(ids), spots=np.array(list(sub.obs_names)),
             section_mpp=float(info["mpp"]), image_wh=np.array([W, Hh]), edge=np.array(edge),
             masked_boxes=np.array(info.get("masked_boxes", []), dtype=float).reshape(-1, 4))
    np.savez(cache, **d)
    return d


def view(sec, mpp, kind, spots):
    """Cached (N, D) features of the kept spots at one mpp: kind 'hand' or 'cnn'."""
    cache = CACHE / f"{sec}_mpp{mpp:g}_{kind}.npz"
    if cache.exists():
        z = np.load(cache)
        assert list(z["spots"]) == list(spots)
        return dict(z)
    t = time.time()
    table = her2st_spots(DATA, sec)
    tiles = spot_tiles(table, TILE, mpp, list(spots))
    # black fill past the edge: count spots with a pure-black row/column on the tile border
    border_black = np.array([(tl[0] == 0).all(axis=-1).all() or (tl[-1] == 0).all(axis=-1).all()
                             or (tl[:, 0] == 0).all(axis=-1).all() or (tl[:, -1] == 0).all(axis=-1).all()
                             for tl in tiles])
    black_frac = (tiles == 0).all(axis=-1).mean(axis=(1, 2))
    f = features(tiles, mpp) if kind == "hand" else cnn()(tiles)
    d = dict(x=f, spots=np.asarray(spots), border_black=border_black, black_frac=black_frac)
    np.savez(cache, **d)
    print(f"  {sec} {mpp:g} um/px {kind}: {len(spots)} tiles in {time.time() - t:.0f} s", flush=True)
    return d


data = {}
print("== Sections (tissue spots of view 1; spots whose box passes the image edge, per view) ==")
for sec in SECTIONS:
    d = base(sec)
    depth, c = d["depth"], d["counts"]
    d["cpm"] = np.log1p(1e6 * c / np.maximum(depth, 1)[:, None])
    d["logdepth"] = np.log(np.maximum(depth, 1))
    data[sec] = d
    print(f"{sec}: mpp {float(d['section_mpp']):.4f}, image {d['image_wh'][0]}x{d['image_wh'][1]}, "
          f"{len(depth)}/{int(d['n_all'])} tissue spots, past edge at "
          + ", ".join(f"{m:g} um/px: {e}" for m, e in zip(MPPS, d["edge"])), flush=True)

KINDS = ["hand"] if HAND_ONLY else ["hand", "cnn"]
for kind in KINDS:
    print(f"\n== Features: {kind} ==", flush=True)
    for sec in SECTIONS:
        for mpp in MPPS:
            v = view(sec, mpp, kind, data[sec]["spots"])
            data[sec][(kind, mpp)] = v["x"]
            if kind == "hand":
                data[sec][("black", mpp)] = (v["border_black"], v["black_frac"])
    print(f"  ({time.time() - T0:.0f} s elapsed)", flush=True)

print("\n== Black fill (tiles with a pure-black border row/column; mean black-pixel fraction among them) ==")
for sec in SECTIONS:
    parts = []
    for mpp in MPPS:
        bb, bf = data[sec][("black", mpp)]
        parts.append(f"{mpp:g} um/px: {int(bb.sum())} ({bf[bb].mean() if bb.any() else 0:.3f})")
    print(f"{sec}: " + ", ".join(parts))
for sec in SECTIONS:
    data[sec]["dens"] = data[sec][("hand", 1.0)][:, H]


def X_of(d, kind, v):
    return {"1": lambda: d[(kind, 1.0)], "2": lambda: d[(kind, 2.0)], "3": lambda: d[(kind, 4.0)],
            "4": lambda: np.hstack([d[(kind, 1.0)], d[(kind, 4.0)]])}[v]()


VIEWS = {"1": "128um (1.0)", "2": "256um (2.0)", "3": "512um (4.0)", "4": "1.0+4.0"}
METHODS = [("density", None, None)] + [(f"{kind} {VIEWS[v]}", kind, v) for kind in KINDS for v in VIEWS]
print("\n== Leave-one-section-out, target log1p(CPM) of", ", ".join(GENES), "==", flush=True)
R = {m: [] for m, _, _ in METHODS}
P = {m: [] for m, _, _ in METHODS}
per_marker = {m: [] for m, _, _ in METHODS}
for held in SECTIONS:
    t = time.time()
    train = [s for s in SECTIONS if s != held]
    groups = np.concatenate([[s] * len(data[s]["depth"]) for s in train])
    Ytr = np.concatenate([data[s]["cpm"] for s in train])
    te = data[held]
    for name, kind, v in METHODS:
        if kind is None:
            pred = np.repeat(te["dens"][:, None], len(GENES), axis=1)
        else:
            Xtr = np.concatenate([X_of(data[s], kind, v) for s in train])
            pred = RidgeBaseline().fit(Xtr, Ytr, groups).predict(X_of(te, kind, v))
        rr = np.array([pearson(pred[:, j], te["cpm"][:, j]) for j in range(len(GENES))])
        pp = np.array([partial_pearson(pred[:, j], te["cpm"][:, j], te["logdepth"]) for j in range(len(GENES))])
        R[name].append(np.nanmean(rr)); P[name].append(np.nanmean(pp)); per_marker[name].append((rr, pp))
    print(f"  fold {held} done in {time.time() - t:.0f} s", flush=True)

w = max(len(m) for m, _, _ in METHODS) + 2
print("\n" + f"{'method':{w}}{'r mean±std':>15}{'partial mean±std':>18}  " + "".join(f"{'r '+s:>8}" for s in SECTIONS)
      + "  " + "".join(f"{'pr '+s:>8}" for s in SECTIONS))
for name, _, _ in METHODS:
    r, p = np.array(R[name]), np.array(P[name])
    print(f"{name:{w}}{r.mean():8.3f}±{r.std(ddof=1):.3f}{p.mean():11.3f}±{p.std(ddof=1):.3f}  "
          + "".join(f"{v:8.3f}" for v in r) + "  " + "".join(f"{v:8.3f}" for v in p))

print("\nPaired difference vs view 1 of the same feature space (per fold r; mean ± std):")
for kind in KINDS:
    ref = np.array(R[f"{kind} {VIEWS['1']}"]); pref = np.array(P[f"{kind} {VIEWS['1']}"])
    for v in ("2", "3", "4"):
        d = np.array(R[f"{kind} {VIEWS[v]}"]) - ref
        dp = np.array(P[f"{kind} {VIEWS[v]}"]) - pref
        print(f"{kind} {VIEWS[v]:12} dr {np.round(d, 3)} mean {d.mean():+.3f}±{d.std(ddof=1):.3f}; "
              f"d partial {np.round(dp, 3)} mean {dp.mean():+.3f}±{dp.std(ddof=1):.3f}")

print("\nPer marker, mean over 5 folds (r | partial r):")
print(f"{'marker':9}{'gene':7}" + "".join(f"{m:>{w}}" for m, _, _ in METHODS))
for j, (mk, g) in enumerate(MARKERS):
    print(f"{mk:9}{g:7}" + "".join(
        f"{np.nanmean([f[0][j] for f in per_marker[m]]):>{w - 8}.3f} |{np.nanmean([f[1][j] for f in per_marker[m]]):6.3f}"
        for m, _, _ in METHODS))
print(f"\ntotal {time.time() - T0:.0f} s")
