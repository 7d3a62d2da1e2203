"""Benchmark of the synthetic-image generator against peer libraries.

Times the FULL pipeline (label map in memory -> corrupted image) of

  ours        synthtools.training.generator.synth.Synthesizer with the default SynthConfig
              (affine + SVF warp + FOV + GMM + bias + blur + noise + gamma +
              downsampling + crop), one nearest-neighbour resampling of labels;
  torchio     the closest tio.Compose (RandomAffine, RandomElasticDeformation,
              RandomLabelsToImage, RandomBiasField, RandomBlur, RandomNoise,
              RandomGamma, RandomAnisotropy), ranges matched where possible;
  cornucopia  cc.SynthFromLabelTransform with matched ranges (if installed),

on ``label_maps/training_seg_01.nii.gz`` of the data root (256^3, 1 mm) at
256^3 / 1 mm and 128^3 / 2 mm. At 2 mm ours generates straight onto the 2 mm
output grid from the 1 mm map; the peers get the map downsampled to 2 mm
(nearest: every 2nd voxel), so every pipeline makes a 128^3 image.

Each (pipeline, size) runs in its own subprocess (``--worker NAME --size N``)
so peak RSS (``ru_maxrss`` of that process, imports included, nothing
subtracted) never mixes between pipelines. A worker runs ``--warmup`` samples
(default 2) and then ``--repeats`` timed samples (default 10) with
``torch.set_num_threads(--threads)`` (default 2; SimpleITK, OpenMP and BLAS
are capped to the same count) and reports the median.

Output: one JSON line per size on stdout, also written to
``<out>/generator.jsonl`` with a markdown table ``<out>/generator.md``
(``--out`` defaults to benchmarks/results)::

    python benchmarks/generator.py                        # both sizes, both peers, 10 repeats
    python benchmarks/generator.py --sizes 128 --repeats 1 --out /tmp/bench   # smoke
    python benchmarks/generator.py --peers none           # ours only
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks.machine import cpu_name, limit_threads  # noqa: E402

MAP_REL = "label_maps/training_seg_01.nii.gz"
PEERS = ("torchio", "cornucopia")
PIPELINES = ("ours",) + PEERS
RESULT_TAG = "@@GENBENCH "  # prefix of the worker's result line on stdout


# ----------------------------------------------------------------- helpers

def default_label_map() -> Path:
    from synthtools.evaluation import data_root
    return data_root() / MAP_REL


def peak_rss_gib() -> float:
    """Peak resident set size of this process, GiB (Linux: ru_maxrss in KiB).
    A child inherits its parent's ru_maxrss at fork, hence the small parent."""
    import resource
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":  # bytes there
        kib /= 1024
    return kib / 1024 ** 2


def load_map(path) -> tuple:
    """(uint8 index map, voxel size): from a label-map file via the project's
    loader, or from the .npz cache that the ``--prepare`` child writes for the
    workers (the NIfTI loader's transient int64/float64 copies, ~0.35 GiB,
    would otherwise dominate every worker's peak RSS at 128^3)."""
    import numpy as np
    import torch
    if str(path).endswith(".npz"):
        with np.load(path) as z:
            return torch.from_numpy(z["index_map"].copy()), tuple(float(v) for v in z["voxsize"])
    from synthtools.training.generator.dataset import load_index_map
    from synthtools.training.generator.labels import LabelSet
    return load_index_map(str(path), LabelSet())


def seed_all(seed: int) -> None:
    """Seed the global RNGs the peers draw from (ours takes a torch.Generator)."""
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------- pipelines
# Each builder gets the 1 mm uint8 index map (what ours is trained from), its
# voxel size, and the output size N; it returns (run(seed) -> image tensor,
# library version). The output voxel size is FOV / N (FOV = 256 mm here).

def _grid(index_map, voxsize, size: int) -> tuple[int, float]:
    """Integer stride from the label map to an N^3 grid, and its voxel size."""
    shape = tuple(index_map.shape)
    if len(set(shape)) != 1 or shape[0] % size:
        raise SystemExit(f"size {size} must divide the label-map shape {shape}")
    stride = shape[0] // size
    return stride, float(voxsize[0]) * stride


