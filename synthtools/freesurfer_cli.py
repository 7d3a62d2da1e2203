"""The command-line side of FreeSurfer's weight files (issue 33): what
``--model`` means for ``synthstrip``/``synthseg``, and ``--check``.

Kept apart from :mod:`synthtools.cli` so that the tools only call in here:
``load_model_arg`` from their model loader and ``run_check`` for ``--check``.
"""
from __future__ import annotations

import argparse
import hashlib

import numpy as np

from .cli.common import UsageError, say_warning
from .io import InputError
from .freesurfer import is_freesurfer_file, layout_report, load_freesurfer_seg, load_freesurfer_strip, resolve_model_arg
from .weights import ModelError

LOADERS = {"synthstrip": load_freesurfer_strip, "synthseg": load_freesurfer_seg}


def load_model_arg(prog: str, args: argparse.Namespace, device: str):
    """(``--model`` to use, a loaded FreeSurfer model or None).

    A placeholder value (``<undefined>``, empty) or a FreeSurfer default path
    that does not exist becomes None, "use the shipped model" (noted on
    stderr); a FreeSurfer weight file is loaded (InputError, exit 1, one line, if it
    is not the published layout); anything else is left to our own loader.
    """
    value = resolve_model_arg(prog, args.model)
    if value is None or not is_freesurfer_file(value):
        return value, None
    try:
        model = LOADERS[prog](value, device)
    except ModelError as exc:
        raise InputError(str(exc)) from None   # an unusable model file: bad input, exit 1
    if prog == "synthstrip" and getattr(args, "no_csf", False) and not model.meta["freesurfer"]["nocsf"]:
        say_warning(prog, f"--no-csf given but {value} is FreeSurfer's model with CSF in the brain "
                          "(its no-CSF model is synthstrip.nocsf.1.pt)")
    return value, model


def run_check(prog: str, args: argparse.Namespace) -> int:
    """``--check``: print how ``--model FILE`` matches the published layout
    and a checksum of its output on the bundled example; 0 if the layout
    matches and the model runs, 1 otherwise."""
    if not args.model or not is_freesurfer_file(args.model):
        raise UsageError("--check needs --model FILE: one of FreeSurfer's weight files "
                         "(synthstrip.1.pt, synthstrip.nocsf.1.pt, synthseg_2.0.h5, synthseg_robust_2.0.h5)")
    from .data import example_scan
    from .io import load_volume
    from .weights import sha256

    print(f"{prog}: file: {args.model} (sha256 {sha256(args.model)})")
    ok, line = layout_report(args.model, prog)
    print(f"{prog}: {line}")
    if not ok:
        return 1
    model = LOADERS[prog](args.model, "cpu")
    vol = load_volume(str(example_scan()))
    if prog == "synthstrip":
        from .freesurfer_strip import strip
        out = strip(model, vol).mask.astype(np.uint8)
        what = "brain mask"
    else:
        from .freesurfer_seg import segment
        out = segment(model, vol).labels.astype(np.int32)
        what = "label map"
    digest = hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest()
    voxel_ml = abs(float(np.linalg.det(vol.affine[:3, :3]))) / 1000.0
    print(f"{prog}: output: {what} of the bundled example {vol.shape}: sha256 {digest[:16]}, "
          f"{int((out > 0).sum())} voxels non-zero ({(out > 0).sum() * voxel_ml:.1f} mL)")
    print(f"{prog}: please paste these lines into an issue if the output differs from FreeSurfer's")
    return 0
