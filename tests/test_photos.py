"""Photos of any size: the decode-per-batch and streaming paths end to end, the paper's transform, unreadable
images, Clothing1M's release layout, and a Hub-layout `img` column through the label noise."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import TORCHRUN, data_config, kill_once_written, read_metrics, run_script
from PIL import Image
from safetensors.torch import load_file

import data
import eval as evaluate
import noise
import train

PHOTO_RUN = [
    "--cpu",
    "--resize",
    "36",
    "--image-size",
    "32",
    "--model",
    "digits_cnn",
    "--weights",
    "none",
    "--batch-size",
    "8",
    "--num-workers",
    "1",
    "--max-bad-fraction",
    "0.1",
]
MODES = ("RGB", "L", "CMYK", "RGBA", "P")
COLOURS = ((200, 40, 40), (40, 40, 200))  # class 0 reddish, class 1 bluish: learnable in a few steps


def photo(rng: np.random.Generator, label: int, mode: str) -> Image.Image:
    """A 40-90 px image of the class colour plus pixel noise, in PIL mode `mode`."""
    h, w = rng.integers(40, 91, size=2)
    pixels = np.asarray(COLOURS[label], dtype=np.int16) + rng.integers(-40, 41, size=(h, w, 3))
    im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return im.convert(mode, palette=Image.Palette.ADAPTIVE) if mode == "P" else im.convert(mode)


def save(im: Image.Image, path_stem: Path) -> Path:
    """JPEG where the mode allows it (RGB, L, CMYK), PNG for RGBA and palette images."""
    path = path_stem.with_suffix(".jpg" if im.mode in ("RGB", "L", "CMYK") else ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """train/ (40 images, 2 classes, every mode, one truncated JPEG) and test/ (10 images)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 10)):
        for i in range(n):
            label = i % 2
            path = save(photo(rng, label, MODES[i % len(MODES)]), root / split / f"class{label}" / f"{i:03d}")
            if split == "train" and i == 5:
                truncate(path)
    return root


def test_mixed_sizes_and_modes_take_the_decode_path(folder):
    train_ds, test_ds, info = data.prepare_data(data_config(dataset=str(folder), resize=36, image_size=32))
    assert (info.input_path, info.resize, info.image_size, info.channels) == ("decode", 36, 32, 3)
    assert info.photo  # the one value every input branch reads
    assert info.mean == data.IMAGENET_STATS[0]
    batches = data.EvalBatches(test_ds, info, torch.device("cpu"), batch_size=10)
    images, labels = next(iter(batches)), batches.label
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8
    red = images[labels == 0].float().mean((0, 2, 3))
    assert red[0] > red[2] + 50  # RGB order kept through L/CMYK/RGBA/P conversions (greyscale ones pull it down)
    with pytest.raises(ValueError, match="--in-memory yes needs images of one size"):
        data.prepare_data(data_config(dataset=str(folder), in_memory="yes"))
    with pytest.raises(ValueError, match="--image-size 40 must be between 1 and --resize 36"):
        data.prepare_data(data_config(dataset=str(folder), resize=36, image_size=40))


def test_crops_and_flips_are_a_pure_function_of_seed_step_example(folder):
    train_ds, _, info = data.prepare_data(data_config(dataset=str(folder), resize=36, image_size=32))
    steps = data.DecodedSteps(train_ds, info, 8, seed=3, rank=0, world=1)
    a, b, other = steps[7], steps[7], steps[8]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])
    assert len(a["label"]) == 8 and not torch.equal(a["index"], other["index"])
    rng = lambda: np.random.default_rng([3, 7, 11])  # noqa: E731
    boxes = {data.crop_box(rng(), 80, 60, 36, 32, "paper") for _ in range(3)}
    assert len(boxes) == 1  # same (seed, step, example): same crop and flip
    box, _ = data.crop_box(None, 72, 36, 36, 32, "paper")
    assert box == (4.0, 2.0, 68.0, 34.0)  # evaluation: warp 72x36 -> 36x36, centre crop 32 at offset 2
    for _ in range(20):
        (x0, y0, x1, y1), _ = data.crop_box(np.random.default_rng(_), 80, 60, 36, 32, "rrc")
        assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 60
        assert 0.08 * 80 * 60 * 0.9 <= (x1 - x0) * (y1 - y0) and 3 / 4 * 0.9 <= (x1 - x0) / (y1 - y0) <= 4 / 3 * 1.1


