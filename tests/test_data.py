"""Data loading (every source through prepare_data), decoding, augmentation and streaming."""

import os
import pickle
import time

import datasets
import numpy as np
import pytest
import torch
from conftest import UNREACHABLE, data_config

import data
import noise


@pytest.fixture(autouse=True)
def private_hf_caches(tmp_path, monkeypatch):
    """Keep load_dataset's caches (and any Hub lookup) inside the test's folder."""
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))


def images_and_labels(n: int, seed: int, size: int = 32):
    """Random uint8 HWC images and labels 0..9."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8), rng.integers(0, 10, size=n)


def write_hub_parquet(folder, n_train=40, n_test=20, image_column="img", label_column="label"):
    """Parquet files laid out like uoft-cs/cifar10 (PNG Image column + ClassLabel); returns the images."""
    os.makedirs(folder, exist_ok=True)
    features = datasets.Features(
        {image_column: datasets.Image(), label_column: datasets.ClassLabel(names=list(noise.CIFAR10_CLASSES))}
    )
    out = {}
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        images, labels = images_and_labels(n, seed)
        ds = datasets.Dataset.from_dict({image_column: list(images), label_column: labels}, features=features)
        ds.to_parquet(os.path.join(folder, f"{split}-00000-of-00001.parquet"))
        out[split] = (images, labels)
    return out


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def test_digits_default_split_and_info():
    train, test, info = data.prepare_data(data_config())
    assert (len(train), len(test)) == (1437, 360)
    assert info == data.DatasetInfo("digits", 10, 1, 8, info.mean, info.std, 1, False, None, noise=info.noise)
    assert info.noise == noise.NoiseSpec("none", 0.0, 0, 10)
    assert not info.photo and info.input_path == "memory"
    t = data.to_tensors(train)
    assert t["image"].shape == (1437, 1, 8, 8) and t["image"].dtype == torch.uint8
    assert t["image"].max() == 255 and t["label"].dtype == torch.int64
    assert torch.equal(t["label"], t["clean_label"]) and not t["is_noisy"].any()
    counts = np.bincount(data.to_tensors(test)["label"].numpy())
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 36 per class
    x = t["image"].float() / 255
    assert np.allclose(info.mean, x.mean(dim=(0, 2, 3)), atol=1e-3)


def test_synthetic_is_learnable_and_has_superclasses():
    train, test, info = data.prepare_data(data_config(dataset="synthetic", synthetic_size=2000, synthetic_classes=10))
    assert (len(train), len(test), info.num_classes, info.channels, info.image_size, info.pad) == (
        2000,
        400,
        10,
        3,
        32,
        4,
    )
    assert info.pairs_preset == "synthetic" and info.flip
    assert np.array_equal(np.asarray(train["coarse_label"]), np.asarray(train["label"]) // 5)
    tr, te = data.to_tensors(train), data.to_tensors(test)
    # nearest class mean on raw pixels already beats chance (0.1) by far: class structure is real
    x_tr, x_te = tr["image"].flatten(1).float(), te["image"].flatten(1).float()
    centroids = torch.stack([x_tr[tr["label"] == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(x_te, centroids).argmin(1) == te["label"]).float().mean()
    assert accuracy > 0.5


def test_cifar10_pickle_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for i in range(1, 6):
        x, y = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, 10, 3)]
        rows.append(x)
        labels += y
        with open(folder / f"data_batch_{i}", "wb") as f:  # python-2 style pickles, as distributed
            pickle.dump({b"batch_label": b"b", b"labels": y, b"data": x, b"filenames": [b"f"] * 3}, f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"labels": [0, 1], b"data": rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)}, f, protocol=2)
    train, test, info = data.prepare_data(
        data_config(dataset="cifar10", data_dir=str(tmp_path))
    )  # the torchvision root
    assert (len(train), len(test), info.num_classes) == (15, 2, 10)
    assert (info.mean, info.std) == data.CIFAR_STATS["cifar10"]
    t = data.to_tensors(train)
    expected = torch.from_numpy(np.concatenate(rows).reshape(15, 3, 32, 32))  # rows are R, G, B planes
    assert torch.equal(t["image"], expected) and t["label"].tolist() == labels


def test_cifar100_pickle_folder_with_real_superclasses(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    table = np.asarray(noise.CIFAR100_FINE_TO_COARSE)
    for split, n in (("train", 300), ("test", 10)):
        fine = rng.integers(0, 100, size=n)
        pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        batch = {b"data": pixels, b"fine_labels": fine.tolist(), b"coarse_labels": table[fine].tolist()}
        with open(folder / split, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in noise.CIFAR100_FINE_NAMES]}, f, protocol=2)
    cfg = data_config(dataset="cifar100", data_dir=str(folder), noise="asymmetric", noise_rate=0.4)
    train, _, info = data.prepare_data(cfg)
    assert info.num_classes == 100 and info.pairs_preset == "cifar100"
    t = data.to_tensors(train)
    assert torch.equal(torch.from_numpy(table)[t["label"]], torch.from_numpy(table)[t["clean_label"]])
    assert t["is_noisy"].any()


def test_pickle_loader_refuses_foreign_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"labels": [0], b"data": os.getcwd}, f, protocol=2)  # references a function
    with pytest.raises(ValueError, match="is not allowed in a CIFAR python batch"):
        data.prepare_data(data_config(dataset="cifar10", data_dir=str(tmp_path)))


def test_hub_style_parquet_folder_map_style_and_streaming(tmp_path):
    written = write_hub_parquet(tmp_path / "cifar10")
    cfg = data_config(dataset="cifar10", data_dir=str(tmp_path / "cifar10"), noise="symmetric", noise_rate=0.5)
    train, test, info = data.prepare_data(cfg)
    t = data.to_tensors(train)
    assert (
        torch.equal(t["image"], nchw(written["train"][0])) and t["clean_label"].tolist() == written["train"][1].tolist()
    )
    assert torch.equal(data.to_tensors(test)["image"], nchw(written["test"][0]))
    assert t["is_noisy"].any() and torch.equal(t["is_noisy"], t["label"] != t["clean_label"])
    # streaming gives every example once per epoch (2 processes) with the same noisy label
    stream, stream_test, _ = data.prepare_data({**cfg, "streaming": True})
    assert isinstance(stream, datasets.IterableDataset) and isinstance(stream_test, datasets.Dataset)
    got = {}
    for rank in range(2):
        for b in data.stream_batches(stream, 8, 0, 0, rank, 2, drop_last=False, num_workers=0):
            for image, label in zip(b["image"], b["label"]):
                got.setdefault(image.numpy().tobytes(), []).append(int(label))
    expected = {image.numpy().tobytes(): [int(label)] for image, label in zip(t["image"], t["label"])}
    assert got == expected


def test_save_to_disk_folder_and_generic_columns(tmp_path):
    write_hub_parquet(tmp_path / "pq", image_column="picture", label_column="target")
    dd = datasets.load_dataset(str(tmp_path / "pq"))
    dd.save_to_disk(str(tmp_path / "disk"))
    with pytest.raises(ValueError, match=r"no label column .*: the dataset has columns picture, target \(pass --label"):
        data.prepare_data(data_config(dataset=str(tmp_path / "disk")))  # the Image column is found, the label is not
    cfg = data_config(dataset=str(tmp_path / "disk"), image_column="picture", label_column="target")
    train, test, info = data.prepare_data(cfg)
    assert (len(train), len(test), info.num_classes, info.pairs_preset) == (40, 20, 10, None)
    assert torch.equal(
        data.to_tensors(train)["image"], nchw(np.stack([np.asarray(im) for im in dd["train"]["picture"]]))
    )


def test_image_folder(tmp_path):
    from PIL import Image

    images, _ = images_and_labels(8, 3, size=16)
    for i, image in enumerate(images):
        folder = tmp_path / ("train" if i < 6 else "test") / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    train, test, info = data.prepare_data(data_config(dataset=str(tmp_path), noise="pairflip", noise_rate=0.5))
    assert (len(train), len(test), info.num_classes, info.image_size, info.pad) == (6, 2, 2, 16, 2)
    t = data.to_tensors(train)
    assert sorted(im.numpy().tobytes() for im in t["image"]) == sorted(im.numpy().tobytes() for im in nchw(images[:6]))
    assert torch.equal(t["label"][t["is_noisy"]], 1 - t["clean_label"][t["is_noisy"]])


def test_cifar_n_file_through_prepare_data(tmp_path):
    written = write_hub_parquet(tmp_path / "cifar10")
    clean = written["train"][1]
    worse = (clean + 1 + np.arange(len(clean)) % 2) % 10
    path = str(tmp_path / "CIFAR-10_human.pt")
    torch.save({"clean_label": clean, "worse_label": worse, "aggre_label": clean}, path)
    cfg = data_config(
        dataset="cifar10", data_dir=str(tmp_path / "cifar10"), noise="file", noise_file=path, noise_key="worse_label"
    )
    train, _, _ = data.prepare_data(cfg)
    t = data.to_tensors(train)
    assert t["label"].tolist() == worse.tolist() and t["is_noisy"].all()
    with pytest.raises(ValueError, match="has no key 'random_label1'"):
        data.prepare_data({**cfg, "noise_key": "random_label1"})
    torch.save({"clean_label": clean[:-1], "worse_label": worse[:-1]}, path)
    with pytest.raises(ValueError, match="has 39 labels but the train split has 40"):
        data.prepare_data(cfg)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (
            {"dataset": "tinyimagenet"},
            "unknown dataset 'tinyimagenet': choose one of digits, synthetic, cifar10, cifar100, imagenet, clothing1m",
        ),
        ({"noise": "symmetric", "noise_rate": 1.0}, r"--noise-rate must be in \[0, 1\)"),
        ({"noise": "symmetric", "noise_rate": -0.2}, r"--noise-rate must be in \[0, 1\)"),
        ({"noise": "salt"}, "unknown noise kind 'salt'"),
        ({"label_column": "target"}, "no label column 'target': the dataset has columns image, image_shape, label"),
        ({"image_column": "pixels"}, "no image column 'pixels'"),
        ({"key_column": "id"}, "no key column 'id'"),
        ({"noise": "asymmetric", "noise_rate": 0.2}, "asymmetric noise needs class structure"),
        ({"noise": "file"}, "--noise file needs --noise-file"),
        ({"noise": "file", "noise_file": "/no/such/file.pt"}, "--noise file needs --noise-file"),
        ({"dataset": "cifar10", "data_dir": "/no/such/folder"}, "does not exist: pass --data-dir"),
    ],
)
def test_bad_input_gives_one_line_value_error(cfg, message):
    with pytest.raises(ValueError, match=message) as err:
        data.prepare_data(data_config(**cfg))
    assert "\n" not in str(err.value)


def test_hub_offline_or_unreachable_without_a_cached_copy_is_one_line_with_data_dir_hint(monkeypatch):
    from huggingface_hub import constants

    offline(monkeypatch)
    expected = r"cannot load 'uoft-cs/cifar10'.*offline mode.*no cached copy.*pass --data-dir.*cifar-10-batches-py"
    with pytest.raises(ValueError, match=expected) as err:
        data.prepare_data(data_config(dataset="cifar10"))
    assert "\n" not in str(err.value)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", UNREACHABLE)
    started = time.monotonic()
    with pytest.raises(
        ValueError, match=r"cannot load 'uoft-cs/cifar100'.*unreachable.*no cached copy.*pass --data-dir"
    ):
        data.prepare_data(data_config(dataset="cifar100", streaming=True))
    assert time.monotonic() - started < 90  # the Hub client's retries, not a hang


def offline(monkeypatch) -> None:
    """The Hub in offline mode, as HF_HUB_OFFLINE=1 at start-up sets it."""
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_a_hub_dataset_in_the_cache_loads_offline(tmp_path, monkeypatch):
    # what a load_dataset("uoft-cs/cifar10") with the Hub at hand leaves in the datasets cache
    from datasets.packaged_modules.parquet.parquet import Parquet

    write_hub_parquet(tmp_path / "files")
    files = {s: str(tmp_path / "files" / f"{s}-00000-of-00001.parquet") for s in ("train", "test")}
    builder = Parquet(
        cache_dir=str(tmp_path / "built"),
        dataset_name="cifar10",
        config_name="plain_text",
        hash="0123abcd",
        data_files=files,
    )
    builder.download_and_prepare()
    (config,) = (tmp_path / "built" / "cifar10").iterdir()
    cached = tmp_path / "hf-datasets" / "uoft-cs___cifar10"  # the private_hf_caches fixture's folder
    cached.mkdir(parents=True)
    config.rename(cached / "plain_text")
    offline(monkeypatch)
    train, test, info = data.prepare_data(data_config(dataset="cifar10"))
    assert (len(train), len(test), info.num_classes, info.input_path) == (40, 20, 10, "memory")


def crop_offsets(out: torch.Tensor, x: torch.Tensor, pad: int) -> set:
    """All (dy, dx, flipped) whose crop of the zero-padded x equals out."""
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[-2:]
    found = set()
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            found |= {(dy, dx, False)} if torch.equal(crop, out) else set()
            found |= {(dy, dx, True)} if torch.equal(crop.flip(-1), out) else set()
    return found


def test_augment_batch_crops_and_flips_per_example():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = data.augment_batch(x, 4, True, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    offsets = [crop_offsets(o, xi, 4) for o, xi in zip(out, x)]
    assert all(len(o) == 1 for o in offsets)  # each output is exactly one crop (random pixels: unique)
    offsets = [o.pop() for o in offsets]
    assert len({(dy, dx) for dy, dx, _ in offsets}) > 20  # crops differ per example
    flipped = [f for _, _, f in offsets]
    assert 10 < sum(flipped) < 54  # flips happen, per example, about half the time
    again = data.augment_batch(x, 4, True, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # the generator makes it reproducible
    no_flip = data.augment_batch(x, 4, False, torch.Generator().manual_seed(1))
    assert not any(f for o, xi in zip(no_flip, x) for _, _, f in crop_offsets(o, xi, 4))
    digits = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    out = data.augment_batch(digits, 1, False)
    assert out.shape == digits.shape and all(crop_offsets(o, d, 1) for o, d in zip(out, digits))


def test_normalize():
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = data.normalize(x, mean, std)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-5)
    already_float = x.float()
    assert torch.allclose(data.normalize(already_float, mean, std), expected, atol=1e-5)
    assert torch.equal(already_float, x.float())  # the input is not modified in place


def test_streaming_synthetic_epochs_workers_and_noise_match_map_style():
    cfg = data_config(dataset="synthetic", synthetic_size=600, noise="symmetric", noise_rate=0.4, noise_seed=1)
    mapped_ds, _, mapped_info = data.prepare_data(cfg)
    mapped = data.to_tensors(mapped_ds)
    expected = sorted(zip((im.numpy().tobytes() for im in mapped["image"]), mapped["label"].tolist()))
    stream, _, stream_info = data.prepare_data({**cfg, "streaming": True})
    assert stream_info == mapped_info._replace(input_path="stream")  # statistics from the same first examples
    assert mapped_info.noise == noise.resolve_noise("symmetric", 0.4, 1, 10)  # resolved once, carried on DatasetInfo
    mapped_record, stream_record = (
        noise.noise_record(d, i.noise) for d, i in ((mapped_ds, mapped_info), (stream, stream_info))
    )
    assert stream_record["num_noisy"] == mapped_record["num_noisy"] > 0
    assert sorted(stream_record["noisy_keys"]) == sorted(mapped_record["noisy_keys"])

    def epoch(epoch, workers, processes=1):
        rows = []
        for rank in range(processes):
            for b in data.stream_batches(
                stream, 32, 0, epoch, rank, processes, 200, drop_last=False, num_workers=workers
            ):
                assert b["image"].shape[1:] == (3, 32, 32) and b["image"].dtype == torch.uint8
                rows += list(zip((im.numpy().tobytes() for im in b["image"]), b["label"].tolist()))
        return rows

    first, second = epoch(0, 0, processes=2), epoch(1, 0, processes=2)
    assert sorted(first) == sorted(second) == expected  # each example once per epoch, same noisy label
    assert first != second  # set_epoch reshuffles
    assert sorted(epoch(0, 2)) == expected  # decoding in 2 DataLoader workers shards once as well
    full = [len(b["label"]) for b in data.stream_batches(stream, 64, 0, 0, 0, 1, num_workers=0)]
    assert full == [64] * (600 // 64)  # by default every batch is full


@pytest.fixture
def offline_hub(monkeypatch):
    """The Hub in offline mode (no cached copies: the caches are private to the test)."""
    offline(monkeypatch)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--dataset", "tinyimagenet"],
            "unknown dataset 'tinyimagenet': choose one of digits, synthetic, cifar10, cifar100, imagenet",
        ),
        (["--dataset", "cifar10"], "cannot load 'uoft-cs/cifar10' from the Hugging Face Hub (offline mode"),
        (["--dataset", "cifar10", "--data-dir", "/no/such/folder"], "--data-dir /no/such/folder: no such folder"),
        (["--noise", "symmetric", "--noise-rate", "1.0"], "[0, 1)"),
        (["--label-column", "target"], "no label column 'target': the dataset has columns"),
        (["--image-column", "pixels"], "no image column 'pixels': the dataset has columns"),
        (["--noise", "asymmetric", "--noise-rate", "0.2"], "asymmetric noise needs class structure"),
        (["--noise", "file"], "--noise file needs --noise-file"),
        (
            ["--noise", "file", "--noise-file", "{short}", "--noise-key", "worse_label"],
            "has 100 labels but the train split has 1437",
        ),
        (["--noise", "file", "--noise-file", "{short}", "--noise-key", "aggre_label"], "has no key 'aggre_label'"),
    ],
)
def test_bad_data_input_through_train_py(tmp_path, capsys, offline_hub, flags, message):
    import train

    short = tmp_path / "short.pt"
    torch.save({"clean_label": np.zeros(100, dtype=np.int64), "worse_label": np.zeros(100, dtype=np.int64)}, short)
    flags = [f.format(short=short) for f in flags]
    rc = train.cli(["--cpu", "--max-steps", "2", "--output-dir", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
