"""nipype interfaces for the synthtools CLIs (issue 35); needs
``pip install "synthtools[nipype]"``.

    from nipype import Node, Workflow
    from synthtools.interfaces.nipype import SynthStrip, SynthSeg

    strip = Node(SynthStrip(num_threads=1), name="strip")
    seg = Node(SynthSeg(num_threads=1, fast=True), name="seg")
    wf = Workflow(name="anat")
    wf.connect(strip, "out_file", seg, "in_file")

Every output file is an output trait (the colour table beside a label map
included). Outputs that a tool always needs (stripped image, label map,
moved image, transform) get a name in the node's folder when not given;
optional ones (distance map, posteriors, tables...) are written only when
their input trait names a file. Each interface runs the installed console
script, so the command line is the one a user would type.
"""
from __future__ import annotations

import glob
import os

from nipype.interfaces.base import (CommandLine, CommandLineInputSpec, Directory, File, InputMultiObject,
                                    TraitedSpec, isdefined, traits)

__all__ = ["SynthStrip", "SynthSeg", "SynthMorphRegister", "SynthMorphApply", "SynthToolsBIDS"]


def _abs(path: str) -> str:
    return os.path.abspath(path)


def _stem(path: str) -> tuple[str, str]:
    """(name without folder and extension, extension), ``.nii.gz`` kept whole."""
    name = os.path.basename(path)
    for ext in (".nii.gz", ".nii", ".mgz", ".mgh"):
        if name.lower().endswith(ext):
            return name[: -len(ext)], name[-len(ext):]
    root, ext = os.path.splitext(name)
    return root, ext


class _ThreadsMixin:
    """nipype's MultiProc reads ``n_procs``/``num_threads`` to schedule nodes."""

    def _num_threads_update(self) -> None:
        if isdefined(self.inputs.num_threads):
            self._num_threads = self.inputs.num_threads

    @property
    def num_threads(self) -> int:
        return self.inputs.num_threads if isdefined(self.inputs.num_threads) else 1

    @num_threads.setter
    def num_threads(self, value: int) -> None:
        self.inputs.num_threads = value


# ------------------------------------------------------------- synthstrip --

class SynthStripInputSpec(CommandLineInputSpec):
    in_file = File(exists=True, mandatory=True, argstr="-i %s", position=0, desc="input image")
    out_file = File(name_source=["in_file"], name_template="%s_desc-brain", keep_extension=True,
                    argstr="-o %s", desc="skull-stripped image (default: <input>_desc-brain)")
    out_mask = File(name_source=["in_file"], name_template="%s_desc-brain_mask", keep_extension=True,
                    argstr="-m %s", desc="binary brain mask (default: <input>_desc-brain_mask)")
    out_sdt = File(argstr="-d %s", desc="signed distance to the brain boundary in mm (written only if given)")
    border_mm = traits.Float(argstr="-b %g", desc="mask border threshold in mm (default: 1)")
    fill_value = traits.Float(argstr="-f %g", desc="value of removed voxels (default: 0)")
    no_csf = traits.Bool(argstr="--no-csf", desc="exclude CSF from the brain border")
    flip = traits.Bool(argstr="--flip", desc="left-right test-time augmentation (default on; False: --no-flip)")
    model = File(exists=True, argstr="--model %s", desc="alternative model (folder, metadata.json or FreeSurfer .pt)")
    use_gpu = traits.Bool(argstr="-g", desc="run on the GPU (CUDA)")
    num_threads = traits.Int(argstr="-t %d", desc="CPU threads")


class SynthStripOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="skull-stripped image")
    out_mask = File(exists=True, desc="binary brain mask (uint8)")
    out_sdt = File(desc="signed distance map in mm (if requested)")


class SynthStrip(_ThreadsMixin, CommandLine):
    """``synthstrip``: skull-stripping (both the stripped image and the mask by default)."""

    _cmd = "synthstrip"
    input_spec = SynthStripInputSpec
    output_spec = SynthStripOutputSpec

    def _format_arg(self, name, spec, value):
        if name == "flip":
            return "--flip" if value else "--no-flip"
        return super()._format_arg(name, spec, value)

    def _list_outputs(self):
        outputs = super()._list_outputs()
        if isdefined(self.inputs.out_sdt):
            outputs["out_sdt"] = _abs(self.inputs.out_sdt)
        return outputs


