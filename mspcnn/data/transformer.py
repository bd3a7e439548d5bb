"""Caffe's DataTransformer, vectorised over a batch, and its sequential Data
layer (docs/caffe_semantics.md; checked bit-exactly against Caffe
in tests/test_data_golden.py).

out = (x - mean) * scale on a crop of each image, optionally mirrored:

* mean: per-channel ``mean_values`` (one value is used for every channel) or a
  C x H x W mean image read at the cropped position (exclusive);
* crop (height, width): a centre crop in TEST, offsets (H - h) // 2 and
  (W - w) // 2; a uniformly random crop in TRAIN, offsets in [0, H - h] and
  [0, W - w], from a seeded generator;
* mirror: each image is flipped left-right with probability 1/2, in every
  phase (as Caffe does, TEST included);
* arithmetic in float32, in Caffe's order, so results are bit-identical.
"""
import os
import re

import numpy as np

from mspcnn.caffe import io as cio

__all__ = ["DataTransformer", "SequentialDataLayer", "IMAGE_SIZE", "CROP", "MEAN_BGR", "INPUT_SHAPE",
           "train_transformer", "feature_transformer", "parse_size",
           "image_size_for", "size_mismatch"]

# The network's input, as in the network of Xiao et al. (CVPR 2016), which MSP-CNN builds on:
# images stored at 160 x 64 (height x width), a 144 x 56 crop (random in training, centred for
# features), BGR minus a per-channel mean, no scaling.
IMAGE_SIZE = (160, 64)
CROP = (144, 56)
MEAN_BGR = (102, 102, 101)
INPUT_SHAPE = (3,) + CROP  # one network input: C x H x W


