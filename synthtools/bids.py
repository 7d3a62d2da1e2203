"""BIDS input discovery and BIDS-Derivatives output for ``synthtools-bids``.

Inputs are found with pybids (the optional extra ``synthtools[bids]``).
Outputs follow BIDS-Derivatives, named after each source file with its
suffix replaced (``sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz`` ->
``sub-01/ses-1/anat/sub-01_ses-1_<derivative>``):

* ``*_desc-brain_mask.nii.gz`` (uint8) and ``*_desc-brain_<suffix>.nii.gz``
  (the skull-stripped image), with JSON sidecars;
* ``*_dseg.nii.gz`` (int32 FreeSurfer labels) with the label table
  ``dseg.tsv`` at the top (inherited by every dseg) and a sidecar that
  also records the scan's soft volumes (``Volumes``, mm^3 per structure);
* ``sub-<label>/sub-<label>_volumes.tsv``: the participant's volume table,
  a row per scan of every session (rebuilt from the sidecars after each run);
* ``dataset_description.json`` (DatasetType derivative, GeneratedBy with
  the version and each model's sha256) and ``.bidsignore`` for the volume
  tables (not a BIDS suffix);
* group level: ``group_volumes.tsv``, every participant's rows.

One output folder holds one input contrast (``--suffix``): a brain mask of
a T1w and of a T2w of the same session would share a name.
"""
from __future__ import annotations

import csv
import io
import json
import os
import secrets
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["BidsError", "BidsInput", "find_inputs", "derivative_paths", "write_text_atomic",
           "dataset_description", "write_top_level", "dseg_table", "volume_row", "volumes_tsv",
           "gather_volumes", "read_tsv", "subject_volumes_path", "write_subject_volumes", "scan_volumes", "GROUP_VOLUMES", "BIDS_VERSION"]

BIDS_VERSION = "1.9.0"
GROUP_VOLUMES = "group_volumes.tsv"
IMAGE_EXTENSIONS = (".nii.gz", ".nii")
NA = "n/a"


class BidsError(ValueError):
    """An unusable BIDS dataset or selection (one-line message)."""


def _pybids():
    try:
        import bids  # noqa: F401
        from bids import BIDSLayout
    except ImportError:
        raise BidsError("the BIDS app needs pybids: pip install 'synthtools[bids]' (or pip install pybids)") from None
    return BIDSLayout


def _strip_prefix(labels: Iterable[str] | None, prefix: str) -> list[str] | None:
    """BIDS Apps accept ``01`` or ``sub-01``."""
    if labels is None:
        return None
    return [lab[len(prefix):] if lab.startswith(prefix) else lab for lab in labels]


@dataclass
class BidsInput:
    """One input image: its path, its path relative to the dataset, and entities."""
    path: str
    relpath: str
    subject: str
    session: str | None
    suffix: str

    @property
    def key(self) -> str:
        return self.relpath


def find_inputs(bids_dir: str, *, participants: Sequence[str] | None = None,
                sessions: Sequence[str] | None = None, suffix: str = "T1w",
                validate: bool = True) -> list[BidsInput]:
    """Anatomical images (``anat/*_<suffix>.nii[.gz]``) of the selected
    participants and sessions (labels with or without ``sub-``/``ses-``),
    sorted by path. BidsError if the dataset or a requested label is missing."""
    BIDSLayout = _pybids()
    if not os.path.isfile(os.path.join(bids_dir, "dataset_description.json")):
        raise BidsError(f"{bids_dir}: not a BIDS dataset (no dataset_description.json)")
    try:
        layout = BIDSLayout(bids_dir, validate=validate)
    except Exception as exc:  # pybids raises several types for a broken dataset
        raise BidsError(f"{bids_dir}: pybids cannot index the dataset ({type(exc).__name__}: {exc})") from None
    subjects = _strip_prefix(participants, "sub-")
    found = set(layout.get_subjects())
    if subjects:
        missing = sorted(set(subjects) - found)
        if missing:
            raise BidsError(f"participant(s) not in {bids_dir}: {', '.join(missing)} "
                            f"(found: {', '.join(sorted(found)) or 'none'})")
    query: dict[str, Any] = {"datatype": "anat", "suffix": suffix, "extension": list(IMAGE_EXTENSIONS),
                             "return_type": "object"}
    if subjects:
        query["subject"] = subjects
    ses = _strip_prefix(sessions, "ses-")
    if ses:
        query["session"] = ses
    files = layout.get(**query)
    root = os.path.abspath(bids_dir)
    inputs = []
    for f in files:
        ent = f.get_entities()
        inputs.append(BidsInput(path=f.path, relpath=os.path.relpath(f.path, root), subject=str(ent["subject"]),
                                session=None if ent.get("session") is None else str(ent["session"]),
                                suffix=str(ent["suffix"])))
    return sorted(inputs, key=lambda i: i.relpath)


