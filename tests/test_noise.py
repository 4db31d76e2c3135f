"""Label noise: the paper's definitions (Sec. 5.2), per-example determinism, streaming == map-style."""

import ast
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import Evil
from datasets.distributed import split_dataset_by_node

import noise

# CIFAR-100 fine id -> coarse id as published with the dataset (an independent transcription of
# the meta file's order, widely used as "sparse2coarse"): noise.py derives its table from names.
SPARSE2COARSE = [
    4,
    1,
    14,
    8,
    0,
    6,
    7,
    7,
    18,
    3,
    3,
    14,
    9,
    18,
    7,
    11,
    3,
    9,
    7,
    11,
    6,
    11,
    5,
    10,
    7,
    6,
    13,
    15,
    3,
    15,
    0,
    11,
    1,
    10,
    12,
    14,
    16,
    9,
    11,
    5,
    5,
    19,
    8,
    8,
    15,
    13,
    14,
    17,
    18,
    10,
    16,
    4,
    17,
    4,
    2,
    0,
    17,
    4,
    18,
    17,
    10,
    3,
    2,
    12,
    12,
    16,
    12,
    1,
    9,
    19,
    2,
    10,
    0,
    1,
    16,
    12,
    9,
    13,
    15,
    13,
    16,
    19,
    2,
    4,
    6,
    19,
    5,
    5,
    8,
    19,
    18,
    1,
    2,
    15,
    6,
    0,
    17,
    8,
    14,
    13,
]