class DataTransformer:
    """Args:
        crop: (height, width), an int for a square crop, or None.
        mean_values: per-channel means (B, G, R), or one value for all.
        mean_image: C x H x W mean (e.g. from a .binaryproto), exclusive with
            mean_values; a path to a .binaryproto is accepted.
        scale: multiplier applied after the mean subtraction.
        mirror: random left-right flips (probability 1/2, every phase).
        phase: "TRAIN" (random crops) or "TEST" (centre crops).
        seed: seed of the crop offsets and mirror draws.
    """

    def __init__(self, crop=None, mean_values=None, mean_image=None, scale=1.0, mirror=False,
                 phase="TEST", seed=0):
        if mean_values is not None and len(mean_values) and mean_image is not None:
            raise ValueError("DataTransformer: mean_values and mean_image (mean_file) are exclusive")
        if phase not in ("TRAIN", "TEST"):
            raise ValueError(f"DataTransformer: phase must be 'TRAIN' or 'TEST', got {phase!r}")
        if isinstance(crop, int):
            crop = (crop, crop)
        self.crop = tuple(crop) if crop else None
        if isinstance(mean_image, (str, os.PathLike)):
            mean_image = cio.read_binaryproto(mean_image)
        self.mean_image = None if mean_image is None else np.asarray(mean_image, np.float32)
        self.mean_values = (None if mean_values is None or not len(mean_values)
                            else np.asarray(mean_values, np.float32))
        self.scale = np.float32(scale)
        self.mirror = mirror
        self.phase = phase
        self.rng = np.random.default_rng(seed)

    @classmethod
    def from_param(cls, transform_param, phase="TEST", seed=0, root="."):
        """From a Caffe TransformationParameter (crop_size, or the fork's
        crop_height/crop_width; a mean_file relative to ``root``)."""
        tp = transform_param
        crop = None
        if tp.crop_height or tp.crop_width:
            crop = (tp.crop_height, tp.crop_width)
        elif tp.crop_size:
            crop = (tp.crop_size, tp.crop_size)
        mean_image = os.path.join(root, tp.mean_file) if tp.HasField("mean_file") else None
        return cls(crop, list(tp.mean_value), mean_image, tp.scale, tp.mirror, phase, seed)

    def offsets(self, n, height, width):
        """Crop offsets (rows, cols) for a batch of n images of height x width."""
        if self.crop is None:
            return np.zeros(n, np.int64), np.zeros(n, np.int64)
        ch, cw = self.crop
        if ch > height or cw > width:
            raise ValueError(f"DataTransformer: crop {ch}x{cw} is larger than the image "
                             f"{height}x{width}")
        if self.phase == "TEST":
            return np.full(n, (height - ch) // 2), np.full(n, (width - cw) // 2)
        return (self.rng.integers(0, height - ch + 1, n), self.rng.integers(0, width - cw + 1, n))

    def __call__(self, batch, out=None):
        """N x C x H x W uint8 (or float) images -> N x C x h x w float32.
        ``batch`` may also be a list of C x H x W arrays of one shape (no stacking copy).
        ``out``: an N x C x h x w float32 array to write into (e.g. shared memory) instead of a new one."""
        if isinstance(batch, (list, tuple)):
            if not batch:
                raise ValueError("DataTransformer: empty batch")
            shapes = {tuple(np.shape(x)) for x in batch}
            if len(shapes) != 1 or len(next(iter(shapes))) != 3:
                raise ValueError(f"DataTransformer: images must be C x H x W of one shape, got "
                                 f"{sorted(shapes)}")
            n, (c, height, width) = len(batch), next(iter(shapes))
        else:
            batch = np.asarray(batch)
            if batch.ndim != 4:
                raise ValueError(f"DataTransformer: expected N x C x H x W images, got shape "
                                 f"{list(batch.shape)}")
            n, c, height, width = batch.shape
        if self.mean_image is not None and self.mean_image.shape != (c, height, width):
            raise ValueError(f"DataTransformer: mean image {list(self.mean_image.shape)} does not "
                             f"match images {[c, height, width]}")
        if self.mean_values is not None and len(self.mean_values) not in (1, c):
            raise ValueError(f"DataTransformer: {len(self.mean_values)} mean values for {c} "
                             "channels (give 1 or one per channel)")
        ch, cw = self.crop or (height, width)
        rows, cols = self.offsets(n, height, width)
        flips = (self.rng.integers(0, 2, n).astype(bool) if self.mirror
                 else np.zeros(n, bool))
        # Crops by slicing each image (a strided copy; much faster than one
        # fancy index over the batch), then the mean and scale over the batch.
        if out is None:
            crops = np.empty((n, c, ch, cw), np.float32)
        elif out.shape != (n, c, ch, cw) or out.dtype != np.float32:
            raise ValueError(f"DataTransformer: out is {out.dtype} {list(out.shape)}, the batch needs "
                             f"float32 {[n, c, ch, cw]}")
        else:
            crops = out
        for i in range(n):
            r, q = rows[i], cols[i]
            crops[i] = batch[i][:, r:r + ch, q:q + cw]
            if self.mean_image is not None:
                crops[i] -= self.mean_image[:, r:r + ch, q:q + cw]
        if self.mean_image is None and self.mean_values is not None:
            crops -= self.mean_values.reshape(1, -1, 1, 1)
        if self.scale != 1:
            crops *= self.scale
        for i in np.flatnonzero(flips):
            crops[i] = crops[i][..., ::-1].copy()
        return crops


class SequentialDataLayer:
    """Caffe's Data layer: reads a DatumDB in key order, batch by batch,
    wrapping around at the end (no shuffling, no dropped last batch), and
    transforms each batch. ``next()`` -> (N x C x h x w float32, N labels)."""

    def __init__(self, db, batch_size, transformer=None):
        if batch_size < 1:
            raise ValueError(f"SequentialDataLayer: batch_size must be >= 1, got {batch_size}")
        if len(db) == 0:
            raise ValueError(f"SequentialDataLayer: the database {db.path} is empty")
        self.db, self.batch_size = db, batch_size
        self.transformer = transformer
        self.position = 0

    def next(self):
        idx = [(self.position + i) % len(self.db) for i in range(self.batch_size)]
        self.position = (self.position + self.batch_size) % len(self.db)
        images, labels = self.db.read_batch(idx)
        data = self.transformer(images) if self.transformer else images.astype(np.float32)
        return data, labels.astype(np.float32)


def train_transformer(seed=0, crop=CROP):
    """The TRAIN-phase transform of the network's input: a random ``crop`` (height, width; [1]'s
    144 x 56 by default), a random left-right flip, minus MEAN_BGR; seeded."""
    return DataTransformer(crop, MEAN_BGR, mirror=True, phase="TRAIN", seed=seed)


def feature_transformer(crop=CROP):
    """The TEST-phase transform of the network's input: the centre ``crop`` (height, width; [1]'s
    144 x 56 by default), minus MEAN_BGR, no flip; for feature extraction."""
    return DataTransformer(crop, MEAN_BGR, phase="TEST")


def image_size_for(crop):
    """The stored image size (height, width) for a network input of ``crop``: [1]'s proportions,
    160 x 64 images for 144 x 56 crops, scaled (rounded), e.g. 71 x 27 for 64 x 24. The converter
    resizes to it and the feature tools resize image files to it before the centre crop."""
    return (round(crop[0] * IMAGE_SIZE[0] / CROP[0]), round(crop[1] * IMAGE_SIZE[1] / CROP[1]))


def read_image_for(path, crop=CROP):
    """An image file as the feature tools give it to the net: BGR, resized (OpenCV's bilinear filter, as
    the converter does) to :func:`image_size_for` ``crop``, C x H x W uint8, ready for
    :func:`feature_transformer`. Raises ValueError naming the file when OpenCV cannot read it."""
    import cv2

    img = cv2.imread(os.fspath(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot read image {path} (missing, or not an image OpenCV decodes)")
    height, width = image_size_for(crop)
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)


def size_mismatch(image_shape, crop, where="the images"):
    """A warning (a string) when images of ``image_shape`` (H x W, or C x H x W) are not the size
    :func:`image_size_for` gives for a net input of ``crop``: the crops then cover another part of
    the person than in training or in [1] (e.g. a 64 x 24 centre of a 160 x 64 image, written for a
    144 x 56 net), which runs but gives wrong features; None when they match."""
    stored, want = tuple(int(v) for v in tuple(image_shape)[-2:]), image_size_for(crop)
    if stored == want:
        return None
    return (f"{where} are {stored[0]} x {stored[1]}, but a net input of {crop[0]} x {crop[1]} expects images of "
            f"{want[0]} x {want[1]} (the crop would cover another part of the person); convert the images with "
            f"--input-size {crop[0]}x{crop[1]}, or give the input size the net was trained at")


def parse_size(text, what="size"):
    """``"HxW"`` (e.g. ``"72x28"``) -> (H, W), positive ints; ValueError naming ``what`` otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m or min(int(m.group(1)), int(m.group(2))) < 1:
        raise ValueError(f"{what}: expected HEIGHTxWIDTH in pixels (e.g. 144x56), got {text!r}")
    return int(m.group(1)), int(m.group(2))
