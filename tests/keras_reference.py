"""Reference outputs from Keras itself, for tests/test_freesurfer_weights.py.

Run with a Python that has TensorFlow (a separate venv; synthtools does not
need it)::

    python tests/keras_reference.py OUT_DIR {seg,robust} {keras2,keras3} SIZE

Builds the published SynthSeg architecture in Keras from the facts of
``mri_synthseg`` (``unet``/``conv_enc``/``conv_dec``, layer names included;
written here from those facts), gives every weight and batch-norm
statistic a random value, saves the weights with Keras's own
``save_weights`` (``keras2``: the legacy HDF5 layout FreeSurfer's files
have, through tf_keras; ``keras3``: Keras 3's ``.weights.h5``), and writes
a random input volume and the network's output (posteriors, channels last)
as .npy files; for robust also each stage's posteriors (stage1: ``unet``,
stage2: ``l2l``) so that each network can be compared on the same input.
"""
import os
import sys

MODE, FORMAT = sys.argv[2], sys.argv[3]
if FORMAT == "keras2":
    os.environ["TF_USE_LEGACY_KERAS"] = "1"   # tf.keras is then tf_keras (Keras 2)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

if FORMAT == "keras2":
    import tf_keras as keras  # noqa: E402
else:
    import keras  # noqa: E402

KL = keras.layers


def unet(x, prefix, labels, features=24, levels=5, kernel=3, skip_n=0, convs=2):
    """The neurite U-Net of mri_synthseg: ELU convolutions, one batch norm per
    level, skip = last conv of the level before its batch norm, merge [skip, up]."""
    skips = {}
    for lvl in range(levels):
        for c in range(convs):
            x = KL.Conv3D(features * 2 ** lvl, kernel, padding="same", activation="elu",
                          name=f"{prefix}_conv_downarm_{lvl}_{c}")(x)
        skips[lvl] = x
        x = KL.BatchNormalization(axis=-1, name=f"{prefix}_bn_down_{lvl}")(x)
        if lvl < levels - 1:
            x = KL.MaxPooling3D(2, padding="same", name=f"{prefix}_maxpool_{lvl}")(x)
    for lvl in range(levels - 1):
        x = KL.UpSampling3D(2, name=f"{prefix}_up_{levels + lvl}")(x)
        if lvl < levels - skip_n - 1:
            x = KL.Concatenate(axis=-1, name=f"{prefix}_merge_{levels + lvl}")([skips[levels - 2 - lvl], x])
        for c in range(convs):
            x = KL.Conv3D(features * 2 ** (levels - 2 - lvl), kernel, padding="same", activation="elu",
                          name=f"{prefix}_conv_uparm_{levels + lvl}_{c}")(x)
        x = KL.BatchNormalization(axis=-1, name=f"{prefix}_bn_up_{lvl}")(x)
    x = KL.Conv3D(labels, 1, name=f"{prefix}_likelihood")(x)
    return KL.Softmax(axis=-1, name=f"{prefix}_prediction")(x)


def one_hot_argmax(p, depth, name):
    return KL.Lambda(lambda t: tf.one_hot(tf.argmax(t, axis=-1), depth=depth, axis=-1), name=name)(p)


def build(mode, labels=33, groups=5):
    inp = KL.Input((None, None, None, 1), name="unet_input")
    if mode == "seg":
        return keras.Model(inp, unet(inp, "unet", labels))
    p1 = unet(inp, "unet", groups)
    p2 = unet(one_hot_argmax(p1, groups, "to_groups"), "l2l", groups, features=16, kernel=5, skip_n=2)
    x = KL.Concatenate(axis=-1, name="image_and_groups")([inp, one_hot_argmax(p2, groups, "to_denoised")])
    # Every stage's posteriors are outputs too, so each network can be compared on its own input.
    return keras.Model(inp, [unet(x, "unet2", labels), p1, p2])


def randomise(model, rng):
    """Random kernels/biases (scaled to keep activations O(1)), BN with random
    scale, shift, mean and a positive variance."""
    for layer in model.layers:
        values = []
        for w in layer.weights:
            name = w.name.split("/")[-1].split(":")[0]
            shape = tuple(w.shape)
            if name == "kernel":
                fan_in = int(np.prod(shape[:-1]))
                values.append(rng.normal(0, 1.5 / np.sqrt(fan_in), shape))
            elif name == "moving_variance":
                values.append(rng.uniform(0.5, 2.0, shape))
            elif name == "gamma":
                values.append(rng.uniform(0.5, 1.5, shape))
            else:   # bias, beta, moving_mean
                values.append(rng.normal(0, 0.1, shape))
        if values:
            layer.set_weights([v.astype("float32") for v in values])


def main(out_dir, size):
    rng = np.random.default_rng(0)
    model = build(MODE)
    randomise(model, rng)
    path = os.path.join(out_dir, "weights.h5" if FORMAT == "keras2" else "model.weights.h5")
    model.save_weights(path)
    x = rng.uniform(0, 1, (1, size, size, size, 1)).astype("float32")
    y = model.predict(x, verbose=0)
    np.save(os.path.join(out_dir, "input.npy"), x)
    if isinstance(y, (list, tuple)):   # robust: final output, then the two first stages
        y, *stages = y
        for k, s in enumerate(stages, start=1):
            np.save(os.path.join(out_dir, f"stage{k}.npy"), s)
    np.save(os.path.join(out_dir, "output.npy"), y)
    print(path)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[4]))
