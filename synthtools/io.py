"""Geometry-safe image I/O for NIfTI (.nii, .nii.gz) and FreeSurfer (.mgz, .mgh).

Every problem with a user-supplied path or image is reported as an
:class:`InputError` whose message is a single line starting with the path, so
command-line tools can print it as is.
"""

from __future__ import annotations

import gzip
import os
import secrets
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import nibabel as nib
import numpy as np

__all__ = [
    "InputError",
    "Volume",
    "load_volume",
    "save_volume",
    "check_input_path",
    "check_output_path",
    "SUPPORTED_EXTENSIONS",
]

# Longest first: '.nii.gz' must win over '.gz'-less matching.
SUPPORTED_EXTENSIONS = (".nii.gz", ".nii", ".mgz", ".mgh")
_NIFTI_EXTENSIONS = (".nii.gz", ".nii")
_MGH_EXTENSIONS = (".mgz", ".mgh")

# Voxel sizes outside this range (mm) almost always mean a broken header
# (e.g. metres instead of mm) rather than a real acquisition.
MIN_VOXSIZE_MM = 0.05
MAX_VOXSIZE_MM = 20.0


class InputError(ValueError):
    """Bad user input (path or image content); the message is one line."""

    def __init__(self, message: str) -> None:
        # Collapse whitespace so the message always prints on one line, even
        # when it embeds an exception text from nibabel or the OS.
        super().__init__(" ".join(str(message).split()))


def _error(path: Any, problem: str) -> InputError:
    return InputError(f"{os.fspath(path) if path is not None else '<array>'}: {problem}")


def _extension(path: str) -> str | None:
    lower = path.lower()
    for ext in SUPPORTED_EXTENSIONS:
        if lower.endswith(ext):
            return ext
    return None


def _ext_list() -> str:
    return ", ".join(SUPPORTED_EXTENSIONS[:-1]) + " or " + SUPPORTED_EXTENSIONS[-1]


@dataclass
class Volume:
    """An image with its geometry.

    ``data`` is in file layout: (X, Y, Z) or (X, Y, Z, frames). ``affine`` maps
    voxel indices to world (scanner RAS) coordinates in mm. ``file_shape``:
    the shape stored in the file, when it differs from ``data.shape`` by
    trailing singleton axes (an X x Y x Z x 1 image is loaded as 3D and
    written back with its 4th axis, see :func:`save_volume`).
    """

    data: np.ndarray
    affine: np.ndarray
    header: Any = None
    path: str | None = None
    file_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (voxels)."""
        return tuple(int(n) for n in self.data.shape[:3])  # type: ignore[return-value]

    @property
    def voxsize(self) -> np.ndarray:
        """Voxel size along each array axis (mm)."""
        return np.sqrt(np.sum(self.affine[:3, :3] ** 2, axis=0))

    @property
    def frames(self) -> int:
        """Number of frames (1 for a 3D image)."""
        return int(self.data.shape[3]) if self.data.ndim == 4 else 1


def check_input_path(path: str | os.PathLike) -> str:
    """Check that ``path`` is an existing file with a supported extension.

    Fast: does not read the image. Returns the path as a string.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise _error(path, "file not found")
    if os.path.isdir(path):
        raise _error(path, "is a folder, an image file is required")
    if _extension(path) is None:
        raise _error(path, f"unsupported file type (use {_ext_list()})")
    if not os.access(path, os.R_OK):
        raise _error(path, "file is not readable (permission denied)")
    return path


