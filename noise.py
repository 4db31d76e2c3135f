"""Label noise as `datasets` map transforms (paper Section 5.2), reproducible to the example.

Every decision is a pure function of (noise seed, stable example key, clean label): the key is a
key column (`key_column`) or, by default, a 64-bit BLAKE2b hash of the example's stored image
bytes (the encoded PNG/JPEG bytes, or the raw uint8 pixels for in-memory arrays). So the noisy
labels are identical in map-style and streaming mode, in any process or DataLoader worker, on any
run and in any shuffle order. (`map(with_indices=True)` is no stable key in streaming: indices
restart on every node/worker and follow the shuffled order.) The noise seed is separate from the
training seed. Note: the same pictures stored in another encoding (e.g. the CIFAR python pickles
vs the Hub's PNGs) hash differently; pass `key_column` for a key that survives re-encoding.

The result has `label` (noisy: the training target), `clean_label`, `is_noisy` and
`example_key` (the key as 16 hex digits, or the key column's value as a string).
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute in the drop filter

NOISE_KINDS = ("none", "symmetric", "asymmetric", "pairflip", "file")
PAIR_PRESETS = ("cifar10", "cifar100", "synthetic")
KEY_HASH = "blake2b-64 of the stored image bytes"

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The standard CIFAR-10 asymmetric noise (Patrini et al. 2017): truck->automobile, bird->airplane,
# deer->horse, cat<->dog.
CIFAR10_PAIRS = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}

# The real CIFAR-100 superclasses (Krizhevsky 2009, Table in "Learning multiple layers of features
# from tiny images"). Fine and coarse ids are the alphabetical positions of the names, as in the
# dataset's meta file; so blocks of five consecutive fine ids are NOT superclasses.
CIFAR100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
CIFAR100_COARSE_NAMES = tuple(sorted(CIFAR100_SUPERCLASSES))
CIFAR100_FINE_NAMES = tuple(sorted(f for fines in CIFAR100_SUPERCLASSES.values() for f in fines))
CIFAR100_FINE_TO_COARSE = tuple(
    CIFAR100_COARSE_NAMES.index(next(c for c, fines in CIFAR100_SUPERCLASSES.items() if fine in fines))
    for fine in CIFAR100_FINE_NAMES
)
SYNTHETIC_GROUP = 5  # the synthetic dataset's superclasses: blocks of 5 consecutive class ids


def synthetic_fine_to_coarse(num_classes: int) -> tuple[int, ...]:
    """Coarse id of each synthetic class: c // 5 (the synthetic data's own superclasses)."""
    return tuple(c // SYNTHETIC_GROUP for c in range(num_classes))


def check_noise_args(kind: str, rate: float, pairs: Any = None, noise_file: str | None = None) -> None:
    """Raise ValueError unless kind is in NOISE_KINDS, 0 <= rate < 1, asymmetric noise has pairs (given or a
    preset) and file noise an existing file: the checks that need no data, so a run makes them before loading it."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}: choose one of {', '.join(NOISE_KINDS)}")
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"--noise-rate must be in [0, 1), got {rate}")
    if kind == "file" and not (noise_file and os.path.isfile(noise_file)):
        raise ValueError(
            "--noise file needs --noise-file PATH of an existing CIFAR-N .pt, .npy, .csv or .parquet file "
            f"(got {noise_file!r})"
        )
    if kind == "asymmetric" and pairs in (None, "", {}):
        raise ValueError(
            "asymmetric noise needs class structure: this dataset has no preset pairs; pass "
            "--noise-pairs 'src:dst,...' (e.g. '9:1,3:5,5:3') or use cifar10, cifar100 or synthetic"
        )


class NoiseSpec(NamedTuple):
    """The label noise of a run, resolved once (resolve_noise): add_label_noise applies it, noise_record reports it."""

    kind: str
    rate: float
    seed: int
    num_classes: int
    pairs: dict[int, int] | None = None  # asymmetric: the flip map {src: dst}, presets drawn from the seed
    fine_to_coarse: tuple[int, ...] | None = None  # the pairs preset's superclass table, checked against coarse_label
    file: str | None = None  # kind file: the labels (CIFAR-N .pt, .npy, .csv or .parquet)
    key: str | None = None  # kind file: which labels of the file (e.g. worse_label)


def resolve_noise(
    kind: str,
    rate: float,
    seed: int,
    num_classes: int,
    pairs: Any = None,
    noise_file: str | None = None,
    noise_key: str | None = None,
) -> NoiseSpec:
    """The one resolution of the noise flags: checked, pairs parsed and resolved (asymmetric only), as a NoiseSpec.

    pairs: {src: dst}, "src:dst,..." or a preset in PAIR_PRESETS (cifar100, synthetic: drawn from seed).
    """
    check_noise_args(kind, rate, pairs, noise_file)
    pair_map = fine_to_coarse = None
    if kind == "asymmetric":
        parsed = parse_pairs(pairs)
        pair_map = resolve_pairs(parsed, seed, num_classes)
        fine_to_coarse = preset_fine_to_coarse(parsed, num_classes) if isinstance(parsed, str) else None
    return NoiseSpec(
        kind,
        float(rate),
        int(seed),
        int(num_classes),
        pair_map,
        fine_to_coarse,
        noise_file if kind == "file" else None,
        noise_key if kind == "file" else None,
    )


def parse_pairs(spec: Any) -> dict[int, int] | str | None:
    """--noise-pairs value -> {class: class}, a preset name, or None ("9:1,2:0" or "cifar10")."""
    if spec is None or spec == "" or spec == {}:
        return None
    if isinstance(spec, Mapping):
        return {int(a): int(b) for a, b in spec.items()}
    if isinstance(spec, str) and spec in PAIR_PRESETS:
        return spec
    try:
        pairs = {}
        for item in str(spec).split(","):
            a, b = item.split(":")
            pairs[int(a)] = int(b)
    except ValueError:
        raise ValueError(
            f"bad noise pairs {spec!r}: give 'src:dst,src:dst' class ids (e.g. '9:1,3:5,5:3') "
            f"or a preset ({', '.join(PAIR_PRESETS)})"
        ) from None
    same = [a for a, b in pairs.items() if a == b]
    if same:
        raise ValueError(
            f"bad noise pairs {spec!r}: the pair {same[0]}:{same[0]} maps class {same[0]} to itself, which "
            "flips nothing; drop it"
        )
    return pairs


def superclass_pairs(fine_to_coarse: Sequence[int], seed: int) -> dict[int, int]:
    """Two fine classes A, B drawn per superclass from the seed; A->B and B->A (paper Sec. 5.2)."""
    rng = np.random.default_rng([int(seed), 0xA5])  # own stream: independent of per-example draws
    table = np.asarray(fine_to_coarse)
    pairs = {}
    for coarse in np.unique(table):
        members = np.flatnonzero(table == coarse)
        if len(members) < 2:
            continue  # a superclass of one class has no partner to swap with
        a, b = (int(x) for x in rng.choice(members, size=2, replace=False))
        pairs[a], pairs[b] = b, a
    return pairs


def preset_fine_to_coarse(preset: str, num_classes: int) -> tuple[int, ...] | None:
    """The fine->coarse table behind a pairs preset (None for cifar10's fixed pairs)."""
    if preset == "cifar100":
        return CIFAR100_FINE_TO_COARSE
    if preset == "synthetic":
        return synthetic_fine_to_coarse(num_classes)
    return None


def resolve_pairs(pairs: Any, seed: int, num_classes: int) -> dict[int, int]:
    """Asymmetric flip map {src: dst} from a dict, 'a:b,...' string or preset (drawn from seed)."""
    check_noise_args("asymmetric", 0.0, pairs)
    pairs = parse_pairs(pairs)
    table = preset_fine_to_coarse(pairs, num_classes) if isinstance(pairs, str) else None
    if pairs == "cifar10":
        resolved, expected = dict(CIFAR10_PAIRS), 10
    elif table is not None:  # cifar100, synthetic: drawn per superclass
        resolved, expected = superclass_pairs(table, seed), len(table)
    else:
        resolved, expected = pairs, num_classes
    if expected != num_classes:
        raise ValueError(f"noise pairs preset {pairs!r} is for {expected} classes, but the dataset has {num_classes}")
    bad = sorted(c for kv in resolved.items() for c in kv if not 0 <= c < num_classes)
    if bad:
        raise ValueError(f"noise pairs use class ids {bad} outside [0, {num_classes})")
    return resolved


def _u64(digest: bytes) -> int:
    """First 8 bytes of a digest as an unsigned little-endian integer."""
    return int.from_bytes(digest[:8], "little")


def _blake64(data: bytes) -> int:
    """64-bit BLAKE2b hash of bytes."""
    return _u64(hashlib.blake2b(data, digest_size=8).digest())


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (a bijection with full avalanche; wraps mod 2^64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(keys: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """u = mix64(key XOR blake64(seed, stream)) / 2^64 in [0, 1): one pure draw per (seed, key, stream)."""
    salt = np.uint64(_blake64(f"proselflc-noise:{int(seed)}:{int(stream)}".encode()))
    with np.errstate(over="ignore"):
        bits = _mix64(_mix64(np.asarray(keys, dtype=np.uint64) ^ salt))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def noisy_labels(
    clean: np.ndarray,
    keys: np.ndarray,
    kind: str,
    rate: float,
    seed: int,
    num_classes: int,
    pairs: Mapping[int, int] | None = None,
) -> np.ndarray:
    """Noisy labels from clean ones: flip iff u(seed, key, 0) < rate (symmetric: to one of the C-1 others)."""
    clean = np.asarray(clean, dtype=np.int64)
    if kind == "none" or rate == 0.0:
        return clean.copy()
    flip = uniforms(keys, seed, 0) < rate
    if kind == "symmetric":
        # uniform over the C-1 other classes: shift by 1 + floor(v * (C-1)) mod C never lands on clean
        shift = 1 + np.floor(uniforms(keys, seed, 1) * (num_classes - 1)).astype(np.int64)
        target = (clean + shift) % num_classes
    elif kind == "pairflip":
        target = (clean + 1) % num_classes
    elif kind == "asymmetric":
        table = np.arange(num_classes, dtype=np.int64)
        for src, dst in (pairs or {}).items():
            table[src] = dst
        target = table[clean]
    else:
        raise ValueError(f"noisy_labels does not draw {kind!r} noise")
    return np.where(flip, target, clean)


def _column_keys(values: pa.Array) -> np.ndarray:
    """uint64 keys from a key column: blake64 of each value's str()."""
    return np.fromiter((_blake64(str(v).encode()) for v in values.to_pylist()), dtype=np.uint64, count=len(values))


def _image_blobs(images: pa.Array) -> list[bytes]:
    """The stored bytes of each image: Image struct bytes (or the file at its path) or raw pixel bytes."""
    if pa.types.is_struct(images.type):
        out = []
        for blob, path in zip(images.field("bytes").to_pylist(), images.field("path").to_pylist()):
            if blob is None:
                with open(path, "rb") as f:
                    blob = f.read()
            out.append(blob)
        return out
    if pa.types.is_binary(images.type) or pa.types.is_large_binary(images.type):
        return images.to_pylist()
    raise ValueError(
        f"cannot hash image column of type {images.type}: pass --key-column, or load the data through data.py"
    )


def example_keys(table: pa.Table, key_column: str | None = None, image_column: str = "image") -> np.ndarray:
    """uint64 key per row: blake64 of str(key column value), or of the stored image bytes."""
    if key_column is not None:
        return _column_keys(table.column(key_column).combine_chunks())
    blobs = _image_blobs(table.column(image_column).combine_chunks())
    return np.fromiter((_blake64(b) for b in blobs), dtype=np.uint64, count=len(blobs))


def key_strings(keys: np.ndarray, table: pa.Table, key_column: str | None) -> list[str]:
    """Human-readable example keys: the key column's value, or the 64-bit hash in hex."""
    if key_column is not None:
        return [str(v) for v in table.column(key_column).to_pylist()]
    return [f"{int(k):016x}" for k in keys]


def _numpy_safe_globals() -> list:
    """numpy types a CIFAR-N .pt file may reference (old files name numpy.core.*)."""
    from numpy._core import multiarray

    allowed: list = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    allowed += [(multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
    allowed += [(multiarray.scalar, "numpy.core.multiarray.scalar")]
    allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return allowed


def _pick_column(columns: Mapping[str, Any], noise_key: str | None, path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(noisy labels, clean labels or None) from a name->array mapping, choosing noise_key."""
    names = [n for n in columns if n != "clean_label"]
    if noise_key is None:
        label_like = [n for n in names if "label" in n and "coarse" not in n]
        if len(names) == 1:
            noise_key = names[0]
        elif len(label_like) == 1:
            noise_key = label_like[0]
        else:
            raise ValueError(f"noise file {path} holds {', '.join(columns)}: choose one with --noise-key")
    if noise_key not in columns:
        raise ValueError(f"noise file {path} has no key {noise_key!r}: it holds {', '.join(columns)}")
    clean = columns.get("clean_label")
    return int_labels(columns[noise_key], path), None if clean is None else int_labels(clean, path)


def int_labels(values: Any, path: str) -> np.ndarray:
    """Class labels as int64; floats pass only when integral (3.0), anything else is refused naming the file."""
    labels = np.asarray(values).reshape(-1)
    if labels.dtype.kind in "iu":
        return labels.astype(np.int64)
    if labels.dtype.kind == "f":
        wrong = ~(np.isfinite(labels) & (labels == np.round(labels)))
        if not wrong.any():
            return labels.astype(np.int64)
        raise ValueError(
            f"noise file {path} holds non-integer labels ({wrong.sum()} of {len(labels)}, the first "
            f"{float(labels[wrong][0])} at index {np.flatnonzero(wrong)[0]}): write class indices 0..C-1"
        )
    raise ValueError(
        f"noise file {path} holds {labels.dtype} values, not integer class labels: write class indices 0..C-1"
    )


def _label_table(path: str, ext: str) -> pa.Table:
    """A .csv or .parquet label file as one Arrow table, read once; a `key` column stays strings (hex keys such
    as 0123456789abcdef are no numbers)."""
    if ext == ".csv":
        import pyarrow.csv as pcsv

        return pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(column_types={"key": pa.string()}))
    import pyarrow.parquet as pq

    return pq.read_table(path)


def load_noise_file(path: str, noise_key: str | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(noisy labels, clean labels or None, example keys or None) from .pt (CIFAR-N), .npy, .csv or .parquet: the
    labels in dataset order, or in any order with a `key` column (.csv/.parquet; eval.py --relabel/--drop writes one)."""
    if not path or not os.path.isfile(path):
        raise ValueError(f"noise file {path!r} not found: pass --noise-file with a .pt, .npy, .csv or .parquet file")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pt", ".pth"):
        import torch

        # weights-only: no arbitrary unpickling, only numpy's array types are allowed
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - garbage, or a pickle asking for code: refused either way
            why = "it asks to run code, which is refused" if "GLOBAL" in str(e).upper() else "not a torch file"
            raise ValueError(
                f"noise file {path} cannot be read as tensors or numpy arrays ({why}): "
                f"pass CIFAR-N's .pt file, or a .npy, .csv or .parquet of labels"
            ) from None
        if not isinstance(obj, Mapping):
            obj = {"noisy_label": obj}
        columns = {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)) for k, v in obj.items()}
        return (*_pick_column(columns, noise_key, path), None)
    if ext == ".npy":
        return int_labels(np.load(path, allow_pickle=False), path), None, None
    if ext in (".csv", ".parquet"):
        table = _label_table(path, ext)
        keys = None
        if "key" in table.column_names:
            keys = np.asarray([str(k) for k in table.column("key").to_pylist()], dtype=object)
        return (*_pick_column({n: table.column(n).to_numpy() for n in table.column_names}, noise_key, path), keys)
    raise ValueError(f"noise file {path} has unknown type {ext!r}: use .pt (CIFAR-N), .npy, .csv or .parquet")


def labels_by_key(
    file_keys: np.ndarray, file_labels: np.ndarray, keys: np.ndarray, key_column: str | None, path: str
) -> np.ndarray:
    """The file's labels in the dataset's order, matched by example key (as noise.json and eval.py write it)."""
    as_u64 = (lambda k: _blake64(k.encode())) if key_column else (lambda k: int(k, 16))
    try:
        fk = np.fromiter((as_u64(k) for k in file_keys), dtype=np.uint64, count=len(file_keys))
    except ValueError:
        raise ValueError(
            f"noise file {path}: its key column holds no example keys of this dataset "
            "(16 hex digits, or the --key-column values)"
        ) from None
    order = np.argsort(fk, kind="stable")
    twice = np.flatnonzero((fk[order][1:] == fk[order][:-1]) & (file_labels[order][1:] != file_labels[order][:-1]))
    if len(twice):
        raise ValueError(
            f"noise file {path} gives the key {file_keys[order][twice[0]]!r} twice with different labels "
            f"({file_labels[order][twice[0]]} and {file_labels[order][twice[0] + 1]}): keep one row per key"
        )
    pos = np.minimum(np.searchsorted(fk[order], keys), len(fk) - 1)
    missing = int(np.sum(fk[order][pos] != keys))
    if missing:
        raise ValueError(
            f"noise file {path} has no row for {missing} of the {len(keys)} training examples: "
            "write it for this dataset (eval.py --audit --relabel/--drop does)"
        )
    return file_labels[order][pos]


def _check_file_labels(
    noisy: np.ndarray, clean_file: np.ndarray | None, clean: np.ndarray, num_classes: int, path: str
) -> None:
    """Raise ValueError unless the file matches the dataset: same length, labels in range (-1: drop), same clean labels."""
    if len(noisy) != len(clean):
        raise ValueError(f"noise file {path} has {len(noisy)} labels but the train split has {len(clean)} examples")
    if noisy.min(initial=0) < -1 or noisy.max(initial=0) >= num_classes:
        raise ValueError(f"noise file {path} has labels outside [0, {num_classes}) (or -1, which drops the example)")
    if clean_file is not None and len(clean_file) == len(clean):
        wrong = np.flatnonzero(clean_file != clean)
        if len(wrong):
            raise ValueError(
                f"noise file {path}: its clean_label disagrees with the dataset's labels at {len(wrong)} of "
                f"{len(clean)} examples (first at index {wrong[0]}): is it for this dataset, in this order?"
            )


def _set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    """table with column `name` replaced by (or appended as) values."""
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, values) if i >= 0 else table.append_column(name, values)


def _noise_batch(
    table: pa.Table,
    indices: list[int] | None = None,
    *,
    spec: NoiseSpec,
    label_column: str,
    key_column: str | None,
    image_column: str,
    file_labels: np.ndarray | None,
    file_keys: np.ndarray | None,
) -> pa.Table:
    """Arrow batch -> batch with label (noisy), clean_label, is_noisy, example_key."""
    num_classes, fine_to_coarse = spec.num_classes, spec.fine_to_coarse
    clean = table.column(label_column).to_numpy().astype(np.int64)
    if len(clean) and (clean.min() < 0 or clean.max() >= num_classes):
        raise ValueError(f"label column {label_column!r} has ids outside [0, {num_classes})")
    if fine_to_coarse is not None and "coarse_label" in table.column_names:
        coarse = table.column("coarse_label").to_numpy().astype(np.int64)
        if np.any(np.asarray(fine_to_coarse)[clean] != coarse):
            raise ValueError(
                "the coarse_label column disagrees with the fine->coarse table of the noise pairs preset: "
                "is the label column the fine label of this dataset?"
            )
    keys = example_keys(table, key_column, image_column)
    if file_labels is None:
        noisy = noisy_labels(clean, keys, spec.kind, spec.rate, spec.seed, num_classes, spec.pairs)
    elif file_keys is None:
        noisy = file_labels[np.asarray(indices, dtype=np.int64)]  # map-style: row i of the file
    else:
        # streaming: the file row found by the example key (file_keys sorted, file_labels in that order)
        pos = np.minimum(np.searchsorted(file_keys, keys), len(file_keys) - 1)
        if np.any(file_keys[pos] != keys):
            raise ValueError("an example of the stream is not in the noise file's key index: the data changed")
        noisy = file_labels[pos]
    label_type = table.schema.field(label_column).type
    out = _set_column(table, "label", pa.array(noisy, type=label_type))
    out = _set_column(out, "clean_label", pa.array(clean, type=label_type))
    out = _set_column(out, "is_noisy", pa.array(noisy != clean))
    return _set_column(out, "example_key", pa.array(key_strings(keys, table, key_column), type=pa.string()))


def _noise_features(features: Any, label_column: str) -> Any:
    """Output features of the noise map (None if the input's are unknown)."""
    if features is None:
        return None
    out = features.copy()
    out["label"] = features[label_column]
    out["clean_label"] = features[label_column]
    out["is_noisy"] = datasets.Value("bool")
    out["example_key"] = datasets.Value("string")
    return out


def _stream_file_keys(
    ds: Any, key_column: str | None, label_column: str, image_column: str
) -> tuple[np.ndarray, np.ndarray]:
    """(keys, clean labels) of an unshuffled stream in order: one pass to place file rows by key."""
    columns = [key_column or image_column, label_column]
    keys, clean = [], []
    for table in ds.select_columns(columns).with_format("arrow").iter(batch_size=1000):
        keys.append(example_keys(table, key_column, image_column))
        clean.append(table.column(label_column).to_numpy().astype(np.int64))
    return np.concatenate(keys), np.concatenate(clean)


def add_label_noise(
    ds: Any,
    spec: NoiseSpec,
    label_column: str = "label",
    key_column: str | None = None,
    image_column: str = "image",
    features: Any = None,
) -> Any:
    """Dataset/IterableDataset -> same with label (noisy), clean_label, is_noisy, example_key (a map) by `spec`.

    image_column: hashed for the example key without key_column (data.py passes its resolved name).
    features: ds's (default ds.features; data.features_of for a stream that does not know them).
    A file's labels (spec.file, spec.key) are in dataset order; a stream must come unshuffled (one
    pass places each file row by its example key, so the shuffle and split may follow).
    """
    kind, num_classes, noise_file = spec.kind, spec.num_classes, spec.file
    features = ds.features if features is None else features
    columns = list(features)
    image_column = None if key_column else image_column
    for role, name in (("label", label_column), ("key", key_column), ("image", image_column)):
        if name is not None and name not in columns:
            raise ValueError(f"no {role} column {name!r}: the dataset has columns {', '.join(columns)}")
    file_labels = file_keys = None
    streaming = isinstance(ds, datasets.IterableDataset)
    if kind == "file":
        file_labels, file_clean, file_row_keys = load_noise_file(noise_file, spec.key)
        if streaming:
            keys, clean = _stream_file_keys(ds, key_column, label_column, image_column)
        else:
            clean = np.asarray(ds.with_format("arrow")[label_column].to_numpy(), dtype=np.int64)
            if file_row_keys is not None:
                keys = example_keys(
                    ds.select_columns([key_column or image_column]).with_format("arrow")[:], key_column, image_column
                )
        if file_row_keys is not None:  # keyed rows (any order): place them in the dataset's order
            file_labels = labels_by_key(file_row_keys, file_labels, keys, key_column, noise_file)
        _check_file_labels(file_labels, file_clean, clean, num_classes, noise_file)
        if streaming:
            # sorted once so each batch finds its file rows by binary search; with duplicate
            # images (equal keys) the stable sort makes the first one in file order win
            order = np.argsort(keys, kind="stable")
            file_keys, file_labels = keys[order], file_labels[order]
            same_key = file_keys[1:] == file_keys[:-1]
            conflicts = int(np.sum(same_key & (file_labels[1:] != file_labels[:-1])))
            if conflicts:
                warnings.warn(
                    f"{conflicts} duplicate images have different labels in {noise_file}: streaming gives "
                    "each the first one's label (map-style uses the file row); pass --key-column for exact rows",
                    stacklevel=2,
                )
    fn = functools.partial(
        _noise_batch,
        spec=spec,
        label_column=label_column,
        key_column=key_column,
        image_column=image_column,
        file_labels=file_labels,
        file_keys=file_keys,
    )
    by_index = kind == "file" and not streaming
    features = _noise_features(features, label_column)
    mapped = ds.with_format("arrow").map(fn, batched=True, batch_size=1000, with_indices=by_index, features=features)
    if file_labels is not None and np.any(file_labels < 0):  # label -1: the example leaves the training set
        mapped = mapped.filter(lambda t: pa.compute.greater_equal(t.column("label"), 0), batched=True, batch_size=1000)
    return mapped.with_format(None)


def _noise_columns(ds: Any) -> dict[str, np.ndarray]:
    """label, clean_label, is_noisy, example_key of a noisy Dataset/IterableDataset as numpy arrays."""
    names = ["label", "clean_label", "is_noisy", "example_key"]
    if isinstance(ds, datasets.IterableDataset):
        tables = list(ds.select_columns(names).with_format("arrow").iter(batch_size=10_000))
        table = pa.concat_tables(tables) if tables else None
    else:
        table = ds.select_columns(names).with_format("arrow")[:]
    if table is None:
        return {n: np.zeros(0) for n in names}
    out = {n: table.column(n).to_numpy() for n in ("label", "clean_label", "is_noisy")}
    out["example_key"] = np.asarray(table.column("example_key").to_pylist())
    return out


def expected_rate(kind: str, rate: float, clean: np.ndarray, pairs: Mapping[int, int] | None) -> float | None:
    """Design noise rate: r (symmetric, pairflip), r x fraction in flipped classes (asymmetric), 0, or None (file)."""
    if kind == "none":
        return 0.0
    if kind in ("symmetric", "pairflip"):
        return float(rate)
    if kind == "asymmetric":
        sources = [s for s, d in (pairs or {}).items() if s != d]
        return float(rate) * float(np.isin(clean, sources).mean()) if len(clean) else 0.0
    return None


def noise_record(ds: Any, spec: NoiseSpec, key_column: str | None = None) -> dict:
    """JSON-serialisable summary: kind, requested/expected/realised rates (overall, per class), pairs, seed, noisy keys.

    Reads the noise columns of `ds` (one pass over a stream) noised by `spec`. noisy_indices are the
    positions in the map-style split (null when streaming); noisy_keys are the stable example keys.
    """
    kind, rate, num_classes, pair_map = spec.kind, spec.rate, spec.num_classes, spec.pairs
    cols = _noise_columns(ds)
    clean, noisy_mask = cols["clean_label"].astype(np.int64), cols["is_noisy"].astype(bool)
    per_class = []
    for c in range(num_classes):
        in_class = clean == c
        per_class.append(float(noisy_mask[in_class].mean()) if in_class.any() else None)
    streaming = isinstance(ds, datasets.IterableDataset)
    return {
        "kind": kind,
        "requested_rate": None if kind == "file" else float(rate),
        "expected_rate": expected_rate(kind, rate, clean, pair_map),
        "realised_rate": float(noisy_mask.mean()) if len(noisy_mask) else 0.0,
        "realised_rate_per_class": per_class,
        "pairs": None if pair_map is None else {str(a): int(b) for a, b in sorted(pair_map.items())},
        "seed": spec.seed,
        "num_classes": int(num_classes),
        "num_examples": int(len(clean)),
        "num_noisy": int(noisy_mask.sum()),
        "key": key_column or KEY_HASH,
        "noise_file": spec.file,
        "noise_key": spec.key,
        "noisy_keys": [str(k) for k in cols["example_key"][noisy_mask]],
        "noisy_indices": None if streaming else [int(i) for i in np.flatnonzero(noisy_mask)],
    }
