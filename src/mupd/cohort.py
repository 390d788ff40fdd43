"""Whole cohorts: `mupd stain` over a folder or a list of slides, resumable and sharded.

Each slide is translated whole by one process into OUT/<name>/: the folder a single-slide
`mupd stain SLIDE --out` writes, plus `summary.json` (its row of the cohort table), both
renamed into place together at the end (`write_translation`). A folder under its final name is
therefore a finished slide, and a rerun skips it; a slide that a killed run left half-written
(a temporary sibling named after its dead owner) is redone and the temporary removed.

Processes started by `accelerate launch` or `torchrun` take every N-th slide of the cohort's
sorted list (rank r: slides r, r + N, ...): the share follows from the inputs alone, whatever
the timing or what earlier runs finished, so no process talks to another until the end.

The table `cohort.csv` is a view rebuilt from the per-slide rows (and `.failed/<name>.json` for
slides that failed), written atomically by each process after each of its slides and, complete,
by rank 0 once every process has finished: whatever kills a run, the table is whole, and the
rerun brings it up to date.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from .errors import MuPDError, OutputExistsError, SlideError
from .io.atomic import atomic_write_text
from .io.omezarr import is_ome_zarr
from .io.plain_image import PLAIN_IMAGE_SUFFIXES
from .io.reader import TIFF_SUFFIXES
from .progress import ProgressCallback, ProgressEvent, no_progress

if TYPE_CHECKING:  # render pulls in scikit-image; cohort reads it only when staining
    from .render import IhcLook

#: In OUT: the settings a rerun must repeat, and the table of every slide.
SETTINGS, TABLE = "cohort.json", "cohort.csv"
#: In OUT/<name>/: the slide's row, written with its layers (its presence = finished).
SUMMARY = "summary.json"
#: In OUT: one row file per slide whose last try failed (retried by the next run).
FAILED = ".failed"
#: A slide list: one path a line (relative to the list's folder), `#` comments.
LIST_SUFFIX = ".txt"
SLIDE_SUFFIXES = frozenset(TIFF_SUFFIXES | PLAIN_IMAGE_SUFFIXES)
#: The table's columns before the per-marker means (`mean_<marker>`), and after them.
COLUMNS = ["slide", "output", "status", "tiles", "tissue_tiles", "seconds", "region", "mpp"]
LAST_COLUMNS = ["reason"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class CohortSlide:
    path: Path
    name: str  # its output folder under OUT


@dataclass(frozen=True)
class CohortSettings:
    """What every slide of one OUT must share: a rerun with other values is refused."""

    stains: list[str]  # catalogue names ("ki-67" -> "Ki67"), so spellings do not matter
    markers: list[str]  # the stains that are markers: one `mean_<marker>` column each
    steps: int
    seed: int
    render_brightfield: bool
    ome_tiff: bool
    model: str  # the model folder, resolved
    stain_norm: Optional[str] = None  # mupd.stain_norm method, per slide
    strength: Optional[float] = None  # image-to-image for RGB stains
    prompt: Optional[str] = None
    ihc_look: Optional[dict[str, float]] = None  # mupd.render.IhcLook.to_dict

    @classmethod
    def of(cls, pipeline: Any, model: str | Path, stains: Sequence[str], steps: int = 1,
           seed: int = 0, render_brightfield: bool = True,
           ome_tiff: bool = False, stain_norm: Optional[str] = None,
           strength: Optional[float] = None, prompt: Optional[str] = None,
           ihc_look: Optional["IhcLook"] = None) -> "CohortSettings":
        from .pipeline import check_image_to_image
        from .stain_norm import check_method

        targets = [pipeline.catalogue.get(s) for s in stains]  # an unknown stain: a clear error
        if strength is not None:  # refused before any slide is read
            strength = check_image_to_image(targets, strength)
        return cls([t.name for t in targets], [t.name for t in targets if t.kind == "marker"],
                   int(steps), int(seed), bool(render_brightfield), bool(ome_tiff),
                   str(Path(model).resolve()), check_method(stain_norm), strength, prompt,
                   None if ihc_look is None else ihc_look.to_dict())


def is_cohort(inputs: Sequence[str]) -> bool:
    """Several inputs, a folder that is no OME-Zarr image, or a `.txt` list: a cohort run."""
    if len(inputs) != 1:
        return True
    path = Path(inputs[0]).expanduser()
    return path.suffix.lower() == LIST_SUFFIX or (path.is_dir() and not is_ome_zarr(path))


def output_name(path: Path) -> str:
    """A slide's output folder: its file name less the format's suffixes (`a.ome.tif` -> `a`)."""
    lower = path.name.lower()
    for suffix in (".ome.zarr", ".ome.tiff", ".ome.tif", ".zarr"):
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _is_slide(path: Path) -> bool:
    return is_ome_zarr(path) if path.is_dir() else path.suffix.lower() in SLIDE_SUFFIXES


def _supported() -> str:
    return " ".join(sorted(SLIDE_SUFFIXES)) + " files and OME-Zarr folders"


def _named(path: Path, where: str) -> Path:
    """A slide named explicitly (command line, list line): it must be one."""
    if not path.exists():
        raise SlideError(f"slide {path} ({where}) does not exist")
    if not _is_slide(path):
        raise SlideError(f"{path} ({where}) is not a slide; supported: {_supported()} (or a "
                         f"folder of them, or a {LIST_SUFFIX} list)")
    return path


def _in_folder(folder: Path, log: Log) -> list[Path]:
    """The slides directly in `folder` (subfolders other than OME-Zarr are not searched); other
    entries are skipped with a logged reason, hidden ones silently."""
    slides, others = [], []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        (slides if _is_slide(entry) else others).append(entry)
    for entry in others:
        kind = "a folder, not an OME-Zarr image" if entry.is_dir() else f"{entry.suffix or 'no suffix'}"
        log(f"skipping {entry}: not a slide ({kind})")
    if not slides:
        raise SlideError(f"folder {folder} holds no slide (looked for {_supported()}; "
                         f"{len(others)} other entries; subfolders are not searched)")
    return slides


def _listed(listing: Path, log: Log) -> list[Path]:
    try:
        lines = listing.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SlideError(f"cannot read slide list {listing}: {exc}") from None
    paths = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        path = Path(text).expanduser()
        path = path if path.is_absolute() else listing.parent / path
        if path.is_dir() and not is_ome_zarr(path):
            paths += _in_folder(path, log)
        else:
            paths.append(_named(path, f"line {number} of {listing}"))
    if not paths:
        raise SlideError(f"slide list {listing} names no slide")
    return paths


def find_slides(inputs: Sequence[str], log: Log = print) -> list[CohortSlide]:
    """The cohort's slides, sorted by output name.

    A folder contributes the slides directly in it and skips anything else with a logged
    reason; a slide named on the command line or in a list must exist and be a slide (an error
    before any work otherwise). The same file twice is kept once; two files that would share an
    output folder (`a/x.svs`, `b/x.tif`) are an error naming both."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.suffix.lower() == LIST_SUFFIX:
            if not path.is_file():
                raise SlideError(f"slide list {path} does not exist")
            paths += _listed(path, log)
        elif path.is_dir() and not is_ome_zarr(path):
            paths += _in_folder(path, log)
        else:
            paths.append(_named(path, "on the command line"))
    seen: dict[Path, Path] = {}
    for path in paths:
        if path.resolve() in seen:
            log(f"skipping {path}: named twice (as {seen[path.resolve()]})")
        else:
            seen[path.resolve()] = path
    by_name: dict[str, CohortSlide] = {}
    for path in seen.values():
        slide = CohortSlide(path.absolute(), output_name(path))
        if slide.name.startswith("."):
            raise SlideError(f"{path}: its output folder {slide.name!r} would be hidden (and taken "
                             "for a temporary); rename the file")
        key = slide.name.lower()  # case-insensitive file systems would merge these folders
        if key in by_name or key in (SETTINGS, TABLE):
            other = by_name[key].path if key in by_name else f"the cohort's own {key}"
            raise OutputExistsError(f"slides {other} and {path} would both be written to output "
                                    f"folder {slide.name!r}; rename one or stain them into "
                                    "separate --out folders")
        by_name[key] = slide
    return sorted(by_name.values(), key=lambda s: s.name)