def check_output_path(
    path: str | os.PathLike,
    *,
    input_paths: Iterable[str | os.PathLike | None] = (),
    allow_overwrite_input: bool = False,
) -> str:
    """Check that an image can be written to ``path``. Returns it as a string.

    Refuses unsupported extensions, missing or read-only folders, a path that
    is a folder, and (unless allowed) a path that is one of ``input_paths``.
    """
    path = os.fspath(path)
    if _extension(path) is None:
        _, ext = os.path.splitext(path)
        found = f"'{ext}'" if ext else "none"
        raise _error(path, f"unsupported output extension {found} (use {_ext_list()})")
    if os.path.isdir(path):
        raise _error(path, "is a folder, an output file name is required")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise _error(path, f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _error(path, f"output folder {folder} is not writable")
    if not allow_overwrite_input:
        real = os.path.realpath(path)
        for inp in input_paths:
            if inp is not None and os.path.realpath(os.fspath(inp)) == real:
                raise _error(path, "would overwrite an input image, choose another output path")
    return path


def load_volume(
    path: str | os.PathLike,
    *,
    allow_4d: bool = False,
    dtype: Any = np.float32,
) -> Volume:
    """Load and validate a 3D (or, if allowed, 4D) image.

    ``dtype`` is the in-memory type (default float32); ``None`` keeps the
    stored type (e.g. integers for label maps), except for a scaled integer
    image (NIfTI ``scl_slope``/``scl_inter``): its real values are float32,
    never float64. Raises :class:`InputError` with a one-line message for any
    unusable input.
    """
    path = check_input_path(path)
    with ExitStack() as stack:
        return _load_checked(path, stack, allow_4d, dtype)


def _open_image(path: str, stack: ExitStack) -> Any:
    # No memmap: data must not stay tied to a file we may later replace.
    if _extension(path) in _MGH_EXTENSIONS:
        # nibabel's MGH loader leaks the header file handle for .mgh; give it
        # a file object we own and close.
        fh = stack.enter_context(nib.openers.ImageOpener(path, "rb"))
        file_map = nib.MGHImage.make_file_map({"image": fh})
        return nib.MGHImage.from_file_map(file_map, mmap=False)
    return nib.load(path, mmap=False)


def _load_checked(path: str, stack: ExitStack, allow_4d: bool, dtype: Any) -> Volume:
    try:
        img = _open_image(path, stack)
    except Exception as exc:  # nibabel, gzip, zlib and OS errors all mean "unreadable"
        raise _error(path, f"not a readable NIfTI/MGH image ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image, nib.MGHImage)):
        raise _error(path, f"unsupported image format ({type(img).__name__})")

    shape = tuple(int(n) for n in img.shape)
    # Trailing singleton dimensions (e.g. a 1-frame series, NIfTI 5D vectors
    # of length 1) carry no data.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    dims = "x".join(str(n) for n in img.shape)
    if len(shape) < 3 or any(n <= 1 for n in shape[:3]):
        raise _error(path, f"image is 2D (shape {dims}), a 3D image is required")
    if len(shape) > 4:
        raise _error(path, f"image is {len(shape)}D (shape {dims}), a 3D image is required")
    if len(shape) == 4 and not allow_4d:
        raise _error(
            path, f"image is 4D with {shape[3]} frames (shape {dims}), a 3D image is required"
        )

    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise _error(path, "header affine contains NaN or Inf")
    lin = affine[:3, :3]
    voxsize = np.sqrt(np.sum(lin**2, axis=0))
    vs_text = "x".join(f"{v:.4g}" for v in voxsize)
    if np.any(voxsize < MIN_VOXSIZE_MM) or np.any(voxsize > MAX_VOXSIZE_MM):
        raise _error(
            path,
            f"implausible voxel size {vs_text} mm "
            f"(expected {MIN_VOXSIZE_MM}-{MAX_VOXSIZE_MM} mm), check the header",
        )
    # Relative determinant test: a near-degenerate direction matrix (columns
    # almost parallel) is as unusable as an exactly singular one.
    if abs(np.linalg.det(lin)) < 1e-6 * np.prod(voxsize):
        raise _error(path, "header affine is singular (voxel axes are not independent)")

    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated or corrupt data block
        raise _error(path, f"cannot read image data ({type(exc).__name__}: {exc})") from None
    raw = np.asarray(data).reshape(shape)
    if dtype is None and _is_scaled(img) and raw.dtype.itemsize > 4:
        # nibabel applies scl_slope in float64; the values are float32 data
        # (a scaled uint8 CT), written back as float32, not float64.
        dtype = np.float32
    _check_finite(raw, path)  # before casting: NaN cast to int is garbage
    with np.errstate(over="ignore", invalid="ignore"):  # overflow caught just below
        data = raw if dtype is None else raw.astype(dtype, copy=False)
    if data.dtype.kind == "f" and data.dtype.itemsize < raw.dtype.itemsize:
        _check_finite(data, path)  # float64 values beyond float32 range
    del raw
    if not data.dtype.isnative:
        # MGH is big-endian on disk; torch.from_numpy needs native order.
        data = data.astype(data.dtype.newbyteorder("="))

    lo, hi = data.min(), data.max()
    if lo == hi:
        raise _error(path, f"image is empty (all voxels are {lo.item():g})")

    file_shape = tuple(int(n) for n in img.shape)
    return Volume(data=data, affine=affine, header=img.header, path=path,
                  file_shape=file_shape if file_shape != data.shape else None)


def _is_scaled(img: Any) -> bool:
    """Integer data stored with a scale factor or offset (NIfTI scl_slope/scl_inter)."""
    slope = getattr(img.dataobj, "slope", 1.0)
    inter = getattr(img.dataobj, "inter", 0.0)
    return (slope, inter) != (1.0, 0.0)


def _check_finite(data: np.ndarray, path: str) -> None:
    if data.dtype.kind not in "fc":
        return
    finite = np.isfinite(data)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise _error(path, f"image contains {bad} NaN or Inf voxels")


def _as_numpy(data: Any) -> np.ndarray:
    if hasattr(data, "detach"):  # torch tensor, without importing torch here
        data = data.detach().cpu().numpy()
    return np.asarray(data)


def _cast(data: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast to the on-disk type so nibabel stores values without scaling."""
    if data.dtype == dtype:
        return data
    if dtype.kind in "iu" and data.dtype.kind == "f":
        # Round (0.9999 -> 1) and clip (no wrap-around) before narrowing.
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data), info.min, info.max)
    elif dtype.kind in "iu" and data.dtype.kind in "iu":
        info = np.iinfo(dtype)
        if data.size and (data.min() < info.min or data.max() > info.max):
            raise ValueError(f"values {data.min()}..{data.max()} do not fit in {dtype}")
    return data.astype(dtype)


def _default_dtype(data: np.ndarray) -> np.dtype:
    kind = data.dtype.kind
    if kind == "b":
        return np.dtype(np.uint8)
    if kind == "f":
        return np.dtype(np.float32)
    if kind in "iu" and data.dtype.itemsize > 4:
        return np.dtype(np.int32)
    return np.dtype(data.dtype).newbyteorder("=")


def _mgh_dtype(dtype: np.dtype) -> np.dtype:
    # MGH supports only a few types; widen to the nearest that holds the values.
    supported = {np.dtype(t) for t in (np.uint8, np.int16, np.uint16, np.int32, np.float32)}
    if dtype in supported:
        return dtype
    if dtype.kind == "b":
        return np.dtype(np.uint8)
    if dtype.kind in "iu" and dtype.itemsize <= 2:
        return np.dtype(np.int16) if dtype.kind == "i" else np.dtype(np.uint16)
    if dtype.kind in "iu" and dtype.itemsize <= 4 and dtype != np.dtype(np.uint32):
        return np.dtype(np.int32)
    return np.dtype(np.float32)


def _make_image(
    data: np.ndarray, like: Volume | None, affine: np.ndarray | None, ext: str
) -> nib.spatialimages.SpatialImage:
    is_mgh = ext in _MGH_EXTENSIONS
    header = like.header if (like is not None and affine is None) else None
    if affine is None:
        affine = like.affine  # type: ignore[union-attr]
    affine = np.asarray(affine, dtype=np.float64)

    if is_mgh:
        if isinstance(header, nib.freesurfer.mghformat.MGHHeader):
            img = nib.MGHImage(data, header.get_best_affine(), header.copy())
            if not np.allclose(affine, header.get_best_affine()):
                img = nib.MGHImage(data, affine, header.copy())
        else:
            # Fresh header (or conversion from NIfTI): the affine is copied.
            img = nib.MGHImage(data, affine)
        img.header.set_data_dtype(data.dtype)
        return img

    if isinstance(header, nib.Nifti1Header):  # also Nifti2Header
        cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        hdr = header.copy()
        best = hdr.get_best_affine()
        # Passing the header's own affine keeps quatern_*/srow_* and the
        # qform/sform codes bit-for-bit (nibabel rewrites them otherwise).
        img = cls(data, best, hdr)
        if not np.allclose(affine, best):
            _, qcode = hdr.get_qform(coded=True)
            _, scode = hdr.get_sform(coded=True)
            img.set_sform(affine, code=int(scode) or 1)
            img.set_qform(affine, code=int(qcode) or 1)
        # Display window of the source image is meaningless for new data.
        img.header["cal_min"] = 0
        img.header["cal_max"] = 0
    else:
        # Fresh header (explicit affine, or conversion from MGH).
        img = nib.Nifti1Image(data, affine)
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(None, None)
    return img


def save_volume(
    data: Any,
    like: Volume | None,
    path: str | os.PathLike,
    *,
    affine: np.ndarray | None = None,
    dtype: Any = None,
    overwrite: bool = True,
    mgh_tags: bytes = b"",
) -> str:
    """Write ``data`` on the grid of ``like`` (or with ``affine``) to ``path``.

    ``data``: (X, Y, Z) or (X, Y, Z, frames), numpy or torch. With ``like``
    (and no ``affine``) its header is reused, so qform/sform matrices and
    codes and units are kept exactly; with ``affine`` a fresh header with
    qform/sform code 1 is written. The format follows the extension of
    ``path``. ``dtype`` is the on-disk type (default: float32 for floats,
    uint8 for bools, int32 for 64-bit ints). The write is atomic (temp file in
    the same folder, then rename). ``mgh_tags``: raw FreeSurfer tag bytes
    appended after the MGH footer (e.g. an embedded colour table, see
    :func:`synthtools.seg.lut.mgh_colortable`); ignored for NIfTI. Returns the path.
    """
    path = check_output_path(path)
    if not overwrite and os.path.exists(path):
        raise _error(path, "already exists (not overwriting)")
    if like is None and affine is None:
        raise ValueError("save_volume needs either `like` or `affine`")

    arr = _as_numpy(data)
    if affine is None and like is not None and like.file_shape and arr.shape == like.data.shape \
            and len(like.file_shape) > arr.ndim and all(n == 1 for n in like.file_shape[arr.ndim:]):
        # The reference's trailing singleton axes (X x Y x Z x 1): same shape as the input file.
        arr = arr.reshape(like.file_shape)
    if arr.ndim not in (3, 4) and not (arr.ndim == 5 and arr.shape[3:] == (1, 1)):
        raise ValueError(f"data must be 3D or 4D (X, Y, Z[, frames]), got shape {arr.shape}")
    if affine is None and tuple(arr.shape[:3]) != like.shape:  # type: ignore[union-attr]
        raise ValueError(
            f"data spatial shape {arr.shape[:3]} differs from the reference {like.shape}; "  # type: ignore[union-attr]
            "pass `affine` for a different grid"
        )

    ext = _extension(path)
    assert ext is not None  # checked by check_output_path
    out_dtype = np.dtype(dtype) if dtype is not None else _default_dtype(arr)
    if ext in _MGH_EXTENSIONS:
        out_dtype = _mgh_dtype(out_dtype)
    arr = _cast(arr, out_dtype)
    img = _make_image(arr, like, affine, ext)

    with atomic_output(path, ext, "image") as tmp:
        nib.save(img, tmp)
        if mgh_tags and ext in _MGH_EXTENSIONS:
            # nibabel writes no tags: FreeSurfer reads them after the footer,
            # to the end of the file. For .mgz a second gzip member is the
            # same stream to every gzip reader (zlib's gzread, Python's gzip).
            opener = gzip.open if ext == ".mgz" else open
            with opener(tmp, "ab") as f:
                f.write(mgh_tags)
    return path


@contextmanager
def atomic_output(path: str, ext: str = "", what: str = "file") -> Iterator[str]:
    """Yield a hidden temporary name in ``path``'s folder (ending in ``ext``
    so writers pick the format from it); on success it replaces ``path``,
    on any failure it is removed and an OSError becomes a one-line InputError."""
    folder, name = os.path.split(os.path.abspath(path))
    stem = name[: -len(ext)] if ext and name.endswith(ext) else name
    tmp = os.path.join(folder, f".{stem}.{secrets.token_hex(4)}.tmp{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise _error(path, f"could not write {what} ({exc.strerror or exc})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
