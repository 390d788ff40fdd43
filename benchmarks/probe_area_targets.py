"""Would per-area marker targets (counts over the section's median depth, as an IHC measures
antigen per area) predict a left-out patient-C section's log1p(CPM) better than the per-spot CPM
targets the model trains on? Ridge on the handcrafted features as a cheap proxy, leave one C
section out (HER2ST patient C only; patients A and B are never read). Result of 2026-12-07:
benchmarks/results/area-targets/loso-C.txt (no gain in r, lower partial r given depth).
Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_area_targets.py [CACHE_DIR]"""
import os, sys
os.environ.setdefault("OMP_NUM_THREADS", "1")
from pathlib import Path
import numpy as np
from mupd.eval.features import features, FEATURE_NAMES
from mupd.eval.baselines import RidgeBaseline
from mupd.eval.metrics import pearson, partial_pearson
from patient_c import GENES, MARKERS, SECTIONS, depth_and_counts, tissue_spots

CACHE = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/area-targets")
CACHE.mkdir(parents=True, exist_ok=True)
H = FEATURE_NAMES.index("hematoxylin_mean")

def load(sec):
    cache = CACHE / f"{sec}.npz"
    if cache.exists():
        return dict(np.load(cache))
    table, sub, tiles = tissue_spots(sec)
    ids = list(table.obs_names)
    feats = features(tiles, 1.0)
    depth, counts = depth_and_counts(sub, sec)
    d = dict(features=feats, depth=depth, counts=counts, n_all=len(ids),
             spots=np.array(list(sub.obs_names)), section_mpp=table.uns["mupd"]["mpp"])
    np.savez(cache, **d)
    return d

data = {}
for sec in SECTIONS:
    d = load(sec)
    depth, c = d["depth"], d["counts"]
    med = np.median(depth)
    d["cpm"] = np.log1p(1e6 * c / np.maximum(depth, 1)[:, None])
    d["area"] = np.log1p(1e6 * c / med)
    d["dens"] = d["features"][:, H]
    d["logdepth"] = np.log(np.maximum(depth, 1))
    data[sec] = d
    print(f"{sec}: mpp {float(d['section_mpp']):.4f}, {len(depth)}/{int(d['n_all'])} tissue spots, "
          f"median depth {med:.0f}", flush=True)

print("\n== Within-section (no training) ==")
print(f"{'sec':4} {'r(dens,CPM)':>12} {'r(dens,area)':>13} {'r(logdepth,dens)':>17} "
      f"{'r(CPM,area)':>12} {'r(logdepth,CPM)':>16} {'r(logdepth,area)':>17}")
for sec, d in data.items():
    rc = np.nanmean([pearson(d["dens"], d["cpm"][:, j]) for j in range(len(GENES))])
    ra = np.nanmean([pearson(d["dens"], d["area"][:, j]) for j in range(len(GENES))])
    rca = np.nanmean([pearson(d["cpm"][:, j], d["area"][:, j]) for j in range(len(GENES))])
    rdc = np.nanmean([pearson(d["logdepth"], d["cpm"][:, j]) for j in range(len(GENES))])
    rda = np.nanmean([pearson(d["logdepth"], d["area"][:, j]) for j in range(len(GENES))])
    print(f"{sec:4} {rc:12.3f} {ra:13.3f} {pearson(d['logdepth'], d['dens']):17.3f} "
          f"{rca:12.3f} {rdc:16.3f} {rda:17.3f}")

print("\n== Leave-one-section-out (score vs CPM measurement of the left-out section) ==")
METHODS = ["density", "ridge-CPM", "ridge-area"]
rows, per_marker, alphas = [], {m: [] for m in METHODS}, {}
rows_area = []
for held in SECTIONS:
    train = [s for s in SECTIONS if s != held]
    Xtr = np.concatenate([data[s]["features"] for s in train])
    groups = np.concatenate([[s] * len(data[s]["depth"]) for s in train])
    te = data[held]
    preds = {"density": np.repeat(te["dens"][:, None], len(GENES), axis=1)}
    for name, key in (("ridge-CPM", "cpm"), ("ridge-area", "area")):
        Ytr = np.concatenate([data[s][key] for s in train])
        model = RidgeBaseline().fit(Xtr, Ytr, groups)
        preds[name] = model.predict(te["features"])
        alphas[(held, name)] = model.alphas_
    r, pr, ra_ = {}, {}, {}
    for m in METHODS:
        rr = np.array([pearson(preds[m][:, j], te["cpm"][:, j]) for j in range(len(GENES))])
        pp = np.array([partial_pearson(preds[m][:, j], te["cpm"][:, j], te["logdepth"])
                       for j in range(len(GENES))])
        aa = np.array([pearson(preds[m][:, j], te["area"][:, j]) for j in range(len(GENES))])
        r[m], pr[m], ra_[m] = np.nanmean(rr), np.nanmean(pp), np.nanmean(aa)
        per_marker[m].append((rr, pp))
    rows.append((held, r, pr))
    rows_area.append((held, ra_))

hdr = f"{'held':5}" + "".join(f"{'r '+m:>14}" for m in METHODS) + "".join(f"{'pr '+m:>15}" for m in METHODS)
print(hdr)
for held, r, pr in rows:
    print(f"{held:5}" + "".join(f"{r[m]:14.3f}" for m in METHODS) + "".join(f"{pr[m]:15.3f}" for m in METHODS))
R = np.array([[r[m] for m in METHODS] for _, r, _ in rows])
P = np.array([[pr[m] for m in METHODS] for _, _, pr in rows])
print(f"{'mean':5}" + "".join(f"{v:14.3f}" for v in R.mean(0)) + "".join(f"{v:15.3f}" for v in P.mean(0)))
print(f"{'std':5}" + "".join(f"{v:14.3f}" for v in R.std(0, ddof=1)) + "".join(f"{v:15.3f}" for v in P.std(0, ddof=1)))
d_r = R[:, 2] - R[:, 1]; d_p = P[:, 2] - P[:, 1]
print(f"ridge-area minus ridge-CPM per fold: r {np.round(d_r, 3)} (mean {d_r.mean():+.3f}); "
      f"partial {np.round(d_p, 3)} (mean {d_p.mean():+.3f})")

print("\nPer marker, mean over 5 folds (r vs CPM | partial r given log depth):")
print(f"{'marker':8}{'gene':7}" + "".join(f"{m:>12}" for m in METHODS) + "".join(f"{'pr '+m:>15}" for m in METHODS))
for j, (mk, g) in enumerate(MARKERS):
    vals = [np.nanmean([f[0][j] for f in per_marker[m]]) for m in METHODS]
    pvals = [np.nanmean([f[1][j] for f in per_marker[m]]) for m in METHODS]
    print(f"{mk:8}{g:7}" + "".join(f"{v:12.3f}" for v in vals) + "".join(f"{v:15.3f}" for v in pvals))

print("\n(extra) same LOSO predictions scored against the per-AREA measurement, mean r:")
A = np.array([[ra_[m] for m in METHODS] for _, ra_ in rows_area])
for (held, _), a in zip(rows_area, A):
    print(f"{held:5}" + "".join(f"{v:14.3f}" for v in a))
print(f"{'mean':5}" + "".join(f"{v:14.3f}" for v in A.mean(0)))
print("\nchosen alphas (median over markers):", {f"{k[0]}/{k[1]}": float(np.median(v)) for k, v in alphas.items()})