def test_unreadable_images_are_skipped_and_the_batch_keeps_its_size(folder):
    train_ds, _, info = data.prepare_data(data_config(dataset=str(folder), resize=36, image_size=32))
    table = train_ds.with_format("arrow")[:]
    batch = data.photo_batch(table, np.arange(len(table)), info, seed=0, key=(0,))
    assert len(batch["bad"]) == 1 and batch["bad"][0].endswith("005.jpg")
    assert batch["image"].shape == (40, 3, 32, 32) and len(set(batch["index"].tolist())) == 39  # its slot: another row


def run_photos(folder: Path, out: Path, *flags: str) -> list[dict]:
    rc = train.cli([*PHOTO_RUN, "--dataset", str(folder), "--output-dir", str(out), *flags])
    assert rc == 0
    return read_metrics(out)


def test_image_folder_trains_map_style_and_counts_the_bad_file(folder, tmp_path, capsys):
    metrics = run_photos(
        folder,
        tmp_path / "map",
        "--max-steps",
        "30",
        "--eval-every",
        "15",
        "--lr",
        "0.05",
        "--noise",
        "symmetric",
        "--noise-rate",
        "0.2",
    )
    err = capsys.readouterr().err
    assert "warning: skipped unreadable image" in err and "005.jpg" in err
    assert [m["bad_images"] for m in metrics] == [1, 1]
    assert metrics[-1]["test_acc"] >= 0.8  # red against blue; chance is 0.5
    assert 0.0 <= metrics[-1]["clean_fit"] <= 1.0 and metrics[-1]["test_examples"] == 10
    config = json.loads((tmp_path / "map" / "config.json").read_text())
    assert (config["input_path"], config["resize"], config["image_size"], config["augment"]) == (
        "decode",
        36,
        32,
        "paper",
    )


def test_image_folder_trains_streaming(folder, tmp_path):
    metrics = run_photos(
        folder,
        tmp_path / "stream",
        "--streaming",
        "--max-steps",
        "30",
        "--eval-every",
        "30",
        "--lr",
        "0.05",
        "--augment",
        "rrc",
    )
    assert metrics[-1]["bad_images"] == 1 and metrics[-1]["test_examples"] == 10
    assert metrics[-1]["test_acc"] >= 0.8  # it learns (1.0 here); chance is 0.5
    assert json.loads((tmp_path / "stream" / "config.json").read_text())["input_path"] == "stream"