def _stem(inp: BidsInput) -> tuple[str, str]:
    """(folder relative to the dataset, file name without ``_<suffix>`` and extension)."""
    folder, name = os.path.split(inp.relpath)
    for ext in IMAGE_EXTENSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    tail = f"_{inp.suffix}"
    return folder, name[: -len(tail)] if name.endswith(tail) else name


def derivative_paths(inp: BidsInput, out_dir: str, tools: Sequence[str]) -> dict[str, dict[str, str]]:
    """Tool -> kind -> output path of one input (images, sidecars, table)."""
    folder, stem = _stem(inp)
    base = os.path.join(out_dir, folder, stem)
    paths: dict[str, dict[str, str]] = {}
    if "strip" in tools:
        paths["strip"] = {"mask": f"{base}_desc-brain_mask.nii.gz", "mask_json": f"{base}_desc-brain_mask.json",
                          "stripped": f"{base}_desc-brain_{inp.suffix}.nii.gz",
                          "stripped_json": f"{base}_desc-brain_{inp.suffix}.json"}
    if "seg" in tools:
        paths["seg"] = {"dseg": f"{base}_dseg.nii.gz", "dseg_json": f"{base}_dseg.json"}
    return paths


def source_uri(inp: BidsInput) -> str:
    """BIDS URI of the raw input (``bids:raw:sub-01/anat/sub-01_T1w.nii.gz``)."""
    return "bids:raw:" + inp.relpath.replace(os.sep, "/")


# ----------------------------------------------------------- text outputs --

def write_text_atomic(path: str, text: str) -> str:
    """Write ``text`` to ``path`` via a temp file and a rename (never half-written)."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json(path: str, obj: Any) -> str:
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _tsv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def read_tsv(path: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a TSV file."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows:
        raise BidsError(f"{path}: empty table")
    return rows[0], rows[1:]


def dataset_description(version: str, models: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The derivative's ``dataset_description.json``: ``models``: name -> its
    metadata summary (sha256, steps) of every model that made outputs here."""
    return {
        "Name": "synthtools derivatives",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": "synthtools",
            "Version": version,
            "Description": "Domain-randomized brain extraction (synthstrip) and segmentation (synthseg); "
                           "models and their weights' sha256 under 'Models'.",
            "Models": {name: dict(info) for name, info in sorted(models.items())},
        }],
    }