# --------------------------------------------------------------- synthseg --

class SynthSegInputSpec(CommandLineInputSpec):
    in_file = File(exists=True, mandatory=True, argstr="-i %s", position=0, desc="input image")
    out_file = File(name_source=["in_file"], name_template="%s_synthseg", keep_extension=True,
                    argstr="-o %s", desc="label map, int32 FreeSurfer labels (default: <input>_synthseg)")
    out_post = File(argstr="--post %s", desc="posteriors, 4D float32 (written only if given)")
    out_resample = File(argstr="--resample %s", desc="the image the network saw (written only if given)")
    out_vol = File(argstr="--vol %s", desc="volumes table in mm^3, .csv (written only if given)")
    out_qc = File(argstr="--qc %s", desc="QC scores table, .csv (written only if given)")
    crop = traits.List(traits.Int, minlen=1, maxlen=3, argstr="--crop %s", sep=" ",
                       desc="crop the network's input to N^3 (or N1 N2 N3) voxels")
    fast = traits.Bool(argstr="--fast", desc="skip the optional steps (flip, refinement, atlases)")
    flip = traits.Bool(argstr="--flip", desc="left-right test-time augmentation (default on; False: --no-flip)")
    refine = traits.Bool(argstr="--refine", desc="intensity refinement (default on; False: --no-refine)")
    atlases = traits.Int(argstr="--atlases %d", desc="bundled atlases used as a second prior (0: off)")
    keep_conformed = traits.Bool(argstr="--keep-conformed", desc="write on the network's grid")
    ct = traits.Bool(argstr="--ct", desc="CT in Hounsfield units: clip to [0, 80]")
    model = File(exists=True, argstr="--model %s", desc="alternative model (folder, metadata.json or FreeSurfer .h5)")
    use_gpu = traits.Bool(argstr="-g", desc="run on the GPU (CUDA)")
    num_threads = traits.Int(argstr="-t %d", desc="CPU threads")
    quiet = traits.Bool(True, usedefault=True, argstr="-q", desc="no progress lines")


class SynthSegOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="label map (int32, FreeSurfer labels, the input's grid)")
    out_lut = File(exists=True, desc="colour table beside the label map (<out stem>.lut.txt)")
    out_post = File(desc="posteriors (if requested)")
    out_resample = File(desc="resampled input (if requested)")
    out_vol = File(desc="volumes table (if requested)")
    out_qc = File(desc="QC table (if requested)")


class SynthSeg(_ThreadsMixin, CommandLine):
    """``synthseg``: whole-brain segmentation (32 FreeSurfer structures)."""

    _cmd = "synthseg"
    input_spec = SynthSegInputSpec
    output_spec = SynthSegOutputSpec

    def _format_arg(self, name, spec, value):
        if name in ("flip", "refine"):
            return f"--{name}" if value else f"--no-{name}"
        if name == "quiet" and not value:
            return ""
        return super()._format_arg(name, spec, value)

    def _list_outputs(self):
        outputs = super()._list_outputs()
        stem, _ = _stem(outputs["out_file"])
        outputs["out_lut"] = os.path.join(os.path.dirname(outputs["out_file"]), stem + ".lut.txt")
        for name in ("out_post", "out_resample", "out_vol", "out_qc"):
            value = getattr(self.inputs, name)
            if isdefined(value):
                outputs[name] = _abs(value)
        return outputs


# ------------------------------------------------------------- synthmorph --