def test_image_folder_trains_on_two_cpu_processes(folder, tmp_path):
    out = tmp_path / "ddp"
    proc = run_script(
        *TORCHRUN,
        "train.py",
        *PHOTO_RUN,
        "--dataset",
        str(folder),
        "--max-steps",
        "6",
        "--eval-every",
        "6",
        "--output-dir",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(out)
    assert metrics[-1]["process_steps"] == [6, 6] and metrics[-1]["test_examples"] == 10
    assert metrics[-1]["bad_images"] == 1  # 48 rows drawn from 40: every file met by one of the processes


def test_killed_and_resumed_decode_run_equals_an_uninterrupted_one(folder, tmp_path):
    flags = [
        "train.py",
        *PHOTO_RUN,
        "--dataset",
        str(folder),
        "--deterministic",
        "--max-steps",
        "60",
        "--eval-every",
        "10",
        "--save-every",
        "10",
        "--noise",
        "symmetric",
        "--noise-rate",
        "0.2",
    ]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_script(*flags, "--output-dir", str(whole)).returncode == 0
    kill_once_written([*flags, "--output-dir", str(cut)], cut / "checkpoints" / "step_000020" / "trainer_state.json")
    assert not (cut / "model.safetensors").exists(), "the run finished before it could be killed"
    resumed = run_script(*flags, "--output-dir", str(cut), "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_metrics(cut) == read_metrics(whole)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_too_many_unreadable_images_stop_the_run_naming_them(folder, tmp_path, capsys):
    rc = train.cli(
        [
            *PHOTO_RUN,
            "--dataset",
            str(folder),
            "--max-bad-fraction",
            "0",
            "--max-steps",
            "6",
            "--output-dir",
            str(tmp_path / "bad"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: 1 unreadable training images of 40") and "005.jpg" in err[-1]


# ----------------------------------------------------------------------------- Clothing1M


def write_clothing1m(root: Path, clean_overlap: dict[int, int]) -> None:
    """A release-shaped folder: 28 noisy training keys (2 per class), 14 clean test keys, and clean labels
    for the training rows in clean_overlap ({row: clean label})."""
    rng = np.random.default_rng(1)
    (root / "category_names_eng.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "category_names_eng.txt").write_text("".join(f"Class {c}\n" for c in range(14)))
    train_keys, test_keys = (
        [f"images/{i % 3}/a{i}/t{i}.jpg" for i in range(28)],
        [f"images/9/b/v{i}.jpg" for i in range(14)],
    )
    for i, key in enumerate(train_keys + test_keys):
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(rng, i % 2, "RGB").save(path)
    noisy = [(k, i % 14) for i, k in enumerate(train_keys)]
    clean = [(test_keys[i], i) for i in range(14)] + [(train_keys[r], c) for r, c in clean_overlap.items()]
    (root / "noisy_label_kv.txt").write_text("".join(f"{k} {v}\n" for k, v in noisy))
    (root / "clean_label_kv.txt").write_text("".join(f"{k} {v}\n" for k, v in clean))
    (root / "noisy_train_key_list.txt").write_text("".join(k + "\n" for k in train_keys))
    (root / "clean_test_key_list.txt").write_text("".join(k + "\n" for k in test_keys))
    (root / "clean_val_key_list.txt").write_text("")


OVERLAP = {0: 0, 1: 1, 2: 5, 3: 7, 4: 4, 5: 6}  # rows 2, 3 and 5 are noisy (labels 2, 3, 5 in noisy_label_kv)


def test_clothing1m_release_trains_and_evaluates_on_the_clean_overlap(tmp_path, capsys):
    root, out = tmp_path / "clothing1m", tmp_path / "run"
    write_clothing1m(root, OVERLAP)
    train_ds, test_ds, info = data.prepare_data(data_config(dataset="clothing1m", data_dir=str(root)))
    assert (len(train_ds), len(test_ds), info.num_classes, info.clean_subset) == (28, 14, 14, True)
    assert data.train_eval_rows(train_ds, None).sort().values.tolist() == sorted(OVERLAP)
    labels = data.label_tensors(train_ds)
    assert labels["is_noisy"].nonzero().squeeze(1).tolist() == [2, 3, 5]
    assert (
        train.cli(
            [
                *PHOTO_RUN,
                "--dataset",
                "clothing1m",
                "--data-dir",
                str(root),
                "--max-steps",
                "4",
                "--eval-every",
                "4",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert "measured on the 6 training examples with a known clean label" in stdout
    last = read_metrics(out)[-1]
    assert last["test_examples"] == 14 and last["bad_images"] == 0
    fit = [m for m in ("clean_fit", "noisy_fit") if abs(last[m] * 3 - round(last[m] * 3)) > 1e-6]
    assert not fit  # each a fraction of the 3 clean and the 3 noisy overlap rows
    evaluate.main([str(out), "--json", "--cpu"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 14 and result["test_acc"] == pytest.approx(last["test_acc"], abs=1e-6)
    evaluate.main([str(out), "--audit", "--cpu"])
    assert (
        "against the real flips of the 6 training examples with a known clean label (3 noisy, rate 0.500)"
        in capsys.readouterr().out
    )  # Clothing1M's real noise, measured where the clean label is known
    rows = (out / "label_issues.csv").read_text().splitlines()
    assert rows[0].startswith("rank,index,key,given_label") and all(",images/" in r for r in rows[1:])
    # every training example its batches held, not only the clean overlap (4 steps of 8 from 3 batches per epoch)
    seen = int((load_file(str(out / "dynamics.safetensors"))["early_count"] > 0).sum())
    assert len(rows) - 1 == seen > 20


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda r: (r / "clean_test_key_list.txt").unlink(), "missing clean_test_key_list.txt"),
        (
            lambda r: (r / "noisy_train_key_list.txt").open("a").write("images/x/y/z.jpg\n"),
            "1 keys of noisy_train_key_list.txt have no label in noisy_label_kv.txt (first: images/x/y/z.jpg)",
        ),
        (
            lambda r: (r / "noisy_label_kv.txt").open("a").write("images/0/a0/t0.jpg 14\n"),
            "label 14 of images/0/a0/t0.jpg is outside 0..13",
        ),
        (lambda r: (r / "images/9/b/v3.jpg").unlink(), "1 images of clean_test_key_list.txt are missing (first: "),
    ],
)
def test_clothing1m_bad_release_gives_one_line(tmp_path, breakage, message):
    write_clothing1m(tmp_path, OVERLAP)
    breakage(tmp_path)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        data.prepare_data(data_config(dataset="clothing1m", data_dir=str(tmp_path)))
    assert "\n" not in str(err.value)


def test_add_label_noise_on_a_hub_layout_img_column():
    rng = np.random.default_rng(0)
    images = list(rng.integers(0, 256, size=(60, 8, 8, 3), dtype=np.uint8))
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    hub = datasets.Dataset.from_dict({"img": images, "label": np.arange(60) % 10}, features=features)
    noisy = noise.add_label_noise(
        hub, noise.resolve_noise("symmetric", 0.5, 0, 10), image_column=data.find_image_column(hub.features)
    )
    renamed = noise.add_label_noise(hub.rename_column("img", "image"), noise.resolve_noise("symmetric", 0.5, 0, 10))
    assert noisy["label"] == renamed["label"] and noisy["example_key"] == renamed["example_key"]
    assert 0 < sum(noisy["is_noisy"]) < 60


class TorchDraws:
    """The numpy Generator calls crop_box makes, served from torch's global RNG in RandomResizedCrop.get_params' order."""

    def uniform(self, low: float, high: float) -> float:
        return torch.empty(1).uniform_(low, high).item()

    def integers(self, low: int, high: int) -> int:
        return torch.randint(low, high, size=(1,)).item()

    def random(self) -> float:
        return torch.rand(1).item()


def test_rrc_crop_box_draws_torchvisions_boxes_for_the_same_generator():
    """crop_box's rrc sampling (kept by hand: decode_photo sizes JPEG draft decoding by the box) is torchvision's
    RandomResizedCrop.get_params: the same draws give the same boxes, fallback included (a 10:1 image)."""
    from torchvision.transforms import RandomResizedCrop

    for width, height in ((500, 375), (80, 60), (375, 500), (1000, 100), (33, 32)):
        for seed in range(60):
            torch.manual_seed(seed)
            (left, top, right, bottom), _ = data.crop_box(TorchDraws(), width, height, 256, 224, "rrc")
            torch.manual_seed(seed)
            i, j, h, w = RandomResizedCrop.get_params(
                torch.zeros(3, height, width), list(data.RRC_SCALE), list(data.RRC_RATIO)
            )
            assert (top, left, bottom - top, right - left) == (i, j, h, w), (width, height, seed)