def build_ours(index_map, voxsize, size: int):
    import torch
    from synthtools.training.generator.labels import LabelSet
    from synthtools.training.generator.synth import Synthesizer, SynthConfig, generator
    stride, v = _grid(index_map, voxsize, size)
    synth = Synthesizer(SynthConfig(), num_labels=len(LabelSet()))
    out_shape, out_vox = (size,) * 3, (v,) * 3

    def run(seed: int):
        # Directly onto the output grid from the 1 mm map (no pre-downsampling).
        return synth(index_map, voxsize, generator(seed), out_shape=out_shape, out_voxsize=out_vox).image

    return run, torch.__version__


def build_torchio(index_map, voxsize, size: int):
    import warnings

    import numpy as np
    import SimpleITK as sitk
    import torchio as tio
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    warnings.filterwarnings("ignore")  # e.g. the elastic 'max displacement vs grid spacing' warning

    stride, v = _grid(index_map, voxsize, size)
    labels = index_map[::stride, ::stride, ::stride].contiguous()[None]  # (1, N, N, N) uint8, nearest
    affine = np.diag([v, v, v, 1.0])
    subject = tio.Subject(label=tio.LabelMap(tensor=labels, affine=affine))
    transform = tio.Compose([
        # Ours: A = T R Z E, translation U(-30, 30) mm, rotation U(-30, 30) deg,
        # scaling U(0.9, 1.1), shear U(-0.1, 0.1). TorchIO has no shear; the
        # other three ranges match (translation in mm, per axis).
        tio.RandomAffine(scales=(0.9, 1.1), degrees=30, translation=30, isotropic=False,
                         center="image", default_pad_label=0, label_interpolation="nearest"),
        # Ours: SVF (7 squaring steps) of a noise field with U{2..16} control
        # points per axis and max displacement U(0, 20) mm, composed with the
        # affine and applied in ONE nearest resampling. TorchIO: a B-spline
        # with a fixed grid (9 points, the middle of 2..16; it needs >= 5),
        # displacements U(-20, 20) mm per control point, not diffeomorphic,
        # and a SECOND nearest resampling of the labels (SimpleITK).
        tio.RandomElasticDeformation(num_control_points=9, max_displacement=20, locked_borders=2,
                                     label_interpolation="nearest"),
        # Ours: one mean per label U(0, 1), no per-label noise (std 0), a
        # lookup-table gather. TorchIO: same ranges, one masked pass per label.
        tio.RandomLabelsToImage(label_key="label", image_key="image", default_mean=(0.0, 1.0),
                                default_std=(0.0, 0.0)),
        # Ours: x * (1 - s B), s ~ U(0, 0.5), B a smooth [0, 1] field from
        # U{2..4} control points. TorchIO: exp of a degree-3 polynomial with
        # coefficients U(-0.5, 0.5): a different field model, similar scale.
        tio.RandomBiasField(coefficients=0.5, order=3),
        # Ours: per-axis Gaussian SD U(0, 2) mm. Same in TorchIO (mm).
        tio.RandomBlur(std=(0.0, 2.0)),
        # Ours: additive Gaussian noise, SD U(0, 0.1). Same.
        tio.RandomNoise(mean=0.0, std=(0.0, 0.1)),
        # Ours: gamma = min-max normalisation then x ** U(0.5, 1.5). TorchIO's
        # RandomGamma does not normalise, so an explicit RescaleIntensity
        # precedes it; log_gamma U(log 0.5, log 1.5) gives the same range
        # (log-uniform instead of uniform).
        tio.RescaleIntensity(out_min_max=(0.0, 1.0)),
        tio.RandomGamma(log_gamma=(math.log(0.5), math.log(1.5))),
        # Ours: per-axis acquired resolution U(1, 4) mm on ALL axes, linear
        # down/up-sampling. TorchIO: ONE random axis downsampled by U(1, 4 / v)
        # (same 1..4 mm at 1 mm, 2..4 mm at 2 mm), linear.
        tio.RandomAnisotropy(axes=(0, 1, 2), downsampling=(1.0, max(1.0, 4.0 / v))),
        # Not in TorchIO: our partial-FOV mask/crop (a cheap broadcast product).
    ])

    def run(seed: int):
        seed_all(seed)
        return transform(subject)["image"].data

    return run, tio.__version__