def label_dataset(num_examples: int, num_classes: int, seed: int = 0, coarse=None) -> datasets.Dataset:
    """Balanced labels in random order with an integer id key column (no images: fast)."""
    labels = np.random.default_rng(seed).permutation(np.arange(num_examples) % num_classes)
    columns = {"id": np.arange(num_examples), "label": labels}
    features = {"id": datasets.Value("int64"), "label": datasets.ClassLabel(num_classes=num_classes)}
    if coarse is not None:
        columns["coarse_label"] = np.asarray(coarse)[labels]
        features["coarse_label"] = datasets.Value("int64")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def png_dataset(num_examples: int, num_classes: int = 10) -> datasets.Dataset:
    """Small PNG-encoded image dataset (like the Hub's CIFAR parquet) with distinct images."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(num_examples, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=num_examples)
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(num_classes=num_classes))
    return datasets.Dataset.from_dict({"image": list(images), "label": labels}, features=features)


def columns(ds) -> dict:
    """label, clean_label, is_noisy, example_key of a map-style noisy dataset as numpy arrays."""
    table = ds.select_columns(["label", "clean_label", "is_noisy", "example_key"]).with_format("numpy")[:]
    return {k: np.asarray(v) for k, v in table.items()}


def test_cifar100_table_is_the_real_superclass_table():
    assert list(noise.CIFAR100_FINE_TO_COARSE) == SPARSE2COARSE
    assert np.bincount(noise.CIFAR100_FINE_TO_COARSE).tolist() == [5] * 20
    fine, coarse = noise.CIFAR100_FINE_NAMES, noise.CIFAR100_COARSE_NAMES
    assert fine[0] == "apple" and coarse[noise.CIFAR100_FINE_TO_COARSE[0]] == "fruit_and_vegetables"
    assert coarse[noise.CIFAR100_FINE_TO_COARSE[fine.index("whale")]] == "aquatic_mammals"
    # blocks of five consecutive fine ids are not superclasses
    assert len(set(noise.CIFAR100_FINE_TO_COARSE[:5])) > 1


def test_symmetric_rate_excludes_true_class_and_reaches_every_other_class():
    r, num_classes = 0.4, 10
    spec = noise.resolve_noise("symmetric", r, 3, num_classes)
    ds = noise.add_label_noise(label_dataset(50_000, num_classes), spec, key_column="id")
    c = columns(ds)
    assert abs(c["is_noisy"].mean() - r) < 0.01
    assert np.array_equal(c["is_noisy"], c["label"] != c["clean_label"])
    assert not np.any(c["label"][c["is_noisy"]] == c["clean_label"][c["is_noisy"]])
    for k in range(num_classes):
        flipped_to = c["label"][c["is_noisy"] & (c["clean_label"] == k)]
        counts = np.bincount(flipped_to, minlength=num_classes)
        assert counts[k] == 0
        others = np.delete(counts, k)
        # uniform over the other 9 classes: each gets ~ 2000 * 0.4 / 9 ~ 222 (binomial sd ~ 14)
        assert others.min() > 150 and others.max() < 300, counts


def test_cifar100_asymmetric_swaps_two_classes_per_superclass():
    r = 0.4
    table = np.asarray(noise.CIFAR100_FINE_TO_COARSE)
    ds = label_dataset(50_000, 100, coarse=table)
    spec = noise.resolve_noise("asymmetric", r, seed=5, num_classes=100, pairs="cifar100")
    noisy = noise.add_label_noise(ds, spec, key_column="id")
    c = columns(noisy)
    flips = c["is_noisy"]
    assert np.array_equal(table[c["label"]], table[c["clean_label"]])  # every flip stays in its superclass
    moves = {(int(a), int(b)) for a, b in zip(c["clean_label"][flips], c["label"][flips])}
    sources = {a for a, _ in moves}
    assert len(moves) == 40 and len(sources) == 40
    assert all((b, a) in moves for a, b in moves)  # A -> B and B -> A
    assert np.bincount(table[sorted(sources)]).tolist() == [2] * 20  # exactly two per superclass
    assert abs(flips.mean() - 2 * r / 5) < 0.01
    for a in sources:  # each flipping class flips at rate r
        assert abs(flips[c["clean_label"] == a].mean() - r) < 0.1
    # the record reports the pairs that were drawn and the expected overall rate 2r/5
    record = noise.noise_record(noisy, spec, key_column="id")
    assert {(int(a), b) for a, b in record["pairs"].items()} == moves
    assert record["expected_rate"] == pytest.approx(2 * r / 5)
    # a different seed draws other pairs
    assert noise.resolve_pairs("cifar100", 6, 100) != noise.resolve_pairs("cifar100", 5, 100)


def test_cifar100_preset_is_checked_against_the_coarse_label_column():
    wrong = label_dataset(1_000, 100, coarse=np.arange(100) // 5)  # consecutive blocks: not the real table
    with pytest.raises(ValueError, match="coarse_label column disagrees"):
        noise.add_label_noise(wrong, noise.resolve_noise("asymmetric", 0.3, 0, 100, pairs="cifar100"), key_column="id")


def test_cifar10_asymmetric_uses_the_standard_pairs():
    spec = noise.resolve_noise("asymmetric", 0.5, 0, 10, pairs="cifar10")
    c = columns(noise.add_label_noise(label_dataset(20_000, 10), spec, key_column="id"))
    moves = set(zip(c["clean_label"][c["is_noisy"]].tolist(), c["label"][c["is_noisy"]].tolist()))
    # truck->automobile, bird->airplane, deer->horse, cat<->dog
    assert moves == {(9, 1), (2, 0), (4, 7), (3, 5), (5, 3)}


def test_pairflip_and_none():
    c = columns(
        noise.add_label_noise(label_dataset(20_000, 7), noise.resolve_noise("pairflip", 0.3, 0, 7), key_column="id")
    )
    assert np.array_equal(c["label"][c["is_noisy"]], (c["clean_label"][c["is_noisy"]] + 1) % 7)
    assert abs(c["is_noisy"].mean() - 0.3) < 0.015
    c = columns(noise.add_label_noise(label_dataset(100, 7), noise.resolve_noise("none", 0.0, 0, 7), key_column="id"))
    assert np.array_equal(c["label"], c["clean_label"]) and not c["is_noisy"].any()


def test_same_seed_same_labels_any_order_other_seed_differs():
    ds = label_dataset(5_000, 10)
    spec = noise.resolve_noise("symmetric", 0.4, 11, 10)
    a = columns(noise.add_label_noise(ds, spec, key_column="id"))
    shuffled = columns(noise.add_label_noise(ds.shuffle(seed=1), spec, key_column="id"))
    by_key = dict(zip(shuffled["example_key"], shuffled["label"]))
    assert [by_key[k] for k in a["example_key"]] == a["label"].tolist()
    b = columns(noise.add_label_noise(ds, noise.resolve_noise("symmetric", 0.4, 12, 10), key_column="id"))
    assert np.array_equal(a["clean_label"], b["clean_label"])
    assert (a["label"] != b["label"]).mean() > 0.3


def test_uniforms_are_a_pure_function_of_seed_key_stream():
    keys = np.random.default_rng(0).integers(0, 2**63, size=1000, dtype=np.uint64)
    u = noise.uniforms(keys, 7, 0)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert np.array_equal(noise.uniforms(keys[::-1], 7, 0), u[::-1])
    assert not np.array_equal(noise.uniforms(keys, 7, 1), u)
    assert abs(u.mean() - 0.5) < 0.05


def test_streaming_equals_map_style_shuffled_and_split_over_two_nodes():
    ds = png_dataset(600)  # keys are hashes of the PNG bytes (no key column)
    mapped = columns(noise.add_label_noise(ds, noise.resolve_noise("symmetric", 0.5, 2, 10)))
    expected = dict(zip(mapped["example_key"], zip(mapped["label"], mapped["clean_label"])))
    assert len(expected) == 600
    stream = noise.add_label_noise(ds.to_iterable_dataset(num_shards=4), noise.resolve_noise("symmetric", 0.5, 2, 10))
    seen = []
    for rank in range(2):
        node = split_dataset_by_node(stream.shuffle(seed=9, buffer_size=100), rank=rank, world_size=2)
        node.set_epoch(1)
        seen += [(row["example_key"], (row["label"], row["clean_label"])) for row in node]
    assert len(seen) == 600 and dict(seen) == expected


def test_different_noise_seed_changes_streamed_labels():
    stream = png_dataset(300).to_iterable_dataset(num_shards=2)
    a = [row["label"] for row in noise.add_label_noise(stream, noise.resolve_noise("symmetric", 0.5, 1, 10))]
    b = [row["label"] for row in noise.add_label_noise(stream, noise.resolve_noise("symmetric", 0.5, 2, 10))]
    assert a != b


def write_cifar_n(path, clean, noisy):
    """A CIFAR-10N-style .pt file: dict of numpy arrays saved with torch.save."""
    torch.save(
        {"clean_label": np.asarray(clean), "worse_label": np.asarray(noisy), "aggre_label": np.asarray(clean)}, path
    )


def test_cifar_n_file_noise_is_applied_in_map_style_and_streaming(tmp_path):
    ds = png_dataset(200)
    clean = np.asarray(ds["label"])
    worse = (clean + np.random.default_rng(0).integers(0, 2, size=200)) % 10
    path = str(tmp_path / "CIFAR-10_human.pt")
    write_cifar_n(path, clean, worse)
    spec = noise.resolve_noise("file", 0.0, 0, 10, noise_file=path, noise_key="worse_label")
    c = columns(noise.add_label_noise(ds, spec))
    assert np.array_equal(c["label"], worse) and np.array_equal(c["clean_label"], clean)
    assert np.array_equal(c["is_noisy"], worse != clean)
    # the noise goes on the stream in file order; the shuffle and the split come after, as in training
    stream = noise.add_label_noise(ds.to_iterable_dataset(num_shards=3), spec)
    streamed = {}
    for rank in range(2):
        node = split_dataset_by_node(stream.shuffle(seed=0, buffer_size=50), rank=rank, world_size=2)
        streamed.update({row["example_key"]: row["label"] for row in node})
    assert streamed == dict(zip(c["example_key"], c["label"].tolist()))
    record = noise.noise_record(stream, spec)
    assert record["realised_rate"] == pytest.approx((worse != clean).mean())
    assert record["noisy_indices"] is None and len(record["noisy_keys"]) == record["num_noisy"]


def test_noise_file_errors(tmp_path):
    ds = png_dataset(50)
    clean = np.asarray(ds["label"])
    path = str(tmp_path / "n.pt")
    write_cifar_n(path, clean, clean)
    with pytest.raises(ValueError, match="choose one with --noise-key"):
        noise.add_label_noise(ds, noise.resolve_noise("file", 0.0, 0, 10, noise_file=path))
    with pytest.raises(ValueError, match="has no key 'random_label9'"):
        noise.add_label_noise(ds, noise.resolve_noise("file", 0.0, 0, 10, noise_file=path, noise_key="random_label9"))
    write_cifar_n(path, np.r_[clean, 0], np.r_[clean, 0])
    with pytest.raises(ValueError, match="has 51 labels but the train split has 50"):
        noise.add_label_noise(ds, noise.resolve_noise("file", 0.0, 0, 10, noise_file=path, noise_key="worse_label"))
    write_cifar_n(path, (clean + 1) % 10, clean)
    with pytest.raises(ValueError, match="clean_label disagrees"):
        noise.add_label_noise(ds, noise.resolve_noise("file", 0.0, 0, 10, noise_file=path, noise_key="worse_label"))


def test_npy_csv_parquet_label_files(tmp_path):
    ds = label_dataset(100, 10)
    noisy = (np.asarray(ds["label"]) + 3) % 10
    np.save(tmp_path / "n.npy", noisy)
    (tmp_path / "n.csv").write_text("noisy\n" + "\n".join(map(str, noisy)) + "\n")
    datasets.Dataset.from_dict({"noisy_label": noisy}).to_parquet(str(tmp_path / "n.parquet"))
    for name in ("n.npy", "n.csv", "n.parquet"):
        spec = noise.resolve_noise("file", 0.0, 0, 10, noise_file=str(tmp_path / name))
        c = columns(noise.add_label_noise(ds, spec, key_column="id"))
        assert np.array_equal(c["label"], noisy), name


def test_pt_noise_file_is_loaded_weights_only(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"noisy_label": Evil(tmp_path / "pwned")}, path)
    with pytest.raises(ValueError, match="asks to run code, which is refused"):
        noise.load_noise_file(path, "noisy_label")
    assert not (tmp_path / "pwned").exists()


def test_bad_arguments():
    ds = label_dataset(100, 10)
    for rate in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"--noise-rate must be in \[0, 1\)"):
            noise.add_label_noise(ds, noise.resolve_noise("symmetric", rate, 0, 10), key_column="id")
    with pytest.raises(ValueError, match="unknown noise kind 'gaussian'"):
        noise.add_label_noise(ds, noise.resolve_noise("gaussian", 0.1, 0, 10), key_column="id")
    with pytest.raises(ValueError, match="needs class structure"):
        noise.add_label_noise(ds, noise.resolve_noise("asymmetric", 0.2, 0, 10), key_column="id")
    with pytest.raises(ValueError, match="bad noise pairs"):
        noise.parse_pairs("1-2")
    with pytest.raises(ValueError, match="is for 100 classes"):
        noise.add_label_noise(ds, noise.resolve_noise("asymmetric", 0.2, 0, 10, pairs="cifar100"), key_column="id")
    with pytest.raises(ValueError, match="no label column 'fine'"):
        noise.add_label_noise(ds, noise.resolve_noise("symmetric", 0.2, 0, 10), label_column="fine", key_column="id")
    assert noise.parse_pairs("1:2,2:1") == {1: 2, 2: 1}


def test_noise_record_is_json_and_consistent():
    ds = noise.add_label_noise(label_dataset(2_000, 10), noise.resolve_noise("symmetric", 0.2, 4, 10), key_column="id")
    record = noise.noise_record(ds, noise.resolve_noise("symmetric", 0.2, 4, 10), key_column="id")
    json.loads(json.dumps(record))
    c = columns(ds)
    assert record["num_noisy"] == int(c["is_noisy"].sum()) == len(record["noisy_indices"])
    assert record["noisy_indices"] == np.flatnonzero(c["is_noisy"]).tolist()
    assert record["noisy_keys"] == [str(i) for i in np.flatnonzero(c["is_noisy"])]  # key column "id" == index here
    assert record["realised_rate"] == pytest.approx(c["is_noisy"].mean())
    assert len(record["realised_rate_per_class"]) == 10 and record["seed"] == 4 and record["key"] == "id"


def test_noise_py_is_about_noise_only():
    # noise functions get the dataset's shape (image column, features) from data.py as arguments
    tree = ast.parse(Path(noise.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "data" not in imported
    assert not {"features_of", "find_image_column"} & {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
