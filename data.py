"""Datasets, label noise, decoding, batching and augmentation for train.py and eval.py.

Sources (cfg["dataset"]):
- "digits": scikit-learn's 1,797 real 8x8 handwritten digits, fixed stratified split 1,437/360.
- "synthetic": CIFAR-shaped 32x32x3 uint8 with class-dependent structure and superclasses of 5
  classes (coarse_label), generated in-process; any size / number of classes.
- "cifar10", "cifar100": the Hub (uoft-cs/cifar10, uoft-cs/cifar100) or a local copy in
  cfg["data_dir"] (LOCAL_FORMATS).
- "imagenet": the Hub (ILSVRC/imagenet-1k, validation as test) or an image folder of train/ and val/.
- "clothing1m": the release in cfg["data_dir"] (clothing1m_splits): paths and labels, no image copied.
- any other Hub id, or a local folder / parquet layout, with image_column / label_column.

After loading every source has the standard columns `image` (an Image feature, or raw HWC uint8
bytes with an `image_shape` column), `label` (int), optionally `coarse_label` and the key column.
The train split then gets label noise (noise.add_label_noise: `label` noisy, `clean_label`,
`is_noisy`, `example_key`); the test split stays clean and map-style.

Training input: TrainBatches is the one batch source train.py loops over. It takes the path that
prepare_data chose from the data (DatasetInfo.input_path, recorded in config.json):

    prepare_data(cfg) -> train, test, info;  TrainBatches by info.input_path:
      memory   one image size, fits   to_tensors: decoded once -> uint8 [N,C,H,W] on the device
               MEMORY_BUDGET          -> rows of the epoch's permutation, sliced on the device
                                      -> augment_batch (pad, crop, flip), drawn on the device
      decode   photos, any size       DecodedSteps: the step's rows read from the memory-mapped
                                      Arrow split -> photo_batch (warp, crop, flip) in DataLoader
                                      workers -> pinned -> .to(device, non_blocking=True)
      stream   --streaming            StreamEpoch: split_dataset_by_node once, shuffle buffer,
                                      set_epoch -> decoded in DataLoader workers -> pinned -> device
                                      (images of one small size: augment_batch there, as memory)
    each path -> {"image" uint8, "label", "index"} per step -> train.py normalises and steps

Evaluation: EvalBatches gives the examples (fixed-size data decoded once onto the device and sliced;
photos per batch with warp + centre crop, in workers) and predict their logits, on every process.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import math
import os
import pickle
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import datasets
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from datasets.distributed import split_dataset_by_node
from PIL import Image

import noise

DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "imagenet", "clothing1m")
HUB_IDS = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100", "imagenet": "ILSVRC/imagenet-1k"}
# Published per-channel statistics of the CIFAR training sets (fractions of 255).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
# Photos (the decode-per-batch path) are normalised with ImageNet's statistics, as ImageNet weights expect.
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# The keys prepare_data reads; their defaults are train.py's (RECIPES): pass train.resolve_args(...) or config.json.
CFG_KEYS = (
    "dataset",
    "data_dir",
    "streaming",
    "image_column",  # None: "image", else "img", else the first Image column
    "label_column",  # None: "fine_label" if present, else "label"
    "key_column",  # None: hash of the stored image bytes
    "noise",
    "noise_rate",
    "noise_seed",
    "noise_file",
    "noise_key",
    "noise_pairs",  # None: the dataset's preset (cifar10, cifar100, synthetic)
    "synthetic_size",  # train examples; the test split has a fifth as many
    "synthetic_classes",
    "in_memory",  # auto: in memory when the images have one size <= image_size and fit MEMORY_BUDGET
    "resize",  # photo path: warp to resize x resize
    "image_size",  # photo path: random (train) / centre (eval) crop of image_size x image_size
    "augment",  # photo path: paper (warp, crop, flip) or rrc (RandomResizedCrop + flip)
)
MEMORY_BUDGET = 4 * 2**30  # decoded bytes of a training split that auto holds in memory
SIZE_PROBE = 256  # images whose header sizes decide the path of a stream
LOCAL_FORMATS = (
    "a save_to_disk folder (DatasetDict with train and test), a folder of parquet files "
    "(train-*.parquet and test-*.parquet), an image folder (train/ and test/ or val/, a subfolder per "
    "class), or the python-pickle folder cifar-10-batches-py / cifar-100-python"
)
STREAM_SHARDS = 64  # shards of an in-memory split turned into a stream (divisible by 1, 2, 4, 8 ...)
STATS_EXAMPLES = 10_000  # mean/std from the first examples of the train split, in stored order
DATA_SEED = 0  # the synthetic data and the digits split are fixed; only the noise seed varies
TEST_SPLITS = ("test", "validation")


class DatasetInfo(NamedTuple):
    """What train.py/eval.py need to know about the data."""

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int  # augmentation padding: 4 for 32x32, 1 for 8x8 digits
    flip: bool  # horizontal flips (False for digits)
    pairs_preset: str | None  # asymmetric noise pairs preset: "cifar10", "cifar100", "synthetic" or None
    input_path: str = "memory"  # memory (decoded once), decode (per batch, in workers) or stream
    resize: int = 0  # > 0: images are decoded per example with the photo transform (warp to resize, crop image_size)
    augment: str = "pad"  # pad (pad-crop-flip in batches), paper or rrc
    clean_subset: bool = False  # clean labels are known for a subset only (Clothing1M): has_clean_label column
    noise: noise.NoiseSpec | None = None  # the training split's label noise, resolved once (noise.resolve_noise)

    @property
    def photo(self) -> bool:
        """Whether images are decoded per example with the photo transform (decode, and a stream of photos)."""
        return self.resize > 0


# ---------------------------------------------------------------------------------------------
# In-memory sources: raw pixels


def raw_image_column(images: np.ndarray) -> pa.Array:
    """uint8 [N,H,W,C] -> arrow binary array of N raw HWC blobs (zero-copy)."""
    # by hand: pa.array of bytes takes 150 ms and a datasets Array3D 5 s for 50,000 CIFAR images, this 0.02 ms
    flat = np.ascontiguousarray(images, dtype=np.uint8).reshape(-1)
    n, size = len(images), int(np.prod(images.shape[1:]))
    large = flat.size >= 2**31  # int32 offsets address at most 2 GiB
    offsets = np.arange(n + 1, dtype=np.int64 if large else np.int32) * size
    kind = pa.large_binary() if large else pa.binary()
    return pa.Array.from_buffers(kind, n, [None, pa.py_buffer(offsets), pa.py_buffer(flat)])


def pixel_dataset(
    images: np.ndarray, labels: np.ndarray, class_names: list[str], coarse: np.ndarray | None = None
) -> Any:
    """In-memory Dataset from uint8 [N,H,W,C]: image (raw bytes), image_shape, label, coarse_label."""
    n = len(images)
    shape = pa.array([list(images.shape[1:])] * n, type=pa.list_(pa.int32()))
    columns = {"image": raw_image_column(images), "image_shape": shape, "label": pa.array(labels, pa.int64())}
    features = datasets.Features(
        image=datasets.Value("binary"),
        image_shape=datasets.List(datasets.Value("int32")),
        label=datasets.ClassLabel(names=list(class_names)),
    )
    if coarse is not None:
        columns["coarse_label"] = pa.array(coarse, pa.int64())
        features["coarse_label"] = datasets.Value("int64")
    return datasets.Dataset.from_dict(columns, features=features)


def digits_splits() -> tuple[Any, Any]:
    """scikit-learn's digits as uint8 0..255 [N,8,8,1], fixed stratified split 1,437 / 360."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(labels)), test_size=360, stratify=labels, random_state=DATA_SEED)
    train, test = np.sort(train), np.sort(test)  # keep the stored order: "dataset order" for noise files
    names = [str(d) for d in range(10)]
    return pixel_dataset(images[train], labels[train], names), pixel_dataset(images[test], labels[test], names)