def build_cornucopia(index_map, voxsize, size: int):
    import cornucopia as cc
    from cornucopia.random import Uniform
    stride, v = _grid(index_map, voxsize, size)
    labels = index_map[::stride, ::stride, ::stride].long()[None]  # (1, N, N, N), nearest
    fov = size * v  # mm; cornucopia gives translations and warps as fractions of the FOV
    transform = cc.SynthFromLabelTransform(
        # Ours: linear upsampling of every smooth field (warp, bias). order=1
        # is also cornucopia's fast setting.
        order=1,
        # Affine: translation 30 mm, rotation 30 deg, shear 0.1, scaling
        # 0.9..1.1 -- the same ranges (translation as a fraction of the FOV).
        translations=30.0 / fov, rotation=30.0, shears=0.1, zooms=0.1,
        # Warp: max displacement U(0, 20 mm), U{2..16} control points, SVF with
        # 7 scaling-and-squaring steps: the same model. cornucopia resamples
        # the labels once (nearest), like ours.
        elastic=20.0 / fov, elastic_nodes=16, elastic_steps=7,
        # GMM: ours has no texture smoothing (cornucopia's gmm_fwhm) and draws
        # background like any label; cornucopia keeps background at 0.
        gmm_fwhm=False,
        # Bias: U{2..4} control points, strength U(0, 0.5). cornucopia's field
        # spans [1 - s, 1 + s], ours [1 - s, 1].
        bias=4, bias_strength=0.5,
        gamma=Uniform(0.5, 1.5),
        # Blur: ours SD U(0, 2) mm per axis; cornucopia: isotropic FWHM
        # U(0, 2.355 * 2 mm), in voxels.
        motion_fwhm=2.0 * math.sqrt(8 * math.log(2)) / v,
        # Downsampling: ours per-axis U(1, 4) mm; cornucopia: 3D or one thick
        # slice axis, U(1, r) x the voxel size -> r = 4 mm / v.
        resolution=max(1.0, 4.0 / v),
        # Noise: ours SD U(0, 0.1); snr=10 -> SD U(0, 0.1) (chi noise in
        # cornucopia, no g-factor map in ours).
        snr=10, gfactor=False,
        # Not in cornucopia: partial-FOV crop. Extra there: a final quantile
        # normalisation (ours: min-max in the gamma step).
    )

    def run(seed: int):
        seed_all(seed)
        image, _ = transform(labels)
        return image

    return run, getattr(cc, "__version__", "?")


BUILDERS = {"ours": build_ours, "torchio": build_torchio, "cornucopia": build_cornucopia}


# ----------------------------------------------------------------- worker

def worker(args) -> int:
    """Time one pipeline at one size; print one RESULT_TAG + JSON line."""
    limit_threads(args.threads)
    result = {"name": args.worker, "size": args.size}
    try:
        import torch
        torch.set_num_threads(args.threads)
        index_map, voxsize = load_map(args.label_map)
        result["voxsize_mm"] = _grid(index_map, voxsize, args.size)[1]
        try:
            run, version = BUILDERS[args.worker](index_map, voxsize, args.size)
        except ImportError as e:  # the peer is not installed (or does not import)
            result.update(status="unavailable", error=f"{type(e).__name__}: {e}")
            print(RESULT_TAG + json.dumps(result), flush=True)
            return 0
        rss_before = peak_rss_gib()  # imports + map + pipeline set-up, before the first sample
        times, shape = [], None
        for i in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            image = run(i)
            dt = time.perf_counter() - t0
            shape = tuple(image.shape[-3:])
            del image
            if i >= args.warmup:
                times.append(dt)
        if shape != (args.size,) * 3:
            raise RuntimeError(f"{args.worker} made an image of shape {shape}, expected {(args.size,) * 3}")
        result.update(status="ok", version=version, torch=torch.__version__, threads=torch.get_num_threads(),
                      median_s=statistics.median(times), times_s=times, peak_rss_gb=peak_rss_gib(),
                      rss_before_first_sample_gb=rss_before)
    except Exception as e:  # report, don't crash the whole benchmark
        result.update(status="failed", error=f"{type(e).__name__}: {e}")
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------- parent