class SynthMorphRegisterInputSpec(CommandLineInputSpec):
    moving = File(exists=True, mandatory=True, argstr="%s", position=-2, desc="moving image")
    fixed = File(exists=True, mandatory=True, argstr="%s", position=-1, desc="fixed image")
    mode = traits.Enum("joint", "deform", "affine", "rigid", argstr="-m %s", usedefault=True,
                       desc="transformation model")
    out_moving = File(argstr="-o %s", genfile=True, desc="moving image in the fixed space "
                      "(default: <moving>_moved)")
    out_trans = File(argstr="-t %s", genfile=True, desc="transform moving -> fixed (default: "
                     "<moving>_to_<fixed>.lta for rigid/affine, .nii.gz warp for deform/joint)")
    out_fixed = File(argstr="-O %s", desc="fixed image in the moving space (written only if given)")
    out_inverse = File(argstr="-T %s", desc="transform fixed -> moving (written only if given)")
    init = File(exists=True, argstr="-i %s", desc="linear transform to start from")
    header_only = traits.Bool(argstr="-H", desc="update the output headers instead of resampling (linear)")
    mid_space = traits.Bool(argstr="-M", desc="halfway space (rigid/affine)")
    regularization = traits.Range(0.0, 1.0, argstr="-r %g", desc="deformable smoothness weight")
    model = File(exists=True, argstr="--model %s", desc="alternative model")
    affine_model = File(exists=True, argstr="--affine-model %s", desc="joint: alternative affine model")
    use_gpu = traits.Bool(argstr="-g", desc="run on the GPU (CUDA)")
    num_threads = traits.Int(argstr="-j %d", desc="CPU threads")
    quiet = traits.Bool(True, usedefault=True, argstr="-q", desc="no progress lines")


class SynthMorphRegisterOutputSpec(TraitedSpec):
    out_moving = File(exists=True, desc="moving image moved into the fixed space")
    out_trans = File(exists=True, desc="transform moving -> fixed (.lta or warp image)")
    out_fixed = File(desc="fixed image in the moving space (if requested)")
    out_inverse = File(desc="transform fixed -> moving (if requested)")


class SynthMorphRegister(_ThreadsMixin, CommandLine):
    """``synthmorph register``: rigid, affine, deformable or joint registration."""

    _cmd = "synthmorph register"
    input_spec = SynthMorphRegisterInputSpec
    output_spec = SynthMorphRegisterOutputSpec

    def _gen_filename(self, name):
        moving, ext = _stem(self.inputs.moving)
        if name == "out_moving":
            return _abs(f"{moving}_moved{ext}")
        if name == "out_trans":
            fixed, _ = _stem(self.inputs.fixed)
            suffix = ".lta" if self.inputs.mode in ("rigid", "affine") else ".nii.gz"
            return _abs(f"{moving}_to_{fixed}{suffix}")
        return None

    def _format_arg(self, name, spec, value):
        if name == "quiet" and not value:
            return ""
        return super()._format_arg(name, spec, value)

    def _list_outputs(self):
        outputs = self.output_spec().trait_get()
        for name in ("out_moving", "out_trans"):
            value = getattr(self.inputs, name)
            outputs[name] = _abs(value) if isdefined(value) else self._gen_filename(name)
        for name in ("out_fixed", "out_inverse"):
            value = getattr(self.inputs, name)
            if isdefined(value):
                outputs[name] = _abs(value)
        return outputs


class SynthMorphApplyInputSpec(CommandLineInputSpec):
    trans = File(exists=True, mandatory=True, argstr="%s", position=-3, desc="transform file (moving -> fixed)")
    in_file = File(exists=True, mandatory=True, argstr="%s", position=-2, desc="image to resample")
    out_file = File(name_source=["in_file"], name_template="%s_moved", keep_extension=True, argstr="%s",
                    position=-1, desc="resampled image (default: <input>_moved)")
    method = traits.Enum("linear", "nearest", argstr="-m %s", desc="interpolation (nearest for labels)")
    dtype = traits.Enum("uint8", "int8", "int16", "uint16", "int32", "uint32", "float32", "float64",
                        argstr="-t %s", desc="output data type (default: the input's)")
    fill_value = traits.Float(argstr="-f %g", desc="value outside the input (default: 0)")
    header_only = traits.Bool(argstr="-H", desc="set the header instead of resampling (linear)")
    fixed = File(exists=True, argstr="--fixed %s", desc="image whose grid the output gets")
    num_threads = traits.Int(argstr="-j %d", desc="CPU threads")
    quiet = traits.Bool(True, usedefault=True, argstr="-q", desc="no progress lines")


class SynthMorphApplyOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="resampled image")


class SynthMorphApply(_ThreadsMixin, CommandLine):
    """``synthmorph apply``: resample an image with a transform file."""

    _cmd = "synthmorph apply"
    input_spec = SynthMorphApplyInputSpec
    output_spec = SynthMorphApplyOutputSpec

    def _format_arg(self, name, spec, value):
        if name == "quiet" and not value:
            return ""
        return super()._format_arg(name, spec, value)


# --------------------------------------------------------------- BIDS App --

class SynthToolsBIDSInputSpec(CommandLineInputSpec):
    bids_dir = Directory(exists=True, mandatory=True, argstr="%s", position=0, desc="input BIDS dataset")
    output_dir = Directory(argstr="%s", position=1, genfile=True,
                           desc="derivatives folder (default: synthtools in the node folder)")
    analysis_level = traits.Enum("participant", "group", argstr="%s", position=2, usedefault=True)
    participant_label = InputMultiObject(traits.Str, argstr="--participant-label %s", sep=" ")
    session_label = InputMultiObject(traits.Str, argstr="--session-label %s", sep=" ")
    tools = traits.List(traits.Enum("strip", "seg"), argstr="--tools %s", sep=",", desc="tools to run")
    suffix = traits.Str(argstr="--suffix %s", desc="BIDS suffix of the inputs (default: T1w)")
    border_mm = traits.Float(argstr="--border %g", desc="strip: mask border in mm")
    atlases = traits.Int(argstr="--atlases %d", desc="seg: bundled atlases (0: faster)")
    overwrite = traits.Bool(argstr="--overwrite", desc="redo complete outputs")
    skip_bids_validation = traits.Bool(argstr="--skip-bids-validation")
    use_gpu = traits.Bool(argstr="-g", desc="run on the GPU (CUDA)")
    num_threads = traits.Int(argstr="-t %d", desc="CPU threads")


class SynthToolsBIDSOutputSpec(TraitedSpec):
    output_dir = Directory(exists=True, desc="the derivatives folder")
    dataset_description = File(exists=True, desc="dataset_description.json")
    # lists even with one file (nipype's OutputMultiObject would collapse it to a string)
    out_masks = traits.List(File(exists=True), desc="*_desc-brain_mask.nii.gz")
    out_brains = traits.List(File(exists=True), desc="*_desc-brain_<suffix>.nii.gz (stripped images)")
    out_dsegs = traits.List(File(exists=True), desc="*_dseg.nii.gz label maps")
    out_volumes = traits.List(File(exists=True), desc="*_volumes.tsv per image (mm^3)")
    group_volumes = File(desc="group_volumes.tsv (group level)")


class SynthToolsBIDS(_ThreadsMixin, CommandLine):
    """``synthtools-bids``: the BIDS App (strip and segment a dataset into BIDS-Derivatives)."""

    _cmd = "synthtools-bids"
    input_spec = SynthToolsBIDSInputSpec
    output_spec = SynthToolsBIDSOutputSpec

    def _gen_filename(self, name):
        return _abs("synthtools") if name == "output_dir" else None

    def _list_outputs(self):
        out = self.output_spec().trait_get()
        root = _abs(self.inputs.output_dir) if isdefined(self.inputs.output_dir) else self._gen_filename("output_dir")
        out["output_dir"] = root
        out["dataset_description"] = os.path.join(root, "dataset_description.json")

        def find(pattern):
            return sorted(glob.glob(os.path.join(root, "sub-*", "**", pattern), recursive=True))
        out["out_masks"] = find("*_desc-brain_mask.nii.gz")
        out["out_brains"] = [p for p in find("*_desc-brain_*.nii.gz") if not p.endswith("_desc-brain_mask.nii.gz")]
        out["out_dsegs"] = find("*_dseg.nii.gz")
        out["out_volumes"] = find("*_volumes.tsv")
        group = os.path.join(root, "group_volumes.tsv")
        if os.path.exists(group):
            out["group_volumes"] = group
        return out
