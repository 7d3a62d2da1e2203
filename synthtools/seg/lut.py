"""FreeSurfer label names and colours for the segmentation labels, and the
two ways of shipping them with a label map: a ``FreeSurferColorLUT.txt``-style
text file, and the colour table embedded in an MGH/MGZ file.

Names and RGB colours are those of FreeSurfer 7's ``FreeSurferColorLUT.txt``
(labels 10/49 are ``Left-/Right-Thalamus``, formerly ``-Thalamus-Proper``).
"""
from __future__ import annotations

import os
import struct
from typing import Iterable, Sequence

__all__ = ["FREESURFER_LUT", "name", "names_for", "color", "twin", "left_right_pairs",
           "lut_text", "write_lut", "mgh_colortable"]

# value: (name, (R, G, B)); the SynthSeg 2.0 labels (background + 32 structures).
FREESURFER_LUT: dict[int, tuple[str, tuple[int, int, int]]] = {
    0: ("Unknown", (0, 0, 0)),
    2: ("Left-Cerebral-White-Matter", (245, 245, 245)),
    3: ("Left-Cerebral-Cortex", (205, 62, 78)),
    4: ("Left-Lateral-Ventricle", (120, 18, 134)),
    5: ("Left-Inf-Lat-Vent", (196, 58, 250)),
    7: ("Left-Cerebellum-White-Matter", (220, 248, 164)),
    8: ("Left-Cerebellum-Cortex", (230, 148, 34)),
    10: ("Left-Thalamus", (0, 118, 14)),
    11: ("Left-Caudate", (122, 186, 220)),
    12: ("Left-Putamen", (236, 13, 176)),
    13: ("Left-Pallidum", (12, 48, 255)),
    14: ("3rd-Ventricle", (204, 182, 142)),
    15: ("4th-Ventricle", (42, 204, 164)),
    16: ("Brain-Stem", (119, 159, 176)),
    17: ("Left-Hippocampus", (220, 216, 20)),
    18: ("Left-Amygdala", (103, 255, 255)),
    24: ("CSF", (60, 60, 60)),
    26: ("Left-Accumbens-area", (255, 165, 0)),
    28: ("Left-VentralDC", (165, 42, 42)),
    41: ("Right-Cerebral-White-Matter", (0, 225, 0)),
    42: ("Right-Cerebral-Cortex", (205, 62, 78)),
    43: ("Right-Lateral-Ventricle", (120, 18, 134)),
    44: ("Right-Inf-Lat-Vent", (196, 58, 250)),
    46: ("Right-Cerebellum-White-Matter", (220, 248, 164)),
    47: ("Right-Cerebellum-Cortex", (230, 148, 34)),
    49: ("Right-Thalamus", (0, 118, 14)),
    50: ("Right-Caudate", (122, 186, 220)),
    51: ("Right-Putamen", (236, 13, 176)),
    52: ("Right-Pallidum", (13, 48, 255)),
    53: ("Right-Hippocampus", (220, 216, 20)),
    54: ("Right-Amygdala", (103, 255, 255)),
    58: ("Right-Accumbens-area", (255, 165, 0)),
    60: ("Right-VentralDC", (165, 42, 42)),
}
_BY_NAME = {n: v for v, (n, _) in FREESURFER_LUT.items()}

# Tag of an embedded colour table in the MGH footer (FreeSurfer TAG_OLD_COLORTABLE).
_TAG_OLD_COLORTABLE = 1


def name(value: int) -> str:
    """FreeSurfer name of a label value (``Label-<value>`` if not in the table)."""
    entry = FREESURFER_LUT.get(int(value))
    return entry[0] if entry else f"Label-{int(value)}"


def names_for(values: Iterable[int]) -> list[str]:
    """FreeSurfer names of several label values, in order."""
    return [name(v) for v in values]


def color(value: int) -> tuple[int, int, int]:
    """RGB colour (0-255) of a label value; unknown values get a fixed
    pseudo-random colour so they stay distinguishable and reproducible."""
    entry = FREESURFER_LUT.get(int(value))
    if entry:
        return entry[1]
    h = (int(value) * 2654435761) & 0xFFFFFF  # Knuth hash: neighbours differ
    return (64 + (h >> 16) % 192, 64 + (h >> 8 & 0xFF) % 192, 64 + (h & 0xFF) % 192)


def twin(value: int) -> int:
    """The other hemisphere's label (``Left-X`` <-> ``Right-X``); midline and
    unknown labels are their own twin. Derived from the names, so it holds for
    every lateral pair of the table (pinned to the training generator's
    ``LEFT_RIGHT`` by a test)."""
    n = name(value)
    for a, b in (("Left-", "Right-"), ("Right-", "Left-")):
        if n.startswith(a):
            return _BY_NAME.get(b + n[len(a):], int(value))
    return int(value)


def left_right_pairs(values: Iterable[int]) -> list[tuple[int, int]]:
    """(left, right) label pairs with both members in ``values``."""
    vals = {int(v) for v in values}
    return sorted((v, twin(v)) for v in vals if name(v).startswith("Left-") and twin(v) in vals)


def _names(values: Sequence[int], names: Sequence[str] | None) -> list[str]:
    if names is None:
        return names_for(values)
    if len(names) != len(values):
        raise ValueError(f"{len(names)} names for {len(values)} labels")
    # LUT names are whitespace-separated tokens: a space would shift the columns.
    return ["-".join(str(n).split()) for n in names]


def lut_text(values: Sequence[int], names: Sequence[str] | None = None) -> str:
    """A colour table in ``FreeSurferColorLUT.txt`` format (value, name, R, G,
    B, A with A = 0 meaning opaque), readable by freeview, FSLeyes and 3D
    Slicer. ``names`` overrides the FreeSurfer names."""
    lines = ["# FreeSurfer colour table written by synthtools", f"#{'No.':<4} {'Label Name:':<40} R   G   B   A"]
    for v, n in zip(values, _names(values, names)):
        r, g, b = color(v)
        lines.append(f"{int(v):<5d} {n:<40} {r:<3d} {g:<3d} {b:<3d} 0")
    return "\n".join(lines) + "\n"


def write_lut(path: str | os.PathLike, values: Sequence[int], names: Sequence[str] | None = None) -> str:
    """Write :func:`lut_text` to ``path`` atomically (temp file, then rename). Returns the path."""
    path = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(lut_text(values, names))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def mgh_colortable(values: Sequence[int], names: Sequence[str] | None = None) -> bytes:
    """MGH footer bytes embedding the colour table (tag TAG_OLD_COLORTABLE,
    then a version -2 binary colour table, as FreeSurfer's
    ``znzCTABwriteIntoBinaryV2`` and surfa write it). Appended after the MGH
    footer, freeview and surfa show the label names without a LUT file."""
    vals = [int(v) for v in values]
    out = [struct.pack(">i", _TAG_OLD_COLORTABLE),
           struct.pack(">iii", -2, max(vals) + 1, 0),  # version, table size, no file name
           struct.pack(">i", len(vals))]
    for v, n in zip(vals, _names(vals, names)):
        raw = n.encode("utf-8") + b"\x00"
        out.append(struct.pack(">ii", v, len(raw)) + raw + struct.pack(">iiii", *color(v), 0))
    return b"".join(out)