def prepare(args) -> int:
    """Child: resolve the label map, convert it once to a uint8 .npz cache."""
    result = {}
    try:
        path = Path(args.label_map) if args.label_map else default_label_map()
        result["path"] = str(path)
        if not path.is_file():
            result["status"] = "missing"
        else:
            import numpy as np
            index_map, voxsize = load_map(path)
            np.savez(args.prepare, index_map=index_map.numpy(), voxsize=np.asarray(voxsize))
            result.update(status="ok", shape=list(index_map.shape), voxsize=list(voxsize))
    except Exception as e:
        result.update(status="failed", error=f"{type(e).__name__}: {e}")
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


def spawn(name: str, size: int, args) -> dict:
    r = run_child(["--worker", name, "--size", str(size), "--repeats", str(args.repeats),
                   "--warmup", str(args.warmup), "--label-map", str(args.label_map)],
                  args, timeout=args.timeout if args.timeout > 0 else None)
    r.setdefault("name", name)
    r.setdefault("size", size)
    return r


def run_child(extra: list[str], args, timeout=None) -> dict:
    """Run this script with ``extra`` arguments in a fresh process; return
    its RESULT_TAG line as a dict (status 'failed' if there is none)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(args.threads)] + extra
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        env[var] = str(args.threads)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"status": "failed", "error": f"child exited {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1][len(RESULT_TAG):])


def row_for_size(size: int, results: dict[str, dict], args) -> dict:
    ours = results["ours"]
    vox = next((r["voxsize_mm"] for r in results.values() if "voxsize_mm" in r), 256 / size)
    vox = int(vox) if float(vox).is_integer() else vox
    row = {"size": size, "voxsize_mm": vox,
           "ours_s": ours.get("median_s"), "ours_peak_rss_gb": ours.get("peak_rss_gb")}
    unavailable, versions = {}, {}
    if ours.get("status") != "ok":
        unavailable["ours"] = ours.get("error")
    for peer in PEERS:
        r = results.get(peer)
        ok = r is not None and r.get("status") == "ok"
        row[f"{peer}_s"] = r.get("median_s") if ok else None
        row[f"{peer}_peak_rss_gb"] = r.get("peak_rss_gb") if ok else None
        if r is None:
            unavailable[peer] = "not requested (--peers)"
        elif not ok:
            unavailable[peer] = f"{r.get('status')}: {r.get('error')}"
        else:
            versions[peer] = r.get("version")
    peer_times = [row[f"{p}_s"] for p in PEERS if row[f"{p}_s"] is not None]
    row["speedup_vs_fastest_peer"] = (min(peer_times) / row["ours_s"]
                                      if peer_times and row["ours_s"] else None)
    row["rss_before_first_sample_gb"] = {k: r["rss_before_first_sample_gb"] for k, r in results.items()
                                         if "rss_before_first_sample_gb" in r}
    row.update(repeats=args.repeats, warmup=args.warmup, threads=args.threads,
               torch=ours.get("torch"), versions=versions, unavailable=unavailable)
    return row


def _fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def markdown(rows: list[dict], args) -> str:
    cpu = cpu_name()
    head = ["| size | voxel (mm) | ours (s) | ours peak RSS (GiB) | torchio (s) | torchio peak RSS (GiB) "
            "| cornucopia (s) | cornucopia peak RSS (GiB) | speedup vs fastest peer |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    body = [f"| {r['size']}^3 | {r['voxsize_mm']} | {_fmt(r['ours_s'])} | {_fmt(r['ours_peak_rss_gb'], '.2f')} "
            f"| {_fmt(r['torchio_s'])} | {_fmt(r['torchio_peak_rss_gb'], '.2f')} "
            f"| {_fmt(r['cornucopia_s'])} | {_fmt(r['cornucopia_peak_rss_gb'], '.2f')} "
            f"| {_fmt(r['speedup_vs_fastest_peer'], '.2f')}{'x' if r['speedup_vs_fastest_peer'] else ''} |"
            for r in rows]
    versions = {k: v for r in rows for k, v in r["versions"].items()}
    notes = sorted({f"{k}: {v}" for r in rows for k, v in r["unavailable"].items()})
    lines = ["# Generator benchmark", "",
             f"Full pipeline (label map in memory -> corrupted image), median of {args.repeats} samples after "
             f"{args.warmup} warm-up, {args.threads} threads, one subprocess per pipeline and size "
             f"(peak RSS = that process's ru_maxrss). `python benchmarks/generator.py` on "
             f"{_dt.date.today().isoformat()}, label map `{Path(args.label_map).name}`, CPU: {cpu}, "
             f"torch {rows[0].get('torch')}"
             + "".join(f", {k} {v}" for k, v in sorted(versions.items())) + ".", "",
             *head, *body]
    if notes:
        lines += ["", "Not measured: " + "; ".join(notes) + "."]
    if args.repeats < 10:
        lines += ["", f"**Smoke run only**: {args.repeats} repeat(s); the spec asks for the median of >= 10."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 128],
                   help="output sizes N (N^3 voxels of 256/N mm); default: 256 128")
    p.add_argument("--repeats", type=int, default=10, help="timed samples per pipeline (median); default 10")
    p.add_argument("--warmup", type=int, default=2, help="untimed samples first; default 2")
    p.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS) + ["none"],
                   help="peer pipelines to run ('none' for ours only); default: torchio cornucopia")
    p.add_argument("--threads", type=int, default=2, help="torch / SimpleITK / OpenMP threads; default 2")
    p.add_argument("--label-map", type=Path, default=None,
                   help=f"label map (default: <data root>/{MAP_REL})")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                   help="folder for generator.jsonl and generator.md; default benchmarks/results")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker (0: none); default 3600")
    p.add_argument("--worker", choices=PIPELINES, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")

    if args.worker:
        return worker(args)

    if args.prepare:
        return prepare(args)

    # The parent stays small (standard library only): on Linux a child starts
    # with its parent's ru_maxrss, so a parent that loaded the map or imported
    # torch would set a floor under every worker's peak. The map is resolved
    # and converted in a child instead; workers read the small uint8 cache.
    peers = [] if "none" in args.peers else list(dict.fromkeys(args.peers))
    with tempfile.TemporaryDirectory(prefix="genbench-") as tmp:
        cache = Path(tmp) / "index_map.npz"
        info = run_child(["--prepare", str(cache)] + (["--label-map", str(args.label_map)] if args.label_map else []),
                         args, timeout=600)
        if info.get("status") == "missing":
            print(f"SKIP generator benchmark: label map not found at {info.get('path')} "
                  f"(set SYNTHTOOLS_DATA or pass --label-map)", file=sys.stderr)
            return 0
        if info.get("status") != "ok":
            print(f"generator benchmark: cannot read the label map: {info.get('error')}", file=sys.stderr)
            return 1
        source, args.label_map = Path(info["path"]), cache
        rows = run_sizes(args, peers)
        args.label_map = source

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generator.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (args.out / "generator.md").write_text(markdown(rows, args))
    print(f"# wrote {args.out / 'generator.jsonl'} and {args.out / 'generator.md'}", file=sys.stderr)
    return 0


def run_sizes(args, peers: list[str]) -> list[dict]:
    rows = []
    for size in args.sizes:
        results = {}
        for name in ["ours"] + peers:
            print(f"# {name} @ {size}^3 ...", file=sys.stderr, flush=True)
            results[name] = spawn(name, size, args)
            r = results[name]
            print(f"#   {r.get('status')}: " + (f"{r['median_s']:.3f} s, peak RSS {r['peak_rss_gb']:.2f} GiB"
                                                if r.get("status") == "ok" else str(r.get("error"))),
                  file=sys.stderr, flush=True)
        row = row_for_size(size, results, args)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
