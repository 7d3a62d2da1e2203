"""Pydra tasks for the synthtools CLIs (issue 35); needs
``pip install "synthtools[pydra]"``.

Written for pydra 0.x (0.25, the current release on PyPI; the 1.0 line,
still alpha, has another task API). Each class is a ``ShellCommandTask``:

    from synthtools.interfaces.pydra import SynthStrip, SynthSeg
    import pydra

    wf = pydra.Workflow(name="anat", input_spec=["t1"], t1="sub-01_T1w.nii.gz")
    wf.add(SynthStrip(name="strip", in_file=wf.lzin.t1, num_threads=1))
    wf.add(SynthSeg(name="seg", in_file=wf.strip.lzout.out_file, num_threads=1, fast=True))
    wf.set_output([("labels", wf.seg.lzout.out_file)])

Outputs that a tool always writes get a name from the input (in the task's
output folder); optional outputs (``out_sdt``, ``out_post``, tables ...) are
off by default: set them to True for the default name or to a file name.
"""
from __future__ import annotations

import glob
import os
import typing as ty
from pathlib import Path

import attr
from pydra.engine.specs import Directory, File, ShellOutSpec, ShellSpec, SpecInfo
from pydra.engine.task import ShellCommandTask

__all__ = ["SynthStrip", "SynthSeg", "SynthMorphRegister", "SynthMorphApply", "SynthToolsBIDS"]

OptionalOut = ty.Union[Path, bool]


def _field(type_, help_string: str, **metadata):
    return attr.ib(type=type_, metadata={"help_string": help_string, **metadata})


def _optional_out(help_string: str, argstr: str, template: str):
    """An output written only when its input is True (default name) or a file name."""
    return attr.ib(type=OptionalOut, default=False,
                   metadata={"help_string": help_string, "argstr": argstr, "output_file_template": template})


def _spec(name: str, fields: dict, base) -> SpecInfo:
    return SpecInfo(name=name, fields=list(fields.items()), bases=(base,))


_THREADS = {"num_threads": _field(int, "CPU threads", argstr="-t"),
            "use_gpu": _field(bool, "run on the GPU (CUDA)", argstr="-g")}


# ------------------------------------------------------------- synthstrip --

class SynthStrip(ShellCommandTask):
    """``synthstrip``: skull-stripped image and brain mask (and optionally the distance map)."""

    executable = "synthstrip"
    input_spec = _spec("SynthStripInput", {
        "in_file": _field(File, "input image", argstr="-i", mandatory=True, position=0),
        "out_file": _field(Path, "skull-stripped image", argstr="-o", output_file_template="{in_file}_desc-brain"),
        "out_mask": _field(Path, "binary brain mask", argstr="-m", output_file_template="{in_file}_desc-brain_mask"),
        "out_sdt": _optional_out("signed distance map in mm", "-d", "{in_file}_sdt"),
        "border_mm": _field(float, "mask border threshold in mm (default: 1)", argstr="-b"),
        "fill_value": _field(float, "value of removed voxels (default: 0)", argstr="-f"),
        "no_csf": _field(bool, "exclude CSF from the brain border", argstr="--no-csf"),
        "no_flip": _field(bool, "no left-right test-time augmentation (faster)", argstr="--no-flip"),
        "model": _field(File, "alternative model", argstr="--model"),
        **_THREADS,
    }, ShellSpec)
    output_spec = _spec("SynthStripOutput", {}, ShellOutSpec)


# --------------------------------------------------------------- synthseg --

def _lut_path(field, inputs, output_dir) -> Path:
    """The colour table the CLI writes beside the label map: ``<stem>.lut.txt``."""
    seg = inputs.out_file
    if seg in (attr.NOTHING, None, True):
        seg = Path(inputs.in_file).name.split(".", 1)[0] + "_synthseg.nii.gz"
    name = Path(seg).name.split(".", 1)[0] + ".lut.txt"
    path = Path(output_dir) / name
    return path if path.exists() else attr.NOTHING