def synthetic_images(n: int, num_classes: int, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n CIFAR-shaped uint8 images [n,32,32,3] and balanced labels; class c = its superclass's
    pattern + its own pattern (8x8-pixel blocks), cyclically shifted by up to 3 pixels, plus uniform
    pixel noise."""
    protos_rng = np.random.default_rng([DATA_SEED, num_classes])  # same prototypes for train and test
    coarse = np.asarray(noise.synthetic_fine_to_coarse(num_classes))
    group = protos_rng.normal(size=(coarse.max() + 1, 4, 4, 3))
    own = protos_rng.normal(size=(num_classes, 4, 4, 3))
    protos = (0.8 * group[coarse] + 0.8 * own).repeat(8, axis=1).repeat(8, axis=2).astype(np.float32)
    rng = np.random.default_rng([DATA_SEED, num_classes, split_seed])
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for start in range(0, n, 10_000):  # chunks bound the float32 temporaries
        lab = labels[start : start + 10_000]
        m = len(lab)
        rows = (np.arange(32) + rng.integers(-3, 4, size=(m, 1))) % 32  # per-example cyclic shift
        cols = (np.arange(32) + rng.integers(-3, 4, size=(m, 1))) % 32
        x = protos[lab[:, None, None], rows[:, :, None], cols[:, None, :]]
        x *= 40.0
        x += 128.0
        x += 100.0 * (rng.random(size=x.shape, dtype=np.float32) - 0.5)  # pixel noise, sd ~29
        images[start : start + m] = np.clip(x, 0, 255, out=x)
    return images, labels


def synthetic_splits(size: int, num_classes: int) -> tuple[Any, Any]:
    """Synthetic train (size) and test (size // 5) splits with coarse_label = class // 5."""
    if num_classes < 2 or size < num_classes:
        raise ValueError(
            f"synthetic data needs >= 2 classes and >= 1 example per class: got {size} examples, {num_classes} classes"
        )
    coarse = np.asarray(noise.synthetic_fine_to_coarse(num_classes))
    names = [f"class{c}" for c in range(num_classes)]
    splits = []
    for n, split_seed in ((size, 1), (max(num_classes, size // 5), 2)):
        images, labels = synthetic_images(n, num_classes, split_seed)
        splits.append(pixel_dataset(images, labels, names, coarse[labels]))
    return splits[0], splits[1]


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR python batches: only numpy array reconstruction, no arbitrary code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only the allowed numpy globals (numpy.core.* is numpy._core.* in numpy 2)."""
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR python batch")
        return super().find_class(module.replace("numpy.core", "numpy._core"), name)


def _read_batch(path: str) -> dict[str, Any]:
    """One CIFAR python batch file -> dict with str keys."""
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(
            f"{path} is not a CIFAR python batch ({e}): use the files of the official "
            f"cifar-10-batches-py / cifar-100-python download"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a CIFAR python batch (it holds a {type(obj).__name__}, not a dict)")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _find_pickle_folder(path: str, name: str) -> tuple[str, str] | None:
    """(folder, "cifar10"|"cifar100") of a python-pickle CIFAR copy at or under path, else None."""
    want = {"cifar10": ("cifar10",), "cifar100": ("cifar100",)}.get(name, ("cifar10", "cifar100"))
    layouts = {
        "cifar10": ("cifar-10-batches-py", "data_batch_1", "test_batch"),
        "cifar100": ("cifar-100-python", "train", "test"),
    }
    for kind in want:
        sub, train_file, test_file = layouts[kind]
        for folder in (path, os.path.join(path, sub)):
            if all(os.path.isfile(os.path.join(folder, f)) for f in (train_file, test_file)):
                return folder, kind
    return None


def _pixels_chw(data: Any) -> np.ndarray:
    """CIFAR rows of 3072 bytes (R plane, G plane, B plane) -> uint8 [N,32,32,3]."""
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def pickle_splits(folder: str, kind: str) -> tuple[Any, Any]:
    """Train/test Datasets from cifar-10-batches-py or cifar-100-python (torchvision's download)."""
    if kind == "cifar10":
        batches = [_read_batch(os.path.join(folder, f"data_batch_{i}")) for i in range(1, 6)]
        test = _read_batch(os.path.join(folder, "test_batch"))
        names = list(noise.CIFAR10_CLASSES)
        out = []
        for parts in (batches, [test]):
            images = np.concatenate([_pixels_chw(b["data"]) for b in parts])
            labels = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in parts])
            out.append(pixel_dataset(images, labels, names))
        return out[0], out[1]
    meta_path = os.path.join(folder, "meta")
    if os.path.isfile(meta_path):
        meta = _read_batch(meta_path)
        fine = [n.decode() if isinstance(n, bytes) else n for n in meta.get("fine_label_names", [])]
        if fine and tuple(fine) != noise.CIFAR100_FINE_NAMES:
            raise ValueError(f"{meta_path}: fine_label_names differ from CIFAR-100's: is this CIFAR-100?")
    out = []
    for split in ("train", "test"):
        b = _read_batch(os.path.join(folder, split))
        labels = np.asarray(b["fine_labels"], dtype=np.int64)
        coarse = np.asarray(b["coarse_labels"], dtype=np.int64)
        out.append(pixel_dataset(_pixels_chw(b["data"]), labels, list(noise.CIFAR100_FINE_NAMES), coarse))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# Hub and local files


def hub_error(repo_id: str, why: str) -> str:
    """One-line message for an unusable Hub: what happened and what to pass instead."""
    return (
        f"cannot load '{repo_id}' from the Hugging Face Hub ({why}): pass --data-dir with a local copy: {LOCAL_FORMATS}"
    )


def load_hub(repo_id: str, streaming: bool) -> Any:
    """load_dataset(repo_id) (DatasetDict or IterableDatasetDict); a dataset neither reachable nor cached is a ValueError.

    Offline is the libraries' business: with HF_HUB_OFFLINE=1 only the cache is read; without a
    network the Hub client gives up after its retries (each bounded by HF_HUB_ETAG_TIMEOUT, about
    25 s when connections are refused) and datasets falls back to the latest cached copy.
    """
    try:
        return datasets.load_dataset(repo_id, streaming=streaming)
    except ConnectionError:
        offline = datasets.config.HF_HUB_OFFLINE
        why = "offline mode (HF_HUB_OFFLINE=1)" if offline else "the Hub is unreachable"
        raise ValueError(hub_error(repo_id, f"{why} and there is no cached copy")) from None
    except datasets.exceptions.DatasetNotFoundError:
        raise ValueError(hub_error(repo_id, "no such dataset, or it is private")) from None


def load_local(path: str, name: str, streaming: bool) -> tuple[Any, Any]:
    """(train, test) from a local pickle folder, save_to_disk folder, parquet/image folder or parquet file."""
    if not os.path.exists(path):
        raise ValueError(f"data path {path!r} does not exist: pass --data-dir with {LOCAL_FORMATS}")
    found = _find_pickle_folder(path, name) if os.path.isdir(path) else None
    if found is not None:
        return pickle_splits(*found)
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        return _pick_splits(datasets.load_from_disk(path), path, name)
    script = os.path.join(path, os.path.basename(os.path.normpath(path)) + ".py")
    if os.path.isfile(script):
        raise ValueError(
            f"{path} holds a loading script ({script}), which datasets no longer runs (nor do we): "
            f"point --data-dir at the data files (parquet, images) or a save_to_disk folder"
        )
    if os.path.isfile(os.path.join(path, "state.json")):
        raise ValueError(f"{path} holds one saved split: save a DatasetDict with 'train' and 'test' splits")
    data_files = None
    if os.path.isfile(path):
        if not path.endswith(".parquet"):
            raise ValueError(f"cannot read {path}: pass {LOCAL_FORMATS}")
        test = re.sub(r"train", "test", os.path.basename(path))
        test_path = os.path.join(os.path.dirname(path), test)
        if test == os.path.basename(path) or not os.path.isfile(test_path):
            raise ValueError(f"{path} needs a test split: name the files train*.parquet and test*.parquet")
        data_files, path = {"train": path, "test": test_path}, "parquet"
    unreadable = (
        FileNotFoundError,
        datasets.exceptions.DataFilesNotFoundError,
        datasets.exceptions.DatasetGenerationError,
    )
    try:
        return _pick_splits(datasets.load_dataset(path, data_files=data_files, streaming=streaming), path, name)
    except unreadable as e:
        raise ValueError(f"cannot read a dataset from {path} ({type(e).__name__}): pass {LOCAL_FORMATS}") from None


def _pick_splits(dd: Any, where: str, name: str = "") -> tuple[Any, Any]:
    """(train, test) of a DatasetDict / IterableDatasetDict ('validation' stands in for 'test'; for
    ImageNet it comes first: imagenet-1k's test labels are withheld)."""
    order = TEST_SPLITS[::-1] if name == "imagenet" else TEST_SPLITS
    test = next((s for s in order if s in dd), None)
    if "train" not in dd or test is None:
        raise ValueError(f"{where} has splits {', '.join(dd)}: it needs 'train' and 'test' (or 'validation')")
    return dd["train"], dd[test]


def materialise(stream: Any) -> Any:
    """IterableDataset -> in-memory Dataset with the same features (images stay encoded)."""
    tables = list(stream.with_format("arrow").iter(batch_size=1000))
    features = features_of(stream)
    table = pa.concat_tables(tables) if tables else features.arrow_schema.empty_table()
    return datasets.Dataset.from_dict({c: table.column(c) for c in table.column_names}, features=features)


# ---------------------------------------------------------------------------------------------
# Standard columns


def features_of(ds: Any) -> Any:
    """Features of a Dataset or IterableDataset (a stream that does not know them: from its first row's schema)."""
    if ds.features is not None:
        return ds.features
    head = next(iter(ds.with_format("arrow").iter(batch_size=1)))
    return datasets.Features.from_arrow_schema(head.schema)


def find_image_column(features: Mapping[str, Any], given: str | None = None) -> str | None:
    """The image column: `given`, else "image", else "img", else the first Image feature (None: none found)."""
    if given is not None:
        return given
    found = next((c for c in ("image", "img") if c in features), None)
    return found or next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)


def arrow_columns(ds: Any, *names: str) -> Any:
    """ds in arrow format with those of names it has (image_shape: raw pixels only; clean_label, is_noisy: noised)."""
    return ds.select_columns([c for c in names if c in features_of(ds)]).with_format("arrow")


def _rename_table(table: pa.Table, mapping: dict[str, str]) -> pa.Table:
    """Arrow batch with columns renamed by mapping."""
    return table.rename_columns([mapping.get(c, c) for c in table.column_names])


def _rename_columns(ds: Any, mapping: dict[str, str]) -> Any:
    """Rename columns; for a stream as an arrow map (IterableDataset.rename_columns runs per example
    in Python and decodes and re-encodes every image)."""
    mapping = {old: new for old, new in mapping.items() if old != new}
    if not mapping:
        return ds
    if isinstance(ds, datasets.Dataset):
        return ds.rename_columns(mapping)
    features = features_of(ds)
    renamed = datasets.Features({mapping.get(c, c): f for c, f in features.items()})
    fn = functools.partial(_rename_table, mapping=mapping)
    return ds.with_format("arrow").map(fn, batched=True, batch_size=1000, features=renamed).with_format(None)


def standardize(ds: Any, image_column: str | None, label_column: str | None, key_column: str | None) -> Any:
    """Keep and rename to image, label (+ image_shape, coarse_label, key column); check their types."""
    features = features_of(ds)
    columns = list(features)
    listing = ", ".join(columns)
    image_column = find_image_column(features, image_column)
    if image_column not in features:
        which = repr(image_column) if image_column else "(no 'image', 'img' or Image column)"
        raise ValueError(f"no image column {which}: the dataset has columns {listing} (pass --image-column)")
    if label_column is None:
        label_column = next((c for c in ("fine_label", "label", "labels") if c in features), None)
    if label_column not in features:
        which = repr(label_column) if label_column else "(no 'fine_label', 'label' or 'labels')"
        raise ValueError(f"no label column {which}: the dataset has columns {listing} (pass --label-column)")
    if key_column is not None and key_column not in features:
        raise ValueError(f"no key column {key_column!r}: the dataset has columns {listing}")
    label_type = features[label_column]
    if not isinstance(label_type, datasets.ClassLabel) and not (
        isinstance(label_type, datasets.Value) and label_type.dtype.startswith(("int", "uint"))
    ):
        raise ValueError(
            f"label column {label_column!r} holds {label_type}: it must hold integer class ids (pass --label-column)"
        )
    keep = [image_column, label_column]
    carried = ("image_shape", "coarse_label", "clean_label", "is_noisy", "has_clean_label", key_column)
    keep += [c for c in carried if c and c in features and c not in keep]
    ds = _rename_columns(ds.select_columns(keep), {image_column: "image", label_column: "label"})
    image_type = features_of(ds)["image"]
    raw = isinstance(image_type, datasets.Value) and image_type.dtype in ("binary", "large_binary")
    if raw and "image_shape" not in keep:
        ds = ds.cast_column("image", datasets.Image())  # encoded bytes (PNG/JPEG) without the feature type
    elif not raw and not isinstance(image_type, datasets.Image):
        raise ValueError(
            f"image column {image_column!r} holds {image_type}: it must be an Image feature (pass --image-column)"
        )
    if isinstance(ds, datasets.IterableDataset) and not raw:
        ds = ds.cast_column("image", datasets.Image(decode=False))  # a stream of files would decode every image itself
    return ds


def load_splits(cfg: Mapping[str, Any]) -> tuple[Any, Any]:
    """(train, test) with standard columns; train is an IterableDataset when cfg['streaming']."""
    name, streaming = cfg["dataset"], bool(cfg["streaming"])
    if name == "digits":
        train, test = digits_splits()
    elif name == "clothing1m":
        if not cfg["data_dir"]:
            raise ValueError(
                "--dataset clothing1m needs --data-dir with the release (images/, *_label_kv.txt, key lists)"
            )
        train, test = clothing1m_splits(os.path.expanduser(cfg["data_dir"]))
    elif name == "synthetic":
        train, test = synthetic_splits(int(cfg["synthetic_size"]), int(cfg["synthetic_classes"]))
    elif cfg["data_dir"] or looks_local(name):
        train, test = load_local(os.path.expanduser(cfg["data_dir"] or name), name, streaming)
    else:
        train, test = _pick_splits(load_hub(HUB_IDS.get(name, name), streaming), HUB_IDS.get(name, name), name)
    if streaming and isinstance(train, datasets.Dataset):
        train = train.to_iterable_dataset(num_shards=max(1, min(STREAM_SHARDS, len(train))))
    if isinstance(test, datasets.IterableDataset):
        test = materialise(test)  # evaluation is map-style: every test example counts once
    standard = (cfg["image_column"], cfg["label_column"], cfg["key_column"])
    return standardize(train, *standard), standardize(test, *standard)


# ---------------------------------------------------------------------------------------------
# Decoding


def _mode_channels(mode: str) -> int:
    """Channels an image of PIL mode `mode` decodes to: 1 for grey modes, else 3 (RGB)."""
    return 1 if mode in ("1", "L", "LA", "I", "I;16", "F") else 3


def _decode_encoded(images: pa.Array, channels: int | None) -> np.ndarray:
    """Image-feature structs (bytes or path) -> uint8 [B,H,W,C] via PIL (all in the first image's size)."""
    blobs, paths = images.field("bytes").to_pylist(), images.field("path").to_pylist()
    out = None
    for i, (blob, path) in enumerate(zip(blobs, paths)):
        im = Image.open(io.BytesIO(blob) if blob is not None else path)
        if out is None:
            channels = channels or _mode_channels(im.mode)
            mode = "L" if channels == 1 else "RGB"
            out = np.empty((len(blobs), im.size[1], im.size[0], channels), dtype=np.uint8)
        if im.mode != mode:
            im = im.convert(mode)
        if im.size != (out.shape[2], out.shape[1]):
            first, this = f"{out.shape[2]}x{out.shape[1]}", f"{im.size[0]}x{im.size[1]}"
            raise ValueError(f"images have different sizes ({first} and {this}): resize them to one size first")
        out[i] = np.frombuffer(im.tobytes(), dtype=np.uint8).reshape(out.shape[1:])  # leaner than np.asarray(im)
    return out if out is not None else np.zeros((0, 1, 1, channels or 3), dtype=np.uint8)


def _decode_raw(images: pa.Array, shapes: pa.Array) -> np.ndarray:
    """Raw HWC blobs (binary array) + their shapes -> uint8 [B,H,W,C] without copying per image."""
    if len(images) == 0:
        return np.zeros((0, 1, 1, 1), dtype=np.uint8)
    shape = tuple(shapes[0].as_py())
    # by hand: pyarrow has no public zero-copy view of binary values (to_numpy + join, a cast to fixed-size
    # binary, a datasets Array3D take 220, 14 and 60-740 ms for 50,000 CIFAR images, this 0.03 ms)
    offset_type = np.int64 if pa.types.is_large_binary(images.type) else np.int32
    offsets = np.frombuffer(images.buffers()[1], dtype=offset_type)[images.offset : images.offset + len(images) + 1]
    if np.any(np.diff(offsets) != int(np.prod(shape))):
        raise ValueError(f"raw images have different sizes (expected {shape}): resize them to one size first")
    data = np.frombuffer(images.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.reshape((len(images),) + shape)


def decode_table(table: pa.Table, channels: int | None = None) -> np.ndarray:
    """Arrow batch with an `image` column -> uint8 [B,H,W,C] (raw bytes reshaped, or PNG/JPEG decoded)."""
    images = table.column("image").combine_chunks()
    if pa.types.is_struct(images.type):
        return _decode_encoded(images, channels)
    return _decode_raw(images, table.column("image_shape").combine_chunks())


def nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 [B,H,W,C] -> contiguous uint8 tensor [B,C,H,W] (numpy's copy: torch's permute().contiguous()
    on uint8 is ~30x slower on a busy CPU)."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _int_column(table: pa.Table, name: str) -> torch.Tensor:
    """An integer arrow column as an int64 tensor."""
    return torch.from_numpy(table.column(name).to_numpy().astype(np.int64))


def table_batch(table: pa.Table, images: bool = True) -> dict[str, torch.Tensor]:
    """Arrow batch -> {"image": uint8 [B,C,H,W], "label", "clean_label": int64 [B], "is_noisy": bool [B]}."""
    images = nchw(decode_table(table)) if images else torch.zeros(0, dtype=torch.uint8)
    label = _int_column(table, "label")
    clean = _int_column(table, "clean_label") if "clean_label" in table.column_names else label.clone()
    if "is_noisy" in table.column_names:
        is_noisy = torch.from_numpy(table.column("is_noisy").to_numpy(zero_copy_only=False).astype(bool))
    else:
        is_noisy = torch.zeros_like(label, dtype=torch.bool)  # a clean split
    return {"image": images, "label": label, "clean_label": clean, "is_noisy": is_noisy}


def to_tensors(ds: Any) -> dict[str, torch.Tensor]:
    """Map-style split -> {"image": uint8 [N,C,H,W], "label", "clean_label": int64 [N], "is_noisy": bool [N]}.

    Decodes the whole split on each call: the caller keeps the result (TrainBatches holds it on the device).
    Only for fixed-size data: photos are decoded per batch (EvalBatches, TrainBatches).
    """
    if not isinstance(ds, datasets.Dataset):
        raise ValueError("to_tensors needs a map-style split: stream with stream_batches, or use data.materialise")
    return table_batch(arrow_columns(ds, "image", "image_shape", "label", "clean_label", "is_noisy")[:])


def label_tensors(ds: Any) -> dict[str, torch.Tensor]:
    """Map-style split -> {"label", "clean_label": int64 [N], "is_noisy": bool [N]} without touching the images."""
    out = table_batch(arrow_columns(ds, "label", "clean_label", "is_noisy")[:], images=False)
    out.pop("image")
    return out


# ---------------------------------------------------------------------------------------------
# Augmentation and normalisation (batched, on any device)


def augment_batch(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [B,C,H,W] -> uint8 [B,C,H,W]: zero-pad by `pad`, random HxW crop per example, and a
    horizontal flip with p = 0.5 per example when `flip`; one gather, no loop over examples.

    The random offsets are drawn on x's device, from `generator` (on that device) or its global RNG: no copy.
    """
    b, c, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=x.device)
    rows = dy + torch.arange(h, device=x.device)  # [B,H] rows of the padded image
    cols = dx + torch.arange(w, device=x.device)  # [B,W]
    if flip:
        mirrored = torch.rand((b, 1), generator=generator, device=x.device) < 0.5
        cols = torch.where(mirrored, cols.flip(1), cols)  # crop then mirror = read the crop's columns backwards
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    wp = w + 2 * pad
    index = ((rows * wp)[:, :, None] + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)  # flat pixel
    return torch.gather(padded.reshape(b, c, -1), 2, index).reshape(b, c, h, w)


@functools.lru_cache(maxsize=16)
def _scale_shift(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale 1/(255 std) and shift -mean/std as [1,C,1,1] tensors on device (made once)."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (1.0 / (255.0 * std_t)).to(device), (-mean_t / std_t).to(device)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [B,C,H,W] -> float32 (x/255 - mean) / std per channel, computed as x * scale + shift."""
    scale, shift = _scale_shift(tuple(mean), tuple(std), x.device)
    # in place on a fresh copy: ~3x faster than torch.addcmul's broadcasting path on CPU
    return x.to(torch.float32, copy=True).mul_(scale).add_(shift)


# ---------------------------------------------------------------------------------------------
# Photos: decoded per example with the paper's transform (Section 5.1 (2)), in DataLoader workers

JPEG_DRAFT = True  # JPEGs decode at the smallest DCT scale still >= the needed size (bench.py --only photo)
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop defaults
UNREADABLE = (OSError, SyntaxError, ValueError, EOFError)  # PIL's errors for truncated or foreign files


def crop_box(
    rng: np.random.Generator | None, width: int, height: int, resize: int, size: int, augment: str
) -> tuple[tuple[float, float, float, float], bool]:
    """(box in source pixels, flip) of one example; resizing the box to size x size is the transform.

    paper: warp to resize x resize, random size x size crop, flip p = 0.5; rrc: RandomResizedCrop
    (scale 0.08-1, ratio 3/4-4/3, torchvision's sampling) + flip; rng None (evaluation): warp, centre crop.
    """
    sx, sy = width / resize, height / resize  # source pixels per warped pixel
    if rng is None:
        off = int(round((resize - size) / 2.0))
        return (off * sx, off * sy, (off + size) * sx, (off + size) * sy), False
    if augment == "paper":
        top, left = rng.integers(0, resize - size + 1, size=2)
        return (left * sx, top * sy, (left + size) * sx, (top + size) * sy), bool(rng.random() < 0.5)
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*RRC_SCALE)
        aspect = math.exp(rng.uniform(math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            return (left, top, left + w, top + h), bool(rng.random() < 0.5)
    ratio = width / height  # fallback: the centred crop of the whole image clamped to the ratio range
    w, h = (
        (width, round(width / RRC_RATIO[0]))
        if ratio < RRC_RATIO[0]
        else ((round(height * RRC_RATIO[1]), height) if ratio > RRC_RATIO[1] else (width, height))
    )
    top, left = (height - h) // 2, (width - w) // 2
    return (left, top, left + w, top + h), bool(rng.random() < 0.5)


def decode_photo(
    source: Any, rng: np.random.Generator | None, resize: int, size: int, augment: str, shape: Any = None
) -> np.ndarray:
    """One image (encoded bytes, a path, or raw HWC bytes of `shape`) -> uint8 [size,size,3] RGB, transformed.

    Greyscale, CMYK, RGBA and palette images become RGB. Raises one of UNREADABLE for a bad file.
    """
    if shape is not None:
        h, w, c = shape
        im = Image.frombuffer("L" if c == 1 else "RGB", (w, h), source, "raw")
    else:
        im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    width, height = im.size
    box, flip = crop_box(rng, width, height, resize, size, augment)
    if JPEG_DRAFT and im.format == "JPEG":
        bw, bh = box[2] - box[0], box[3] - box[1]
        im.draft("RGB" if im.mode == "RGB" else None, (math.ceil(width * size / bw), math.ceil(height * size / bh)))
        fx, fy = im.size[0] / width, im.size[1] / height
        box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
    if im.mode != "RGB":
        im = im.convert("RGB")
    im = im.resize((size, size), Image.BILINEAR, box=box)
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(im)


def _image_sources(table: pa.Table) -> tuple[list[Any], list[str | None], list[Any]]:
    """(source per row: bytes or path, file name or None, raw shape or None) of an arrow batch's image column."""
    images = table.column("image").combine_chunks()
    if pa.types.is_struct(images.type):
        blobs, paths = images.field("bytes").to_pylist(), images.field("path").to_pylist()
        return [b if b is not None else p for b, p in zip(blobs, paths)], paths, [None] * len(paths)
    shapes = table.column("image_shape").to_pylist()
    return images.to_pylist(), [None] * len(shapes), shapes


def photo_batch(
    table: pa.Table, index: np.ndarray, info: DatasetInfo, seed: int | None, key: tuple[int, ...] = ()
) -> dict[str, Any]:
    """Arrow rows -> {"image": uint8 [B,3,S,S], "label", "index": int64 [B], "bad": names of unreadable images}.

    Training (seed given): crop and flip drawn from default_rng([seed, *key, example]), example = the
    row's index (its position in the batch when the index is -1), so they are a pure function of
    (seed, step, example); an unreadable image's slot takes the next readable image of the batch, so
    the batch keeps its size. Evaluation (seed None): warp and centre crop; an unreadable image is zeros.
    """
    sources, names, shapes = _image_sources(table)
    size = info.image_size
    images = np.zeros((len(sources), size, size, 3), dtype=np.uint8)
    good, bad = [], []
    for i, (source, shape) in enumerate(zip(sources, shapes)):
        example = int(index[i]) if index[i] >= 0 else i
        rng = None if seed is None else np.random.default_rng([seed, *key, example])
        try:
            images[i] = decode_photo(source, rng, info.resize, size, info.augment, shape)
            good.append(i)
        except UNREADABLE:
            bad.append(i)
    take = np.arange(len(sources))
    if bad and seed is not None:
        if not good:
            raise ValueError(
                f"every image of a training batch is unreadable ({names[0] or 'row ' + str(index[0])}, ...): "
                "check the data files"
            )
        take[bad] = [good[k % len(good)] for k in range(len(bad))]
    out = {
        "image": nchw(images[take]),
        "index": torch.from_numpy(np.asarray(index, dtype=np.int64)[take]),
        "bad": [names[i] or f"row {index[i]}" for i in bad],
    }
    for column in ("label", "clean_label"):
        if column in table.column_names:
            out[column] = torch.from_numpy(table.column(column).to_numpy().astype(np.int64)[take])
    if "is_noisy" in table.column_names:
        out["is_noisy"] = torch.from_numpy(table.column("is_noisy").to_numpy(zero_copy_only=False).astype(bool)[take])
    return out


@functools.lru_cache(maxsize=2)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of one epoch: randperm drawn from (seed, epoch)."""
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def process_batch(global_batch: int, world: int, accum: int = 1) -> int:
    """Examples per process and step (per micro-batch with accum > 1): train.check_processes checks that it divides."""
    return global_batch // (world * accum)


def step_part(num_examples: int, global_batch: int, step: int, rank: int, world: int) -> tuple[int, slice]:
    """(epoch, the positions in that epoch's permutation) that process `rank` trains on at `step`: step i of
    epoch e = divmod(step, N // global_batch) takes positions [i B, (i + 1) B), process rank its rank-th 1/world."""
    epoch, i = divmod(step, num_examples // global_batch)
    size = process_batch(global_batch, world)
    start = i * global_batch + rank * size
    return epoch, slice(start, start + size)


def step_rows(num_examples: int, global_batch: int, seed: int, step: int, rank: int, world: int) -> torch.Tensor:
    """Rows of the map-style split that process `rank` trains on at `step`: its share of the global batch."""
    epoch, part = step_part(num_examples, global_batch, step, rank, world)
    return _epoch_permutation(num_examples, seed, epoch)[part]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """tensor on device without the host waiting: a CUDA copy goes from pinned memory, non_blocking."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()  # the caching host allocator keeps it until the copy has run
    return tensor.to(device, non_blocking=True)


def batch_loader(
    dataset: torch.utils.data.Dataset,
    device: torch.device,
    workers: int,
    sampler: Any = None,
    batch_size: int | None = None,
) -> torch.utils.data.DataLoader:
    """DataLoader decoding in `workers` processes (0: in this one); batches pinned when they go to a CUDA
    device, so that .to(device, non_blocking=True) neither waits nor stages through pageable memory."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        pin_memory=device.type == "cuda",
    )


class DecodedSteps(torch.utils.data.Dataset):
    """Item `step`: this process's training batch of that step, read from the memory-mapped Arrow split
    and decoded with the training transform (in a DataLoader worker)."""

    def __init__(self, ds: Any, info: DatasetInfo, global_batch: int, seed: int, rank: int, world: int):
        self.ds = arrow_columns(ds, "image", "image_shape", "label")
        self.info, self.global_batch, self.seed, self.rank, self.world = info, global_batch, seed, rank, world

    def __len__(self) -> int:
        return 2**40  # steps are unbounded; the sampler picks them

    def __getitem__(self, step: int) -> dict[str, Any]:
        rows = step_rows(len(self.ds), self.global_batch, self.seed, step, self.rank, self.world).numpy()
        return photo_batch(self.ds[rows.tolist()], rows, self.info, self.seed, key=(step,))


class DecodedExamples(torch.utils.data.Dataset):
    """Item `items` (a list of positions in `rows`): those examples of a map-style split as one uint8 image
    batch [B,3,S,S], decoded with warp + centre crop (in a DataLoader worker); an unreadable image is zeros."""

    def __init__(self, ds: Any, info: DatasetInfo, rows: torch.Tensor):
        self.ds = arrow_columns(ds, "image", "image_shape")
        self.info, self.rows = info, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, items: list[int]) -> torch.Tensor:
        rows = self.rows[items].numpy()
        batch = photo_batch(self.ds[rows.tolist()], rows, self.info, None)
        for name in batch["bad"]:
            print(f"warning: unreadable image {name} evaluated as a black image", file=sys.stderr)
        return batch["image"]


def process_part(rows: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Process rank's contiguous 1/world of rows, padded with the last row to ceil(N / world) each: gathered
    in rank order and cut to N, the parts give back rows' order."""
    per = -(-len(rows) // world)
    padded = torch.cat([rows, rows[-1:].expand(per * world - len(rows))])
    return padded[rank * per : (rank + 1) * per]


class EvalBatches:
    """Examples `rows` (default all) of a map-style split for predict: iterating gives this process's part
    (process_part) as uint8 image batches of batch_size on `device`; label, clean_label, is_noisy and index
    (the row) hold every example's values on `device`, in rows' order.

    Fixed-size data (not info.photo) is decoded once onto the device and sliced there; photos are decoded per
    batch in `workers` DataLoader workers with warp + centre crop, pinned for a CUDA device.
    """

    def __init__(
        self,
        ds: Any,
        info: DatasetInfo,
        device: torch.device,
        batch_size: int,
        rows: torch.Tensor | None = None,
        rank: int = 0,
        world: int = 1,
        workers: int = 0,
    ):
        rows = torch.arange(len(ds)) if rows is None else rows
        labels = label_tensors(ds)
        self.label, self.clean_label, self.is_noisy = (
            to_device(labels[k][rows], device) for k in ("label", "clean_label", "is_noisy")
        )
        self.index, self.device, self.batch_size = to_device(rows, device), device, batch_size
        self.part, self.images, self.photos = process_part(rows, rank, world), None, None
        if info.photo:
            sampler = torch.utils.data.BatchSampler(range(len(self.part)), batch_size, drop_last=False)
            self.photos = batch_loader(DecodedExamples(ds, info, self.part), device, workers, sampler=sampler)
        else:
            start = int(self.part[0])
            whole = torch.equal(self.part, torch.arange(start, start + len(self.part)))  # a test split's part
            rows = slice(start, start + len(self.part)) if whole else self.part.tolist()  # a slice reads 10x faster
            self.images = to_device(nchw(decode_table(arrow_columns(ds, "image", "image_shape")[rows])), device)

    def __len__(self) -> int:
        return len(self.label)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.photos is not None:
            yield from (images.to(self.device, non_blocking=True) for images in self.photos)
        else:
            yield from self.images.split(self.batch_size)


@torch.no_grad()
def predict(
    model: torch.nn.Module, batches: EvalBatches, info: DatasetInfo, channels_last: bool = False, gather: Any = None
) -> torch.Tensor:
    """fp32 logits [N, C] of batches' N examples in their order, on every process: each process runs its
    part in eval mode, gather (accelerator.gather; None for one process) joins the parts, the padding is cut.

    Lives here, beside EvalBatches, because the cut undoes process_part's padding; train.py's evaluation
    and eval.py both call it."""
    training = model.training
    model.eval()
    parts = []
    for images in batches:
        x = normalize(images, info.mean, info.std)
        parts.append(model(x.contiguous(memory_format=torch.channels_last) if channels_last else x).float())
    model.train(training)
    logits = torch.cat(parts)
    return (logits if gather is None else gather(logits))[: len(batches)]


# ---------------------------------------------------------------------------------------------
# Streaming


def default_workers(num_processes: int = 1) -> int:
    """DataLoader workers per process for decoding: the CPU cores per process, at most 4."""
    return max(1, min(4, (os.cpu_count() or 1) // max(1, num_processes)))


@dataclasses.dataclass(eq=False)  # eq=False: hashed by identity, as any Dataset
class StreamEpoch(torch.utils.data.IterableDataset):
    """One epoch of one process's share of a stream, as batches of tensors.

    Each (process, DataLoader worker) pair is one node of split_dataset_by_node, so the data is
    sharded exactly once: no example twice in an epoch, none dropped (except a partial last batch
    per worker when drop_last). Photos (info.photo) are decoded with the training transform,
    crops drawn from (seed, epoch, node, batch, example).
    """

    ds: Any
    batch_size: int
    seed: int
    epoch: int
    process_index: int
    num_processes: int
    shuffle_buffer: int
    drop_last: bool
    info: DatasetInfo | None = None
    key_column: str | None = None

    def _index(self, table: pa.Table) -> np.ndarray:
        """The integer key column's values, else -1 per row."""
        if self.key_column and pa.types.is_integer(table.schema.field(self.key_column).type):
            return table.column(self.key_column).to_numpy().astype(np.int64)
        return np.full(len(table), -1, dtype=np.int64)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Shard (reshard, split by node), shuffle(buffer, seed), set_epoch, decode, batch."""
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        rank = self.process_index * workers + worker_id
        # the Hub's CIFAR splits are one parquet file: reshard by row group before splitting
        node = split_dataset_by_node(self.ds.reshard(), rank=rank, world_size=self.num_processes * workers)
        # one input shard at a time: interleaving shards (the default 10) reads them in threads and,
        # for parquet, sleeps 5 s at the end of every pass (apache/arrow#45214); the shard order
        # is still shuffled by seed and epoch
        node = node.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer, max_buffer_input_shards=1)
        node = node.with_format("arrow")
        node.set_epoch(self.epoch)  # after with_format, which returns a dataset at epoch 0
        batches = node.iter(batch_size=self.batch_size, drop_last_batch=self.drop_last)
        for number, table in enumerate(batches):
            if self.info is not None and self.info.photo:
                yield photo_batch(table, self._index(table), self.info, self.seed, key=(self.epoch, rank, number))
            else:
                yield {**table_batch(table), "index": torch.from_numpy(self._index(table))}


def stream_batches(
    train_iterable: Any,
    batch_size: int,
    seed: int,
    epoch: int,
    process_index: int,
    num_processes: int,
    shuffle_buffer: int = 10_000,
    drop_last: bool = True,
    num_workers: int | None = None,
    info: DatasetInfo | None = None,
    key_column: str | None = None,
    device: torch.device | None = None,
) -> Iterator[dict[str, Any]]:
    """One epoch of streamed training batches for this process (dict of CPU tensors as to_tensors, plus index).

    Shards exactly once (do not also pass it through accelerator.prepare). Processes may get
    different numbers of batches per epoch: loop by steps, not by epochs in lockstep.
    drop_last: every batch has batch_size examples (each worker drops its last partial batch).
    num_workers: decoding processes (default default_workers); 0 decodes in this process.
    info.photo: photos, decoded with the training transform (photo_batch).
    device: where the batches go next (a CUDA device: they come pinned, see batch_loader).
    """
    workers = default_workers(num_processes) if num_workers is None else num_workers
    epoch_ds = StreamEpoch(
        train_iterable,
        batch_size,
        seed,
        epoch,
        process_index,
        num_processes,
        shuffle_buffer,
        drop_last,
        info,
        key_column,
    )
    yield from batch_loader(epoch_ds, device or torch.device("cpu"), workers)


# ---------------------------------------------------------------------------------------------
# The one training batch source


class TrainBatches:
    """This process's training batches from start_step on, as dicts on `device`: image (uint8 [B,C,H,W],
    augmented), label (int64 [B]), index (int64 [B]: the row in the map-style split; for a stream the
    integer key column's value, else -1).

    memory: the split decoded once onto the device; the epoch's rows copied there once per epoch and
      sliced per step; augment_batch (pad-crop-flip) drawn on the device from (seed, step, process).
    decode: the same rows, read from the memory-mapped Arrow split and decoded per batch in DataLoader
      workers with the photo transform (crop and flip from (seed, step, row)), pinned for a CUDA device.
    stream: stream_batches epoch after epoch; a resume skips (reads again) the batches already seen.
    Unreadable images are skipped and counted (bad_files); more than max_bad_fraction of the split
    (of the examples seen, for a stream) stops the run with one line naming them.

    What determines the data (map-style): step t is step i of epoch e = divmod(t, N // global_batch) and
    takes rows [i B, (i + 1) B) of randperm(N) drawn on the CPU from seed * 1_000_003 + e (step_rows),
    process `rank` the rank-th of `world` equal parts; the crops and flips come from a generator seeded
    with seed * 1_000_003 + t * 1_009 + rank on the device (a CUDA device draws other values than the
    CPU, the same on every run). So a batch is a pure function of (seed, t, rank, world, device type),
    and a resume at any step continues byte-identically. Between log steps nothing is read back to the
    host and nothing is copied from pageable memory (tests/test_device_path.py).
    """

    def __init__(
        self,
        ds: Any,
        info: DatasetInfo,
        global_batch: int,
        seed: int,
        rank: int,
        world: int,
        start_step: int,
        device: torch.device,
        num_workers: int | None = None,
        max_bad_fraction: float = 0.01,
        key_column: str | None = None,
    ):
        self.ds, self.info, self.global_batch, self.seed = ds, info, global_batch, seed
        self.rank, self.world, self.start_step, self.device = rank, world, start_step, device
        self.workers = default_workers(world) if num_workers is None else num_workers
        self.max_bad_fraction, self.key_column = max_bad_fraction, key_column
        self.bad_files: set[str] = set()
        self.seen = 0
        if info.input_path != "stream" and len(ds) < global_batch:
            raise ValueError(f"--batch-size {global_batch} exceeds the {len(ds)} training examples")

    def _memory(self) -> Iterator[dict[str, torch.Tensor]]:
        """Rows of the split held on the device: the epoch's permutation (step_rows' order) is copied to the
        device once per epoch, without waiting, and each step slices it there."""
        t = to_tensors(self.ds)
        images, labels = t["image"].to(self.device), t["label"].to(self.device)
        order, epoch = None, None
        for step in itertools.count(self.start_step):
            e, part = step_part(len(labels), self.global_batch, step, self.rank, self.world)
            if e != epoch:
                order, epoch = to_device(_epoch_permutation(len(labels), self.seed, e), self.device), e
            rows = order[part]
            yield {"image": images[rows], "label": labels[rows], "index": rows}

    def _decoded(self) -> Iterator[dict[str, Any]]:
        """Batches decoded in DataLoader workers, in step order."""
        steps = DecodedSteps(self.ds, self.info, self.global_batch, self.seed, self.rank, self.world)
        yield from batch_loader(steps, self.device, self.workers, sampler=range(self.start_step, 2**40))

    def _stream(self) -> Iterator[dict[str, Any]]:
        """Streamed batches epoch after epoch, from start_step on."""
        epoch, seen, size = 0, 0, process_batch(self.global_batch, self.world)
        while True:
            for batch in stream_batches(
                self.ds,
                size,
                self.seed,
                epoch,
                self.rank,
                self.world,
                num_workers=self.workers,
                info=self.info,
                key_column=self.key_column,
                device=self.device,
            ):
                if seen >= self.start_step:
                    yield batch
                seen += 1
            epoch += 1

    def _count_bad(self, names: list[str], batch_examples: int) -> None:
        """Log new unreadable files; stop when they are more than max_bad_fraction of the data."""
        self.seen += batch_examples
        for name in names:
            if name not in self.bad_files:
                self.bad_files.add(name)
                print(f"warning: skipped unreadable image {name} ({len(self.bad_files)} so far)", file=sys.stderr)
        total = self.seen if self.info.input_path == "stream" else len(self.ds)
        if len(self.bad_files) > self.max_bad_fraction * total and (self.info.input_path != "stream" or total >= 1000):
            listed = ", ".join(sorted(self.bad_files)[:5])
            raise ValueError(
                f"{len(self.bad_files)} unreadable training images of {total}, more than "
                f"--max-bad-fraction {self.max_bad_fraction:g}: {listed}; fix or remove them"
            )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """One dict per step: the path's batch, moved to the device, pad-crop-flipped if not a photo batch."""
        source = {"memory": self._memory, "decode": self._decoded, "stream": self._stream}[self.info.input_path]()
        for step, batch in enumerate(source, self.start_step):
            self._count_bad(batch.pop("bad", []), len(batch["label"]))
            out = {k: batch[k].to(self.device, non_blocking=True) for k in ("image", "label", "index")}
            if not self.info.photo:
                # augmentation randomness is a pure function of (seed, step, process): exact on resume
                g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + step * 1_009 + self.rank)
                out["image"] = augment_batch(out["image"], self.info.pad, self.info.flip, generator=g)
            yield out


# ---------------------------------------------------------------------------------------------
# Entry point


def data_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The CFG_KEYS of a resolved configuration, converted to their types; KeyError names any missing key."""
    missing = [k for k in CFG_KEYS if k not in cfg]
    if missing:
        raise KeyError(
            f"data.prepare_data needs a resolved configuration (config.resolve or config.json); "
            f"missing {', '.join(missing)}"
        )
    c = {k: cfg[k] for k in CFG_KEYS}
    c["streaming"] = bool(c["streaming"])
    c["noise_rate"], c["noise_seed"] = float(c["noise_rate"]), int(c["noise_seed"])
    c["synthetic_size"], c["synthetic_classes"] = int(c["synthetic_size"]), int(c["synthetic_classes"])
    c["resize"], c["image_size"] = int(c["resize"]), int(c["image_size"])
    if c["in_memory"] not in ("auto", "yes", "no"):
        raise ValueError(f"--in-memory must be auto, yes or no, got {c['in_memory']!r}")
    if c["augment"] not in ("paper", "rrc"):
        raise ValueError(f"--augment must be paper or rrc, got {c['augment']!r}")
    if c["resize"] and not 1 <= c["image_size"] <= c["resize"]:  # resize 0: a run recorded on the memory path
        raise ValueError(
            f"--image-size {c['image_size']} must be between 1 and --resize {c['resize']} (the crop of the warped image)"
        )
    return c


def pairs_preset(name: str) -> str | None:
    """Asymmetric-noise pairs preset of a dataset name or Hub id (None: needs --noise-pairs)."""
    by_hub = {v: k for k, v in HUB_IDS.items()}
    name = by_hub.get(name, name)
    return name if name in noise.PAIR_PRESETS else None


def looks_local(name: str) -> bool:
    """True for names that can only be paths: existing, absolute/relative, or with a data file suffix."""
    suffixes = (".parquet", ".arrow", ".csv", ".json", ".jsonl", ".zip", ".tar")
    return os.path.exists(name) or name.startswith((".", "/", "~")) or name.endswith(suffixes)


def _check_dataset_name(name: str, data_dir: str | None) -> None:
    """Raise ValueError unless name is a built-in, a local path, or looks like a Hub id (owner/name)."""
    if name in DATASETS or data_dir or looks_local(name) or re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return
    raise ValueError(
        f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, "
        "a Hub id (owner/name), or a local folder/parquet file"
    )


def _channel_stats(train: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (fractions of 255) of the first STATS_EXAMPLES train images, in stored order."""
    if isinstance(train, datasets.IterableDataset):
        tables = list(train.take(STATS_EXAMPLES).with_format("arrow").iter(batch_size=1000))
    else:
        head = train.select(range(min(len(train), STATS_EXAMPLES)))
        tables = [arrow_columns(head, "image", "image_shape")[:]]
    images = np.concatenate([decode_table(t) for t in tables])
    total = np.zeros(images.shape[-1])
    squares = np.zeros(images.shape[-1])
    for start in range(0, len(images), 1000):  # float32 chunks bound the temporaries
        chunk = images[start : start + 1000].astype(np.float32) / 255.0
        total += chunk.sum(axis=(0, 1, 2), dtype=np.float64)
        squares += (chunk * chunk).sum(axis=(0, 1, 2), dtype=np.float64)
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 1e-12))
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


def _num_classes(train: Any, test: Any) -> int:
    """Classes from the ClassLabel feature, else 1 + the largest label id (a pass over a stream)."""
    feature = features_of(train)["label"]
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    largest = int(np.max(test.with_format("arrow")["label"].to_numpy(), initial=0))
    if isinstance(train, datasets.IterableDataset):
        for t in train.select_columns(["label"]).with_format("arrow").iter(batch_size=10_000):
            largest = max(largest, int(np.max(t.column("label").to_numpy(), initial=0)))
    else:
        largest = max(largest, int(np.max(train.with_format("arrow")["label"].to_numpy(), initial=0)))
    return largest + 1


def _header_shapes(table: pa.Table) -> set[tuple[int, int, int]]:
    """Distinct (height, width, channels) of an arrow batch's images, from the file headers (nothing decoded)."""
    sources, _, shapes = _image_sources(table)
    if shapes[:1] != [None]:
        return {tuple(s) for s in shapes}
    out = set()
    for source in sources:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            out.add((im.size[1], im.size[0], _mode_channels(im.mode)))
    return out


def one_size(ds: Any, limit: int | None = None) -> tuple[int, int, int] | None:
    """The (H, W, C) every image of the split has (of the first `limit`), or None when they differ or one is unreadable."""
    part = ds.take(limit) if limit is not None else ds
    shapes: set = set()
    try:
        for table in arrow_columns(part, "image", "image_shape").iter(batch_size=1000):
            shapes |= _header_shapes(table)
            if len(shapes) > 1:
                return None
    except UNREADABLE:
        return None
    return next(iter(shapes), None)


def choose_input_path(train: Any, in_memory: str, image_size: int) -> tuple[str, bool]:
    """(input path, photo transform?) from the data: memory when the images have one size, no larger than
    image_size (nothing to warp and crop), and the decoded split fits MEMORY_BUDGET (in_memory yes/no
    overrides), else decode; a stream stays a stream, with the photo transform unless its first
    SIZE_PROBE images have one such size."""
    small = lambda shape: shape is not None and max(shape[:2]) <= image_size  # noqa: E731
    if isinstance(train, datasets.IterableDataset):
        return "stream", not small(one_size(train, SIZE_PROBE))
    if in_memory == "no":
        return "decode", True
    first = one_size(train.select(range(min(1, len(train)))))
    if in_memory == "auto" and (not small(first) or len(train) * math.prod(first) > MEMORY_BUDGET):
        return "decode", True
    shape = one_size(train)
    if shape is not None:
        return "memory", False
    if in_memory == "yes":
        raise ValueError(
            "--in-memory yes needs images of one size, and these differ in size (or one is unreadable): "
            "use --in-memory auto to decode them per batch"
        )
    return "decode", True


CLOTHING1M_FILES = (
    "noisy_label_kv.txt",
    "clean_label_kv.txt",
    "noisy_train_key_list.txt",
    "clean_test_key_list.txt",
    "category_names_eng.txt",
)
CLOTHING1M_CLASSES = 14


def _read_lines(path: str) -> list[list[str]]:
    """Non-empty lines of a text file, split on whitespace."""
    with open(path, encoding="utf-8") as f:
        return [line.split() for line in f if line.strip()]


def _read_kv(path: str) -> dict[str, int]:
    """Clothing1M label file (lines 'images/a/bc/name.jpg LABEL') -> {key: label}, labels checked to be 0..13."""
    out = {}
    for number, parts in enumerate(_read_lines(path), 1):
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{path} line {number}: expected 'images/.../name.jpg LABEL', got {' '.join(parts)!r}")
        label = int(parts[1])
        if not 0 <= label < CLOTHING1M_CLASSES:
            raise ValueError(
                f"{path} line {number}: label {label} of {parts[0]} is outside 0..{CLOTHING1M_CLASSES - 1}"
            )
        out[parts[0]] = label
    return out


def clothing1m_splits(root: str) -> tuple[Any, Any]:
    """Clothing1M as released -> (train, test) Datasets of image paths (nothing copied).

    train: noisy_train_key_list with noisy labels; examples also in clean_label_kv carry their
    clean_label, is_noisy and has_clean_label (the others: clean_label = label, has_clean_label False).
    test: clean_test_key_list with clean labels. key: the release's key (images/a/bc/name.jpg).
    """
    missing = [f for f in CLOTHING1M_FILES if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise ValueError(
            f"{root} is not a Clothing1M release: missing {', '.join(missing)} "
            "(expected images/, the two *_label_kv.txt files and the key lists as distributed)"
        )
    names = [" ".join(parts) for parts in _read_lines(os.path.join(root, "category_names_eng.txt"))]
    if len(names) != CLOTHING1M_CLASSES:
        raise ValueError(
            f"{root}/category_names_eng.txt has {len(names)} class names: Clothing1M has {CLOTHING1M_CLASSES}"
        )
    noisy, clean = (_read_kv(os.path.join(root, f)) for f in ("noisy_label_kv.txt", "clean_label_kv.txt"))
    splits = []
    for key_file, labels, kv in (
        ("noisy_train_key_list.txt", noisy, "noisy_label_kv.txt"),
        ("clean_test_key_list.txt", clean, "clean_label_kv.txt"),
    ):
        keys = [parts[0] for parts in _read_lines(os.path.join(root, key_file))]
        unlabelled = [k for k in keys if k not in labels]
        if unlabelled:
            raise ValueError(f"{len(unlabelled)} keys of {key_file} have no label in {kv} (first: {unlabelled[0]})")
        paths = [os.path.join(root, k) for k in keys]
        absent = [p for p in paths if not os.path.isfile(p)]
        if absent:
            raise ValueError(
                f"{len(absent)} images of {key_file} are missing (first: {absent[0]}): copy the images/ folder"
            )
        label = [labels[k] for k in keys]
        columns: dict[str, Any] = {"image": paths, "label": label, "key": keys}
        features = {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=names),
            "key": datasets.Value("string"),
        }
        if labels is noisy:
            known = [k in clean for k in keys]
            columns["clean_label"] = [clean.get(k, labels[k]) for k in keys]
            columns["is_noisy"] = [c != n for c, n in zip(columns["clean_label"], label)]
            columns["has_clean_label"] = known
            features |= {
                "clean_label": datasets.ClassLabel(names=names),
                "is_noisy": datasets.Value("bool"),
                "has_clean_label": datasets.Value("bool"),
            }
        splits.append(datasets.Dataset.from_dict(columns, features=datasets.Features(features)))
    return splits[0], splits[1]


def train_eval_subset(train: Any, size: int | None) -> tuple[Any, torch.Tensor | None]:
    """(map-style split, rows) scored for the clean/noisy metrics: rows of the training split
    (train_eval_rows), or of the first `size` examples of a stream; rows None for none (size 0)."""
    if isinstance(train, datasets.IterableDataset):
        if not size:
            return train, None
        train = materialise(train.take(size))
    return train, train_eval_rows(train, size)


def clean_label_known(train: Any) -> torch.Tensor:
    """bool [N]: whether a map-style split's example has a known clean label (all, but Clothing1M's overlap)."""
    if "has_clean_label" not in train.column_names:
        return torch.ones(len(train), dtype=torch.bool)
    return torch.from_numpy(train.with_format("arrow")["has_clean_label"].to_numpy(zero_copy_only=False))


def train_eval_rows(train: Any, size: int | None) -> torch.Tensor | None:
    """Rows of a map-style training split scored for the clean/noisy metrics: with has_clean_label only
    those (Clothing1M's overlap with clean_label_kv.txt), else a fixed random subset; None for none."""
    candidates = torch.nonzero(clean_label_known(train)).squeeze(1)
    pick = candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(0))]
    pick = pick[: len(pick) if size is None else min(size, len(pick))]
    return pick if len(pick) else None


def prepare_data(cfg: Mapping[str, Any]) -> tuple[Any, Any, DatasetInfo]:
    """(train with label noise, clean map-style test, DatasetInfo) from the cfg keys in CFG_KEYS."""
    c = data_settings(cfg)
    name = str(c["dataset"])
    _check_dataset_name(name, c["data_dir"])
    preset = pairs_preset(name)
    pairs = c["noise_pairs"] or preset
    noise.check_noise_args(c["noise"], c["noise_rate"], pairs, c["noise_file"])  # before loading: what needs no data
    if name == "clothing1m" and c["key_column"] is None:
        c["key_column"] = "key"  # the release's image key: no hashing of a million files
    train, test = load_splits(c)
    num_classes = _num_classes(train, test)
    spec = noise.resolve_noise(
        c["noise"], c["noise_rate"], c["noise_seed"], num_classes, pairs, c["noise_file"], c["noise_key"]
    )
    features = features_of(train)
    clean_subset = "has_clean_label" in features and spec.kind == "none"
    if clean_subset:  # real noisy labels (Clothing1M): keep the known clean ones, key by the release's key
        train = train.map(lambda keys: {"example_key": keys}, input_columns=c["key_column"], batched=True)
    else:
        train = noise.add_label_noise(train, spec, key_column=c["key_column"], features=features)
    path, photo = choose_input_path(train, c["in_memory"], c["image_size"])
    known = {v: k for k, v in HUB_IDS.items()}.get(name, name)  # "uoft-cs/cifar10" is cifar10 too
    if photo:
        size, channels, pad, resize = c["image_size"], 3, 0, c["resize"]
        mean, std = CIFAR_STATS.get(known, IMAGENET_STATS)
    else:
        first = decode_table(test.select(range(1)).with_format("arrow")[:])
        size, channels, resize = int(first.shape[1]), int(first.shape[3]), 0
        pad = max(1, size // 8)
        mean, std = CIFAR_STATS[known] if known in CIFAR_STATS else _channel_stats(train)
    info = DatasetInfo(
        name=name,
        num_classes=num_classes,
        channels=channels,
        image_size=size,
        mean=mean,
        std=std,
        pad=pad,
        flip=name != "digits",
        pairs_preset=preset,
        input_path=path,
        resize=resize,
        augment=c["augment"] if photo else "pad",
        clean_subset=clean_subset,
        noise=spec,
    )
    return train, test, info


def stream_num_rows(train_ds: Any, key_column: str) -> int:
    """1 + the largest integer id in a stream's key column (one pass over that column alone)."""
    ids = [row[key_column] for row in train_ds.select_columns([key_column])]
    if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ValueError(f"--key-column {key_column} must hold non-negative integer ids for --method elr")
    return max(ids) + 1
