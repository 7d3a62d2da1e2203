"""Issue 35: real pipeline clients drive our CLIs.

- the unmodified NiPreps SynthStrip nipype interface (pip package
  nipreps-synthstrip), pointed at ``synthstrip`` with ``_cmd`` only, with and
  without ``num_threads`` and with no FreeSurfer installed;
- our nipype interfaces in a two-node Workflow (strip -> seg);
- our Pydra task.

All on a real scan (FSL's MNI152 T1 at 2 mm from ../shared/data, else the
bundled example FLAIR), each skipped when its package or the installed
console scripts are absent. Small settings (one thread, no flip, --fast) keep them short.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import assert_same_geometry

# nipype and pydra ping a version server unless told not to; tests reach no network.
os.environ.setdefault("NIPYPE_NO_ET", "1")
os.environ.setdefault("NO_ET", "1")

MNI = Path(__file__).resolve().parents[2] / "shared" / "data" / "validation" / "fsl_mni152_2mm" / "MNI152_T1_2mm.nii.gz"
# Without ../shared (a clean CI clone) the clients run on the bundled example, a real
# clinical FLAIR (0.72 x 0.72 x 4 mm), so the real-client tests never skip for want of data.
# The fixture names it like a BIDS T1w: the clients only see a file name.
SCAN = MNI if MNI.is_file() else Path(__file__).resolve().parents[1] / "synthtools" / "data" / "example_flair.nii.gz"
needs_scan = pytest.mark.skipif(not SCAN.is_file(), reason="no real scan found")
needs_clis = pytest.mark.skipif(shutil.which("synthstrip") is None or shutil.which("synthseg") is None,
                                reason="the synthstrip/synthseg console scripts are not on PATH (pip install)")


@pytest.fixture
def scan(tmp_path, monkeypatch) -> Path:
    """The real scan as a BIDS-named file in a fresh folder (the current folder), no FreeSurfer."""
    monkeypatch.delenv("FREESURFER_HOME", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "sub-01_T1w.nii.gz"
    shutil.copy(SCAN, path)
    return path


def check_strip_outputs(stripped: Path, mask: Path, scan: Path) -> np.ndarray:
    """Both outputs on the input's grid and header; the mask is one plausible brain; the stripped
    image is the input inside the mask and 0 outside. Returns the mask."""
    assert_same_geometry(stripped, scan)
    assert_same_geometry(mask, scan)
    m = np.asarray(nib.load(str(mask)).dataobj)
    x = np.asarray(nib.load(str(scan)).dataobj)
    s = np.asarray(nib.load(str(stripped)).dataobj)
    assert set(np.unique(m)) <= {0, 1}
    brain_ml = m.sum() * float(np.prod(nib.load(str(scan)).header.get_zooms()[:3])) / 1000
    assert 900 < brain_ml < 2300, brain_ml             # an adult brain with CSF (MNI152 is a large one: ~2 L)
    assert np.array_equal(s[m > 0], x[m > 0]) and not s[m == 0].any()
    return m


# ----------------------------------------------------- NiPreps' interface --

@needs_scan
@needs_clis
@pytest.mark.parametrize("threads", [None, 1])
def test_nipreps_synthstrip_interface_runs_our_cli(threads, scan):
    pytest.importorskip("nipype")
    pytest.importorskip("nipreps.synthstrip.wrappers.nipype")
    # The wrapper reads FREESURFER_HOME when imported: reload it with none set (no FreeSurfer installed).
    wrappers = importlib.reload(importlib.import_module("nipreps.synthstrip.wrappers.nipype"))

    class SynthStrip(wrappers.SynthStrip):       # unmodified but for the command it runs
        _cmd = "synthstrip"

    node = SynthStrip(in_file=scan.name)     # relative, as in the command line
    if threads is not None:
        node.inputs.num_threads = threads
    cmd = node.cmdline
    assert cmd.startswith("synthstrip -b 1 -i sub-01_T1w.nii.gz --model '<undefined>'")
    assert (f" -n {threads} " in cmd) == (threads is not None)
    result = node.run()
    assert "placeholder: using the shipped model" in result.runtime.stderr
    out = result.outputs
    assert Path(out.out_file).name == "sub-01_T1w_desc-brain.nii.gz"
    assert Path(out.out_mask).name == "sub-01_T1w_desc-brain_mask.nii.gz"
    check_strip_outputs(Path(out.out_file), Path(out.out_mask), scan)


@pytest.mark.slow
@needs_scan
@needs_clis
def test_nipreps_interface_with_freesurfer_installed_runs_its_model(scan, tmp_path, monkeypatch):
    """FreeSurfer installed: the wrapper's default ``--model`` is
    $FREESURFER_HOME/models/synthstrip.1.pt, and our CLI runs FreeSurfer's own
    network from that file (the published architecture in FreeSurfer's
    checkpoint format; random weights here, so only the outputs' geometry and
    the provenance are checked, not the mask)."""
    pytest.importorskip("nipype")
    pytest.importorskip("nipreps.synthstrip.wrappers.nipype")
    import torch
    from synthtools.nets.freesurfer import SynthStripNet
    home = tmp_path / "freesurfer"
    (home / "models").mkdir(parents=True)
    torch.save({"model_state_dict": SynthStripNet().state_dict(), "epoch": 1}, home / "models" / "synthstrip.1.pt")
    monkeypatch.setenv("FREESURFER_HOME", str(home))
    wrappers = importlib.reload(importlib.import_module("nipreps.synthstrip.wrappers.nipype"))

    class SynthStrip(wrappers.SynthStrip):
        _cmd = "synthstrip"

    node = SynthStrip(in_file=scan.name, num_threads=1)
    assert f"--model {home / 'models' / 'synthstrip.1.pt'}" in node.cmdline
    result = node.run()
    assert "placeholder" not in result.runtime.stderr and "shipped model" not in result.runtime.stderr
    out = result.outputs
    for path in (out.out_file, out.out_mask):
        assert_same_geometry(Path(path), scan)


# ---------------------------------------------------- our nipype workflow --

@needs_scan
@needs_clis
def test_nipype_workflow_strip_then_seg(scan, tmp_path):
    pytest.importorskip("nipype")
    from nipype import Node, Workflow

    from synthtools.interfaces.nipype import SynthSeg, SynthStrip

    strip = Node(SynthStrip(in_file=str(scan), num_threads=1, flip=False), name="strip")
    seg = Node(SynthSeg(num_threads=1, fast=True, out_vol="volumes.csv"), name="seg")
    wf = Workflow(name="anat", base_dir=str(tmp_path / "work"))
    wf.connect(strip, "out_file", seg, "in_file")
    wf.config["execution"]["remove_unnecessary_outputs"] = False   # report the unconnected mask too
    graph = wf.run(plugin="Linear")
    results = {node.name: node.result.outputs for node in graph.nodes()}

    s = results["strip"]
    mask = check_strip_outputs(Path(s.out_file), Path(s.out_mask), scan)
    labels_path = Path(results["seg"].out_file)
    assert labels_path.name == "sub-01_T1w_desc-brain_synthseg.nii.gz"
    assert_same_geometry(labels_path, scan)
    labels = np.asarray(nib.load(str(labels_path)).dataobj)
    found = set(np.unique(labels).tolist()) - {0}
    assert {2, 41, 17, 53} <= found                    # both cerebral white matters and hippocampi
    assert (labels[mask == 0] > 0).sum() < 0.02 * (labels > 0).sum()   # labels lie in the stripped brain
    lut = Path(results["seg"].out_lut)
    assert lut.name == "sub-01_T1w_desc-brain_synthseg.lut.txt" and lut.is_file()
    listed = {int(line.split()[0]) for line in lut.read_text().splitlines() if line.strip() and line[0].isdigit()}
    assert found <= listed
    table = Path(results["seg"].out_vol).read_text().splitlines()
    assert len(table) == 2 and table[1].split(",")[0].endswith("sub-01_T1w_desc-brain.nii.gz")


# -------------------------------------------------------------- our Pydra --

@needs_scan
@needs_clis
def test_pydra_synthstrip_task(scan, tmp_path):
    pytest.importorskip("pydra")
    from synthtools.interfaces.pydra import SynthStrip

    task = SynthStrip(in_file=scan, num_threads=1, no_flip=True, out_sdt=True, cache_dir=tmp_path / "cache")
    result = task()
    out = result.output
    assert out.return_code == 0, out.stderr
    assert Path(out.out_file).name == "sub-01_T1w_desc-brain.nii.gz"
    mask = check_strip_outputs(Path(out.out_file), Path(out.out_mask), scan)
    sdt = np.asarray(nib.load(str(out.out_sdt)).dataobj)
    assert_same_geometry(Path(out.out_sdt), scan)
    assert (sdt[mask > 0] < 1.0 + 1e-3).all()          # inside the mask: closer than the 1 mm border


@needs_scan
@pytest.mark.skipif(shutil.which("synthtools-bids") is None, reason="synthtools-bids is not on PATH (pip install)")
def test_nipype_bids_app_names_its_derivatives(scan, tmp_path):
    pytest.importorskip("nipype")
    pytest.importorskip("bids")
    from synthtools.interfaces.nipype import SynthToolsBIDS

    ds = tmp_path / "ds"
    (ds / "sub-01" / "anat").mkdir(parents=True)
    (ds / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    shutil.copy(scan, ds / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    res = SynthToolsBIDS(bids_dir=str(ds), output_dir=str(tmp_path / "out"), tools=["strip"], num_threads=1).run()
    out = res.outputs
    assert Path(out.dataset_description).is_file()
    assert [Path(p).name for p in out.out_masks] == ["sub-01_desc-brain_mask.nii.gz"]
    assert [Path(p).name for p in out.out_brains] == ["sub-01_desc-brain_T1w.nii.gz"]
    check_strip_outputs(Path(out.out_brains[0]), Path(out.out_masks[0]), ds / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    assert not out.out_dsegs


# ---------------------------------------------- specs, no network needed --

def test_nipype_specs_name_every_output(tmp_path, monkeypatch):
    pytest.importorskip("nipype")
    from synthtools.interfaces.nipype import SynthMorphApply, SynthMorphRegister, SynthSeg, SynthStrip

    monkeypatch.chdir(tmp_path)
    img = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(img))
    strip = SynthStrip(in_file=str(img), num_threads=2)
    assert strip.cmdline == (f"synthstrip -i {img} -t 2 -o a_desc-brain.nii.gz -m a_desc-brain_mask.nii.gz")
    seg = SynthSeg(in_file=str(img), out_post="p.nii.gz", crop=[96, 96, 80], flip=False)
    assert "--crop 96 96 80" in seg.cmdline and "--no-flip" in seg.cmdline
    outs = seg._list_outputs()
    assert outs["out_lut"] == str(tmp_path / "a_synthseg.lut.txt") and outs["out_post"] == str(tmp_path / "p.nii.gz")
    reg = SynthMorphRegister(moving=str(img), fixed=str(img), mode="affine")
    assert reg._list_outputs()["out_trans"] == str(tmp_path / "a_to_a.lta")
    reg.inputs.mode = "joint"
    assert reg._list_outputs()["out_trans"].endswith("a_to_a.nii.gz") and " -m joint " in reg.cmdline
    app = SynthMorphApply(trans=str(img), in_file=str(img), method="nearest")
    assert app.cmdline.endswith(f"{img} {img} a_moved.nii.gz")


def test_import_synthtools_needs_neither_nipype_nor_pydra():
    code = ("import sys, synthtools, synthtools.interfaces, synthtools.cli.seg; "
            "assert not {'nipype', 'pydra'} & set(sys.modules), sorted(sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ""})
    assert res.returncode == 0, res.stderr
