"""Rigid pilot, design C at step 0: the shipped synthseg U-Net as the feature
network of a rigid barycentre model, without any registration training.

    python runs/rigid_pilot/zeroshot.py PASSES [VOXSIZE_MM]

Prints the mean displacement error (mm) on the cases of benchmarks/reg.py.
Written before ``BarycenterAffine(activation="softmax")`` existed; it is the
same feature map: softmax over the 33 outputs, background channel dropped.
"""
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
import reg  # noqa: E402

from synthtools.morph.register import register_linear  # noqa: E402
from synthtools.nets.registration import BarycenterAffine  # noqa: E402
from synthtools.weights import Model, load_model  # noqa: E402
from synthtools.training.validation import data_root  # noqa: E402

torch.set_num_threads(2)
passes = int(sys.argv[1])
voxsize = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
seg = load_model("synthseg")
net = BarycenterAffine(3, 1, 32, features=[16, 24, 32, 48, 64], convs=2, rigid=True, activation="softmax")
net.unet.load_state_dict(seg.net.state_dict())
meta = {"task": "register", "input": dict(seg.meta["input"], voxsize=voxsize), "output": {"type": "rigid"},
        "inference": {"bf16": False, "passes": passes}}
model = Model(net.eval(), meta, None)
errors = {}
for p in reg.load_pairs(data_root(), "rigid", 20, 20):
    errors[p["name"]] = reg.error_mm(register_linear(model, p["moving"], p["fixed"]), p)
for group in ("lesjak", "known"):
    print(group, round(float(np.mean([v for k, v in errors.items() if k.startswith(group)])), 2))
print(errors)