def check_cohort_output(out: Path) -> None:
    """Refuse, before the model loads, an --out that is a file or holds something other than a
    cohort (anything not hidden, and no cohort.json): a cohort never writes among user files."""
    from .regions.outputs import check_output_folder

    remedy = "choose another --out"
    check_output_folder(out, overwrite=True, remedy=remedy)  # a file at or above it
    if out.is_dir() and not (out / SETTINGS).is_file():
        visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        if visible:
            raise OutputExistsError(f"output folder {out} holds {', '.join(visible[:3])}"
                                    f"{', ...' if len(visible) > 3 else ''} but is no mupd stain "
                                    f"cohort (no {SETTINGS}); {remedy}")


def claim_output(out: Path, settings: CohortSettings, write: bool) -> None:
    """Refuse an --out whose cohort was stained with other settings; record them when `write`
    (one process) and there are none yet."""
    recorded = out / SETTINGS
    if recorded.is_file():
        try:
            before = json.loads(recorded.read_text())
        except ValueError as exc:
            raise OutputExistsError(f"{recorded} is not readable JSON ({exc}); {out} cannot be "
                                    "resumed: choose another --out") from None
        now = json.loads(json.dumps(asdict(settings)))
        changed = [f"{k}: {before.get(k)!r} there, {now.get(k)!r} now"
                   for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        if changed:
            raise OutputExistsError(f"output folder {out} holds a cohort stained with other "
                                    f"settings ({'; '.join(changed)}); resume it with the same "
                                    "settings or choose another --out")
    elif write:
        atomic_write_text(recorded, json.dumps(asdict(settings), indent=1) + "\n")


def _open(path: Path, fallback_mpp: Optional[float]) -> Any:
    """The slide, with `fallback_mpp` only where the file states no pixel size (unlike a single
    slide's --mpp, which overrides: a cohort mixes scanners)."""
    from .io import open_slide

    with warnings.catch_warnings():  # a missing mpp is this slide's failure, said once, below
        warnings.filterwarnings("ignore", message=".*no pixel size")
        slide = open_slide(path)
        if slide.mpp is None and fallback_mpp is not None:
            slide.close()
            slide = open_slide(path, mpp=fallback_mpp)
    return slide


def _stain(pipeline: Any, slide: CohortSlide, final: Path, settings: CohortSettings,
           fallback_mpp: Optional[float], progress: ProgressCallback) -> dict[str, Any]:
    from .regions.outputs import write_translation
    from .regions.translate import RegionTranslator
    from .render import IhcLook

    with _open(slide.path, fallback_mpp) as opened:
        result = RegionTranslator(pipeline)(
            opened, settings.stains, steps=settings.steps, seed=settings.seed,
            render_brightfield=settings.render_brightfield, progress=progress,
            stain_norm=settings.stain_norm, strength=settings.strength, prompt=settings.prompt,
            ihc_look=None if settings.ihc_look is None else IhcLook.from_dict(settings.ihc_look))
        try:
            row: dict[str, Any] = {
                "slide": str(slide.path), "output": slide.name, "status": "done",
                "tiles": result.n_tiles, "tissue_tiles": result.n_tiles - result.n_skipped,
                "seconds": round(result.seconds, 2), "region": " ".join(map(str, result.region.box)),
                "mpp": round(float(opened.mpp[0]), 6)}
            for layer in result.layers:  # region means (background tiles count as zero)
                if layer.kind == "marker":
                    row[f"mean_{layer.name}"] = round(float(layer.data.mean()), 6)
            row["reason"] = ""
            write_translation(result, final, source=str(slide.path), ome_tiff=settings.ome_tiff,
                              extra_files={SUMMARY: json.dumps(row, indent=1) + "\n"})
        finally:
            result.close()
    return row


def _fail(out: Path, slide: CohortSlide, reason: str) -> str:
    reason = " ".join(reason.split())
    row = {"slide": str(slide.path), "output": slide.name, "status": "failed", "reason": reason}
    atomic_write_text(out / FAILED / f"{slide.name}.json", json.dumps(row, indent=1) + "\n")
    return reason


def stain_cohort(pipeline: Any, slides: Sequence[CohortSlide], out: Path,
                 settings: CohortSettings, rank: int = 0, world: int = 1,
                 fallback_mpp: Optional[float] = None,
                 progress: Optional[ProgressCallback] = None, log: Log = print) -> Counter:
    """Stain this process's share of `slides` (every `world`-th from `rank`) into `out`.

    A finished slide is skipped; a slide that cannot be read or translated (a bad file, no
    pixel size) is recorded as failed with its reason and the others go on; anything else (a
    bug, out of memory) stops the run, which a rerun resumes. Progress: a "slides" event before
    each slide (its message: the slide's name) and after the last, the slide's "tiles" events
    in between. Returns how many slides were done, skipped and failed."""
    progress = progress or no_progress
    from .distributed import shard

    share = shard(slides, rank, world)
    counts: Counter = Counter()
    for i, slide in enumerate(share):
        progress(ProgressEvent("slides", i, len(share), slide.name))
        final = out / slide.name
        if (final / SUMMARY).is_file():
            counts["skipped"] += 1
            log(f"{slide.name}: skipped, finished earlier ({final})")
            continue
        if final.exists() or final.is_symlink():
            counts["failed"] += 1
            reason = _fail(out, slide, f"{final} exists but is no finished slide of this cohort "
                                       f"(no {SUMMARY}); move it away to stain {slide.path}")
            log(f"{slide.name}: failed: {reason}")
        else:
            log(f"{slide.name}: staining {slide.path} ({i + 1} of {len(share)})")
            try:
                row = _stain(pipeline, slide, final, settings, fallback_mpp, progress)
            except (MuPDError, OSError, ValueError) as exc:  # this slide's input, not the run
                counts["failed"] += 1
                message = str(exc) if isinstance(exc, MuPDError) else f"{type(exc).__name__}: {exc}"
                log(f"{slide.name}: failed: {_fail(out, slide, message)}")
            else:
                counts["done"] += 1
                (out / FAILED / f"{slide.name}.json").unlink(missing_ok=True)
                log(f"{slide.name}: done, {row['tiles']} tiles ({row['tissue_tiles']} tissue) in "
                    f"{row['seconds']:.1f} s -> {final}")
        write_table(out, slides, settings.markers)
    progress(ProgressEvent("slides", len(share), len(share), ""))
    return counts


def read_rows(out: Path, slides: Sequence[CohortSlide]) -> list[dict[str, Any]]:
    """Every slide's row, sorted by output name: the finished slides in `out` (from any run),
    the failed ones, and `slides` not yet stained as "pending"."""
    rows: dict[str, dict[str, Any]] = {}
    for entry in sorted(out.iterdir()) if out.is_dir() else []:
        if not entry.name.startswith(".") and (entry / SUMMARY).is_file():
            rows[entry.name] = json.loads((entry / SUMMARY).read_text())
    for entry in sorted((out / FAILED).glob("*.json")):
        rows.setdefault(entry.name[: -len(".json")], json.loads(entry.read_text()))
    for slide in slides:
        rows.setdefault(slide.name, {"slide": str(slide.path), "output": slide.name,
                                     "status": "pending"})
    return [rows[name] for name in sorted(rows)]


def write_table(out: Path, slides: Sequence[CohortSlide], markers: Sequence[str]) -> list[dict]:
    """Rebuild `out/cohort.csv` from the rows (`read_rows`), atomically; returns the rows."""
    rows = read_rows(out, slides)
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS + [f"mean_{m}" for m in markers] + LAST_COLUMNS,
                            restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / TABLE, text.getvalue())
    return rows