class SynthSeg(ShellCommandTask):
    """``synthseg``: label map and its colour table (optionally posteriors, tables...)."""

    executable = "synthseg"
    input_spec = _spec("SynthSegInput", {
        "in_file": _field(File, "input image", argstr="-i", mandatory=True, position=0),
        "out_file": _field(Path, "label map (int32)", argstr="-o", output_file_template="{in_file}_synthseg"),
        "out_post": _optional_out("posteriors, 4D float32", "--post", "{in_file}_posteriors"),
        "out_resample": _optional_out("the image the network saw", "--resample", "{in_file}_resampled"),
        "out_vol": _optional_out("volumes table in mm^3 (.csv)", "--vol", "{in_file}_volumes.csv"),
        "out_qc": _optional_out("QC scores table (.csv)", "--qc", "{in_file}_qc.csv"),
        "crop": _field(ty.List[int], "crop the network's input to N^3 (or N1 N2 N3) voxels", argstr="--crop",
                       sep=" "),
        "fast": _field(bool, "skip the optional steps (flip, refinement, atlases)", argstr="--fast"),
        "no_flip": _field(bool, "no left-right test-time augmentation", argstr="--no-flip"),
        "no_refine": _field(bool, "no intensity refinement", argstr="--no-refine"),
        "atlases": _field(int, "bundled atlases used as a second prior (0: off)", argstr="--atlases"),
        "keep_conformed": _field(bool, "write on the network's grid", argstr="--keep-conformed"),
        "ct": _field(bool, "CT in Hounsfield units: clip to [0, 80]", argstr="--ct"),
        "model": _field(File, "alternative model", argstr="--model"),
        "quiet": attr.ib(type=bool, default=True, metadata={"help_string": "no progress lines", "argstr": "-q"}),
        **_THREADS,
    }, ShellSpec)
    output_spec = _spec("SynthSegOutput", {
        "out_lut": attr.ib(type=File, metadata={"help_string": "colour table beside the label map",
                                                "callable": _lut_path}),
    }, ShellOutSpec)


# ------------------------------------------------------------- synthmorph --

def _trans_template(inputs) -> str:
    linear = inputs.mode in ("rigid", "affine")
    return "{moving}_to_fixed.lta" if linear else "{moving}_to_fixed_warp.nii.gz"


class SynthMorphRegister(ShellCommandTask):
    """``synthmorph register``: moved image and transform (optionally the inverse side)."""

    executable = ["synthmorph", "register"]
    input_spec = _spec("SynthMorphRegisterInput", {
        "moving": _field(File, "moving image", argstr="", mandatory=True, position=-2),
        "fixed": _field(File, "fixed image", argstr="", mandatory=True, position=-1),
        "mode": attr.ib(type=str, default="joint", metadata={
            "help_string": "transformation model", "argstr": "-m",
            "allowed_values": ["joint", "deform", "affine", "rigid"]}),
        "out_moving": _field(Path, "moving image in the fixed space", argstr="-o",
                             output_file_template="{moving}_moved"),
        "out_trans": _field(Path, "transform moving -> fixed (.lta or warp)", argstr="-t",
                            output_file_template=_trans_template, keep_extension=False),
        "out_fixed": _optional_out("fixed image in the moving space", "-O", "{fixed}_moved"),
        "out_inverse": _optional_out("transform fixed -> moving (linear modes)", "-T", "{fixed}_to_moving.lta"),
        "init": _field(File, "linear transform to start from", argstr="-i"),
        "header_only": _field(bool, "update headers instead of resampling (linear)", argstr="-H"),
        "mid_space": _field(bool, "halfway space (rigid/affine)", argstr="-M"),
        "regularization": _field(float, "deformable smoothness weight in [0, 1]", argstr="-r"),
        "model": _field(File, "alternative model", argstr="--model"),
        "num_threads": _field(int, "CPU threads", argstr="-j"),
        "use_gpu": _field(bool, "run on the GPU (CUDA)", argstr="-g"),
        "quiet": attr.ib(type=bool, default=True, metadata={"help_string": "no progress lines", "argstr": "-q"}),
    }, ShellSpec)
    output_spec = _spec("SynthMorphRegisterOutput", {}, ShellOutSpec)