def _existing_models(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return dict(json.load(f)["GeneratedBy"][0].get("Models", {}))
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return {}


def dseg_table(label_names: Mapping[int, str]) -> str:
    """The ``dseg.tsv`` label table: index, name, colour (#RRGGBB, FreeSurfer's)."""
    from .seg.lut import color
    rows = [(v, n, "#{:02X}{:02X}{:02X}".format(*color(v))) for v, n in sorted(label_names.items())]
    return _tsv(["index", "name", "color"], rows)


def write_top_level(out_dir: str, version: str, models: Mapping[str, Mapping[str, Any]],
                    label_names: Mapping[int, str] | None) -> None:
    """``dataset_description.json`` (models merged with those already listed),
    ``.bidsignore`` and, with ``label_names``, ``dseg.tsv``."""
    os.makedirs(out_dir, exist_ok=True)
    desc = os.path.join(out_dir, "dataset_description.json")
    merged = {**_existing_models(desc), **models}
    write_json(desc, dataset_description(version, merged))
    write_text_atomic(os.path.join(out_dir, ".bidsignore"), f"*_volumes.tsv\n{GROUP_VOLUMES}\n")
    if label_names is not None:
        write_text_atomic(os.path.join(out_dir, "dseg.tsv"), dseg_table(label_names))


# ----------------------------------------------------------------- volumes --

ID_COLUMNS = ("participant_id", "session_id", "source")


VOLUMES_KEY = "Volumes"      # in a dseg sidecar: structure -> soft volume in mm^3


def volume_row(subject: str, session: str | None, source: str,
               volumes: Mapping[str, float]) -> tuple[list[str], list[str]]:
    """(header, row) of one scan in a volume table; volumes in mm^3."""
    header = list(ID_COLUMNS) + list(volumes)
    row = [f"sub-{subject}", f"ses-{session}" if session else NA, source.replace(os.sep, "/")]
    return header, row + [f"{float(v):.3f}" for v in volumes.values()]


def scan_volumes(volumes: Mapping[str, float]) -> dict[str, float]:
    """The sidecar's ``Volumes``: mm^3 rounded to 0.001 (what the tables print)."""
    return {name: round(float(v), 3) for name, v in volumes.items()}


def subject_volumes_path(out_dir: str, subject: str) -> str:
    """``OUT/sub-<label>/sub-<label>_volumes.tsv``: one table per participant."""
    return os.path.join(out_dir, f"sub-{subject}", f"sub-{subject}_volumes.tsv")


def _session_of(relpath: str) -> str | None:
    for part in relpath.replace(os.sep, "/").split("/"):
        if part.startswith("ses-"):
            return part[4:]
    return None


def write_subject_volumes(out_dir: str, subject: str) -> tuple[str, int] | None:
    """Rebuild a participant's volume table from the ``Volumes`` of every
    ``*_dseg.json`` under ``OUT/sub-<label>/`` (all sessions), a row per
    scan sorted by session and source; atomic write. Returns (path, rows),
    or None if the participant has no segmentation. BidsError if the scans'
    structures differ (segmented by different models)."""
    root = os.path.join(out_dir, f"sub-{subject}")
    sidecars = sorted(os.path.join(folder, name) for folder, _, names in os.walk(root)
                      for name in names if name.endswith("_dseg.json"))
    header: list[str] | None = None
    rows: list[list[str]] = []
    for path in sidecars:
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError) as exc:
            raise BidsError(f"{path}: unreadable sidecar ({type(exc).__name__})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get(VOLUMES_KEY), dict):
            continue   # not ours, or from a version before the per-participant table
        sources = meta.get("Sources") or [""]
        source = str(sources[0]).removeprefix("bids:raw:") or os.path.relpath(path, out_dir)
        h, row = volume_row(subject, _session_of(os.path.relpath(path, out_dir)), source, meta[VOLUMES_KEY])
        if header is None:
            header = h
        elif h != header:
            raise BidsError(f"{path}: other structures than the participant's other scans (another model?); "
                            "rerun the participant level with --overwrite")
        rows.append(row)
    if header is None:
        return None
    rows.sort(key=lambda r: (r[1], r[2]))
    return write_text_atomic(subject_volumes_path(out_dir, subject), volumes_tsv(header, rows)), len(rows)


def volumes_tsv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    return _tsv(header, rows)


def gather_volumes(out_dir: str, participants: Sequence[str] | None = None) -> tuple[str, int]:
    """Group level: every participant's ``sub-<label>_volumes.tsv`` (found
    with pybids) in one ``group_volumes.tsv``, sorted by participant, session
    and source. Returns (its path, number of rows). BidsError if none exist
    or the tables' columns differ (outputs of different models)."""
    BIDSLayout = _pybids()
    if not os.path.isfile(os.path.join(out_dir, "dataset_description.json")):
        raise BidsError(f"{out_dir}: no derivatives here (run the participant level first)")
    layout = BIDSLayout(out_dir, validate=False, is_derivative=True)
    query: dict[str, Any] = {"suffix": "volumes", "extension": ".tsv", "return_type": "object"}
    subjects = _strip_prefix(participants, "sub-")
    if subjects:
        query["subject"] = subjects
    # The participants' tables only: sub-<label>/sub-<label>_volumes.tsv.
    files = sorted(f.path for f in layout.get(**query)
                   if os.path.abspath(f.path) == os.path.abspath(subject_volumes_path(out_dir, f.entities["subject"])))
    if not files:
        raise BidsError(f"{out_dir}: no sub-*/sub-*_volumes.tsv found (run the participant level with --tools seg first)")
    header: list[str] | None = None
    rows: list[list[str]] = []
    for path in files:
        h, r = read_tsv(path)
        if header is None:
            header = h
        elif h != header:
            raise BidsError(f"{path}: other columns than {files[0]} (made by another model?); "
                            "rerun the participant level with --overwrite")
        rows.extend(r)
    rows.sort(key=lambda r: tuple(r[:3]))
    assert header is not None
    path = write_text_atomic(os.path.join(out_dir, GROUP_VOLUMES), volumes_tsv(header, rows))
    return path, len(rows)