class SynthMorphApply(ShellCommandTask):
    """``synthmorph apply``: one image resampled with a transform file."""

    executable = ["synthmorph", "apply"]
    input_spec = _spec("SynthMorphApplyInput", {
        "trans": _field(File, "transform file (moving -> fixed)", argstr="", mandatory=True, position=-3),
        "in_file": _field(File, "image to resample", argstr="", mandatory=True, position=-2),
        "out_file": _field(Path, "resampled image", argstr="", position=-1, output_file_template="{in_file}_moved"),
        "method": _field(str, "interpolation: linear or nearest", argstr="-m",
                         allowed_values=["linear", "nearest"]),
        "dtype": _field(str, "output data type (default: the input's)", argstr="-t"),
        "fill_value": _field(float, "value outside the input (default: 0)", argstr="-f"),
        "header_only": _field(bool, "set the header instead of resampling (linear)", argstr="-H"),
        "fixed": _field(File, "image whose grid the output gets", argstr="--fixed"),
        "num_threads": _field(int, "CPU threads", argstr="-j"),
        "quiet": attr.ib(type=bool, default=True, metadata={"help_string": "no progress lines", "argstr": "-q"}),
    }, ShellSpec)
    output_spec = _spec("SynthMorphApplyOutput", {}, ShellOutSpec)


# --------------------------------------------------------------- BIDS App --

def _bids_outputs(pattern: str, exclude: str | None = None):
    def collect(field, inputs, output_dir) -> list[Path]:
        root = Path(output_dir) / "synthtools"
        found = sorted(glob.glob(os.path.join(root, "sub-*", "**", pattern), recursive=True))
        return [Path(p) for p in found if not (exclude and p.endswith(exclude))]
    return collect


def _bids_file(name: str):
    def find(field, inputs, output_dir):
        path = Path(output_dir) / "synthtools" / name
        return path if path.exists() else attr.NOTHING
    return find


class SynthToolsBIDS(ShellCommandTask):
    """``synthtools-bids``: the BIDS App; derivatives in ``<task output>/synthtools``."""

    executable = "synthtools-bids"
    input_spec = _spec("SynthToolsBIDSInput", {
        "bids_dir": _field(Directory, "input BIDS dataset", argstr="", mandatory=True, position=0),
        "output_dir": _field(Path, "derivatives folder", argstr="", position=1, output_file_template="synthtools"),
        "analysis_level": attr.ib(type=str, default="participant", metadata={
            "help_string": "participant or group", "argstr": "", "position": 2,
            "allowed_values": ["participant", "group"]}),
        "participant_label": _field(ty.List[str], "participants (01 or sub-01)", argstr="--participant-label",
                                    sep=" "),
        "session_label": _field(ty.List[str], "sessions", argstr="--session-label", sep=" "),
        "tools": _field(str, "comma-separated tools: strip, seg", argstr="--tools"),
        "suffix": _field(str, "BIDS suffix of the inputs (default: T1w)", argstr="--suffix"),
        "border_mm": _field(float, "strip: mask border in mm", argstr="--border"),
        "atlases": _field(int, "seg: bundled atlases (0: faster)", argstr="--atlases"),
        "overwrite": _field(bool, "redo complete outputs", argstr="--overwrite"),
        "skip_bids_validation": _field(bool, "index non-BIDS names too", argstr="--skip-bids-validation"),
        **_THREADS,
    }, ShellSpec)
    output_spec = _spec("SynthToolsBIDSOutput", {
        "dataset_description": attr.ib(type=File, metadata={
            "help_string": "dataset_description.json", "callable": _bids_file("dataset_description.json")}),
        "out_masks": attr.ib(type=ty.List[File], metadata={
            "help_string": "*_desc-brain_mask.nii.gz", "callable": _bids_outputs("*_desc-brain_mask.nii.gz")}),
        "out_brains": attr.ib(type=ty.List[File], metadata={
            "help_string": "*_desc-brain_<suffix>.nii.gz",
            "callable": _bids_outputs("*_desc-brain_*.nii.gz", exclude="_desc-brain_mask.nii.gz")}),
        "out_dsegs": attr.ib(type=ty.List[File], metadata={
            "help_string": "*_dseg.nii.gz", "callable": _bids_outputs("*_dseg.nii.gz")}),
        "out_volumes": attr.ib(type=ty.List[File], metadata={
            "help_string": "*_volumes.tsv (mm^3)", "callable": _bids_outputs("*_volumes.tsv")}),
        "group_volumes": attr.ib(type=File, metadata={
            "help_string": "group_volumes.tsv (group level)", "callable": _bids_file("group_volumes.tsv")}),
    }, ShellOutSpec)
