import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from medmnist import INFO

from medformer_hf import MedformerConfig, MedformerImageProcessor
from medformer_hf.data import (
    BEST_PUBLISHED_28,
    CATALOGUE,
    RESNET18_BASELINES,
    MedformerCollator,
    TaskBatchSampler,
    build_multitask_dataset,
    dataset_info,
    load_medmnist,
    multitask_dataloader,
    stratified_subset,
)
from medformer_hf.data import medmnist as medmnist_module

from .conftest import DATA_DIR, REPO_ROOT

LOCAL_FILES = sorted(path.stem for path in DATA_DIR.glob("*.npz"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("medmnist_cache")


# ------------------------------------------------------------------------------------------ catalogue


def test_catalogue_covers_all_medmnist_sets_in_the_model_vocabularies():
    config = MedformerConfig()
    assert len(CATALOGUE) == 18
    assert sum(info.spatial_dims == 3 for info in CATALOGUE.values()) == 6
    for name, info in CATALOGUE.items():
        assert info.modality in config.modality_names and info.body_part in config.body_part_names, name
        assert info.split_sizes == {
            "train": INFO[name]["n_samples"]["train"],
            "validation": INFO[name]["n_samples"]["val"],
            "test": INFO[name]["n_samples"]["test"],
        }
        assert len(info.labels) == len(INFO[name]["label"])
    assert CATALOGUE["chestmnist"].task_type == "multilabel" and CATALOGUE["retinamnist"].task_type == "ordinal"
    assert CATALOGUE["vesselmnist3d"].sizes == (28, 64) and CATALOGUE["pathmnist"].filename(64) == "pathmnist_64.npz"
    # A whole config can be built from the catalogue.
    MedformerConfig(tasks={name: info.task_spec() for name, info in CATALOGUE.items()})


def test_reference_results_cover_every_set_and_best_is_at_least_resnet18():
    assert set(RESNET18_BASELINES) == set(BEST_PUBLISHED_28) == set(CATALOGUE)
    for name, best in BEST_PUBLISHED_28.items():
        for metric in ("acc", "auc"):
            assert RESNET18_BASELINES[name][metric] <= best[metric] <= 1, (name, metric)


def test_unknown_dataset_and_size_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown MedMNIST dataset 'brainmnist'; known: "):
        dataset_info("brainmnist")
    assert dataset_info("PneumoniaMNIST").name == "pneumoniamnist"
    with pytest.raises(ValueError, match=r"comes in sizes \[28, 64\], not 128"):
        load_medmnist("vesselmnist3d", size=128, data_dir=DATA_DIR)


# ------------------------------------------------------------------------------------------ local files


@pytest.mark.parametrize("name", LOCAL_FILES)
def test_local_files_load_exactly(name, cache_dir):
    info = CATALOGUE[name]
    dataset = load_medmnist(name, data_dir=DATA_DIR, download=False, cache_dir=cache_dir)
    archive = np.load(DATA_DIR / f"{name}.npz")
    for split, prefix in (("train", "train"), ("validation", "val"), ("test", "test")):
        data = dataset[split]
        assert len(data) == INFO[name]["n_samples"][prefix]
        pixels = np.asarray(data.with_format("numpy")["pixel_values"])
        raw = archive[f"{prefix}_images"]
        expected = np.moveaxis(raw, -1, 1) if info.num_channels == 3 else raw[:, None]
        np.testing.assert_array_equal(pixels, expected)
        np.testing.assert_array_equal(np.asarray(data["label"]), archive[f"{prefix}_labels"][:, 0])
        assert set(data.unique("modality")) == {info.modality} and set(data.unique("task")) == {name}
    assert dataset["train"].features["pixel_values"].dtype == "uint8"


def test_second_load_comes_from_the_arrow_cache(cache_dir, monkeypatch):
    load_medmnist("breastmnist", data_dir=DATA_DIR, cache_dir=cache_dir)

    def refuse(*args, **kwargs):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(medmnist_module, "convert_npz", refuse)
    assert len(load_medmnist("breastmnist", data_dir=DATA_DIR, cache_dir=cache_dir)["train"]) == 546


def test_a_cache_built_by_another_process_meanwhile_is_used(tmp_path, monkeypatch):
    """Two runs starting together on a fresh machine both convert; the one that renames second must not fail."""
    convert = medmnist_module.convert_npz

    def convert_while_another_process_finishes_first(*args, **kwargs):
        monkeypatch.setattr(medmnist_module, "convert_npz", convert)
        load_medmnist("breastmnist", data_dir=DATA_DIR, cache_dir=tmp_path)  # the other process's whole load
        return convert(*args, **kwargs)

    monkeypatch.setattr(medmnist_module, "convert_npz", convert_while_another_process_finishes_first)
    dataset = load_medmnist("breastmnist", data_dir=DATA_DIR, cache_dir=tmp_path)
    assert len(dataset["train"]) == 546
    assert [path.name for path in (tmp_path / "arrow").iterdir() if path.name.startswith(".")] == []


def _write_npz(path: Path, source: Path, **changes) -> None:
    arrays = dict(np.load(source))
    arrays.update(changes)
    np.savez(path, **arrays)


def _flip_a_byte(path: Path) -> None:
    """One flipped byte in the middle of a member (a disk or transfer error)."""
    content = bytearray((DATA_DIR / "breastmnist.npz").read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))


def test_a_replaced_file_with_the_same_size_and_time_is_not_served_stale(tmp_path):
    """The cache is keyed on content: a changed label, then a corrupt file, with size and mtime put back."""
    data_dir, cache = tmp_path / "data", tmp_path / "cache"
    data_dir.mkdir()
    path = data_dir / "breastmnist.npz"
    _write_npz(path, DATA_DIR / "breastmnist.npz")
    first_label = int(np.load(path)["test_labels"][0, 0])
    assert load_medmnist("breastmnist", data_dir=data_dir, cache_dir=cache)["test"][0]["label"] == first_label
    stat = path.stat()
    labels = np.load(path)["test_labels"].copy()
    labels[0, 0] = 1 - first_label
    _write_npz(path, DATA_DIR / "breastmnist.npz", test_labels=labels)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert load_medmnist("breastmnist", data_dir=data_dir, cache_dir=cache)["test"][0]["label"] == 1 - first_label
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ValueError, match="cannot be read"):
        load_medmnist("breastmnist", data_dir=data_dir, cache_dir=cache)


def test_what_a_killed_writer_left_is_removed_by_the_next_load(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    arrow, host = tmp_path / "arrow", socket.gethostname()
    abandoned = arrow / f".breastmnist_28_v1_x.{host}.pid{dead.pid}.abc"
    in_progress = arrow / f".organmnist3d_28_v1_x.{host}.pid{os.getpid()}.def"
    other_machine = arrow / f".organmnist3d_28_v1_x.another-node.pid{dead.pid}.ghi"  # shared filesystem: not ours
    for folder in (abandoned, in_progress, other_machine):
        folder.mkdir(parents=True)
        (folder / "data.arrow").write_bytes(b"0" * 1000)
    load_medmnist("breastmnist", data_dir=DATA_DIR, cache_dir=tmp_path)
    assert not abandoned.exists() and in_progress.exists() and other_machine.exists()


@pytest.mark.parametrize(
    ("make_bad_file", "message"),
    [
        (lambda path: path.write_bytes((DATA_DIR / "breastmnist.npz").read_bytes()[:100_000]), "cannot be read"),
        (
            lambda path: _write_npz(path, DATA_DIR / "breastmnist.npz", train_images=np.zeros((10, 28, 28), np.uint8)),
            r"train_images is uint8 \(10, 28, 28\), expected uint8 \(546, 28, 28\)",
        ),
        (
            lambda path: _write_npz(path, DATA_DIR / "breastmnist.npz", test_labels=np.full((156, 1), 7, np.uint8)),
            "test_labels holds values 7..7, outside 0..1",
        ),
        (_flip_a_byte, "cannot be read"),
        (lambda path: np.save(open(path, "wb"), np.zeros((4, 28, 28), np.uint8)), r"single array \(a .npy file\)"),
        (
            lambda path: _write_npz(path, DATA_DIR / "breastmnist.npz", test_labels=np.full((156, 1), np.nan)),
            "test_labels must hold whole numbers",
        ),
        (
            lambda path: _write_npz(path, DATA_DIR / "breastmnist.npz", val_labels=np.full((78, 1), 0.5)),
            "val_labels must hold whole numbers",
        ),
    ],
    ids=["truncated", "wrong-split-size", "label-out-of-range", "flipped-byte", "npy", "nan-label", "half-label"],
)
def test_bad_local_file_is_a_clear_error_and_leaves_no_cache(tmp_path, make_bad_file, message):
    data_dir, cache = tmp_path / "data", tmp_path / "cache"
    data_dir.mkdir()
    make_bad_file(data_dir / "breastmnist.npz")
    with pytest.raises(ValueError, match=message) as error:
        load_medmnist("breastmnist", data_dir=data_dir, download=False, cache_dir=cache)
    assert "breastmnist.npz" in str(error.value)
    assert not (cache / "arrow").exists() or not any((cache / "arrow").iterdir())


def test_missing_file_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDMNIST_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="breastmnist.npz is not in .*pass download=True"):
        load_medmnist("breastmnist", data_dir=tmp_path, download=False, cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------------------ download over HTTP


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def local_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving `served/good` (the real file) and `served/truncated` (a cut copy)."""
    good, truncated = tmp_path / "served" / "good", tmp_path / "served" / "truncated"
    good.mkdir(parents=True)
    truncated.mkdir(parents=True)
    shutil.copy(DATA_DIR / "breastmnist.npz", good)
    (truncated / "breastmnist.npz").write_bytes((DATA_DIR / "breastmnist.npz").read_bytes()[:300_000])
    handler = functools.partial(QuietHandler, directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_from_a_mirror_checks_md5_and_caches(tmp_path, local_server, monkeypatch):
    monkeypatch.delenv("MEDMNIST_ROOT", raising=False)
    cache = tmp_path / "cache"
    dataset = load_medmnist("breastmnist", mirror=f"{local_server}/good/", data_dir=None, cache_dir=cache)
    assert (cache / "npz" / "breastmnist.npz").read_bytes() == (DATA_DIR / "breastmnist.npz").read_bytes()
    assert len(dataset["test"]) == 156
    # Now cached: no server needed.
    again = load_medmnist("breastmnist", mirror="http://127.0.0.1:9/unused", cache_dir=cache)
    assert again["train"][0]["label"] == dataset["train"][0]["label"]
    shutil.copy(DATA_DIR / "retinamnist.npz", tmp_path / "served" / "good")
    monkeypatch.setenv("MEDMNIST_MIRROR", f"{local_server}/good")  # the scripts' way (they have no mirror flag)
    from_environment = load_medmnist("retinamnist", data_dir=None, cache_dir=cache)
    assert (cache / "npz" / "retinamnist.npz").read_bytes() == (DATA_DIR / "retinamnist.npz").read_bytes()
    assert len(from_environment["test"]) == 400


def test_truncated_download_is_an_error_and_leaves_nothing(tmp_path, local_server, monkeypatch):
    monkeypatch.delenv("MEDMNIST_ROOT", raising=False)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="breastmnist.npz .* has MD5 .* expected 750601b1f35ba3300ea97c75c52ff8f6"):
        load_medmnist("breastmnist", mirror=f"{local_server}/truncated", cache_dir=cache)
    leftovers = [path for path in cache.rglob("*") if path.is_file()]
    assert leftovers == []
    assert not (cache / "arrow").exists()


def test_unreachable_mirror_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDMNIST_ROOT", raising=False)
    with pytest.raises(
        ConnectionError, match="Could not download breastmnist.npz from http://127.0.0.1:9/.*MEDMNIST_MIRROR"
    ):
        load_medmnist("breastmnist", mirror="http://127.0.0.1:9", cache_dir=tmp_path / "cache")
    assert not any(path.is_file() for path in (tmp_path / "cache").rglob("*"))


# ------------------------------------------------------------------------------------------ sampling


def test_batches_are_shape_homogeneous_and_collate_through_the_processor(cache_dir):
    names = ["breastmnist", "retinamnist", "vesselmnist3d"]
    dataset = build_multitask_dataset(names, data_dir=DATA_DIR, download=False, cache_dir=cache_dir)
    processor = MedformerImageProcessor()
    model_tasks = ["vesselmnist3d", "extra", "breastmnist", "retinamnist"]
    collator = MedformerCollator(dataset, processor, task_names=model_tasks)
    sampler = TaskBatchSampler(dataset.sizes, batch_size=8, seed=0, num_batches=30, num_replicas=1, rank=0)
    seen = set()
    for indices in sampler:
        raw = dataset.__getitems__(indices)
        assert raw["pixel_values"].dtype == np.uint8
        batch = collator(raw)
        name = dataset.names[raw["task_index"]]
        info = CATALOGUE[name]
        assert batch["pixel_values"].shape == (8, *info.image_shape(28))
        assert batch["task_ids"].unique().tolist() == [model_tasks.index(name)]
        assert batch["modality_ids"].unique().tolist() == [processor.modality_names.index(info.modality)]
        expected = processor(raw["pixel_values"], spatial_dims=info.spatial_dims, modality=info.modality)
        assert torch.equal(batch["pixel_values"], expected["pixel_values"])
        seen.add(name)
    assert seen == set(names)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_task_frequencies_follow_the_temperature_formula(alpha):
    sizes = [100, 1_000, 10_000]
    sampler = TaskBatchSampler(sizes, batch_size=4, alpha=alpha, seed=1, num_batches=6_000, num_replicas=1, rank=0)
    counts = np.zeros(3)
    for batch in sampler:
        counts[np.searchsorted(sampler.offsets, batch[0], side="right") - 1] += 1
    expected = np.asarray(sizes, float) ** alpha / (np.asarray(sizes, float) ** alpha).sum()
    np.testing.assert_allclose(counts / counts.sum(), expected, atol=0.02)


def test_sampler_is_deterministic_and_epochs_differ():
    def batches(epoch, seed=0):
        sampler = TaskBatchSampler([30, 50], batch_size=4, seed=seed, num_batches=10, num_replicas=1, rank=0)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert batches(0) == batches(0)
    assert batches(0) != batches(1)
    assert batches(0, seed=1) != batches(0)
    resumed = TaskBatchSampler([30, 50], batch_size=4, seed=0, num_batches=10, num_replicas=1, rank=0)
    resumed.set_epoch(1, start_batch=6)
    assert len(resumed) == 4 and list(resumed) == batches(1)[6:]


def test_a_batch_is_augmented_alike_in_workers_and_after_a_resume(cache_dir):
    """Each batch's augmentation draws from its own seed (run seed, epoch, batch, rank): loading in worker processes
    (whose RNG a checkpoint cannot hold) or resuming mid-epoch gives the very batches an uninterrupted run gets."""
    dataset = build_multitask_dataset(["breastmnist", "vesselmnist3d"], "train", cache_dir=cache_dir, data_dir=DATA_DIR)
    collator = MedformerCollator(dataset, MedformerImageProcessor(), augment=True, views=2)

    def batches(num_workers: int, start_batch: int = 0) -> list[dict[str, torch.Tensor]]:
        loader = multitask_dataloader(dataset, collator, batch_size=4, seed=3, num_batches=6, num_workers=num_workers)
        loader.batch_sampler.set_epoch(1, start_batch)
        torch.manual_seed(100 * num_workers + start_batch)  # the global RNG plays no part
        return list(loader)

    plain = batches(0)
    for other in (batches(2), [None] * 4 + batches(0, start_batch=4)):
        for expected, found in zip(plain, other, strict=True):
            if found is not None:
                assert torch.equal(expected["pixel_values"], found["pixel_values"])
                assert torch.equal(expected["view_pixel_values"], found["view_pixel_values"])
    assert not torch.equal(plain[0]["pixel_values"], plain[0]["view_pixel_values"])  # two independent views


def test_ranks_take_the_same_task_and_disjoint_samples():
    kwargs = dict(dataset_sizes=[18, 400], batch_size=4, seed=0, num_batches=200, num_replicas=2)
    rank0, rank1 = list(TaskBatchSampler(rank=0, **kwargs)), list(TaskBatchSampler(rank=1, **kwargs))
    for first, second in zip(rank0, rank1, strict=True):
        assert (first[0] >= 18) == (second[0] >= 18)  # same task
        assert not set(first) & set(second)


def test_two_accelerate_processes_see_disjoint_samples(tmp_path):
    # On a CPU-only machine accelerate 1.15 starts 2 gloo processes with --multi_gpu plus ACCELERATE_USE_CPU
    # (`--cpu --num_processes 2` runs a single process).
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "ACCELERATE_USE_CPU": "true"}
    command = [
        *(sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2"),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *(str(REPO_ROOT / "tests" / "accelerate_sampler_worker.py"), str(tmp_path)),
    ]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["world"] for rank in ranks] == [2, 2]
    assert ranks[0]["tasks"] == ranks[1]["tasks"]
    for first, second in zip(ranks[0]["batches"], ranks[1]["batches"], strict=True):
        assert not set(first) & set(second)


# ------------------------------------------------------------------------------------------ label fractions


@pytest.mark.parametrize("name", ["retinamnist", "breastmnist", "organmnist3d"])
def test_label_fraction_keeps_a_stratified_seeded_tenth(name, cache_dir):
    full = load_medmnist(name, data_dir=DATA_DIR, cache_dir=cache_dir)["train"]
    labels = np.asarray(full["label"])
    subset = build_multitask_dataset([name], label_fraction=0.1, seed=7, data_dir=DATA_DIR, cache_dir=cache_dir)
    kept = np.asarray(subset.splits[0]["label"])
    for value in np.unique(labels):
        assert abs((kept == value).sum() - 0.1 * (labels == value).sum()) <= 1, value
    assert set(np.unique(kept)) == set(np.unique(labels))
    same = build_multitask_dataset([name], label_fraction=0.1, seed=7, data_dir=DATA_DIR, cache_dir=cache_dir)
    other = build_multitask_dataset([name], label_fraction=0.1, seed=8, data_dir=DATA_DIR, cache_dir=cache_dir)
    assert same.splits[0]["pixel_values"] == subset.splits[0]["pixel_values"]
    assert other.splits[0]["pixel_values"] != subset.splits[0]["pixel_values"]


def test_multilabel_subset_keeps_every_label():
    rng = np.random.default_rng(0)
    labels = (rng.random((500, 6)) < [0.3, 0.3, 0.3, 0.3, 0.3, 0.004]).astype(np.uint8)
    kept = stratified_subset(labels, 0.01, seed=0)
    assert all(labels[kept, column].any() for column in range(6) if labels[:, column].any())


def test_medmnist_shaped_labels_are_stratified_by_class():
    """MedMNIST's own `(N, 1)` label arrays keep every class, as `(N,)` ones do (not a random draw of one column)."""
    labels = np.load(DATA_DIR / "retinamnist.npz")["train_labels"]
    assert labels.shape[1] == 1
    kept = stratified_subset(labels, 0.01, seed=0)
    np.testing.assert_array_equal(kept, stratified_subset(labels[:, 0], 0.01, seed=0))
    assert set(labels[kept, 0]) == set(labels[:, 0])


def test_label_fraction_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"label_fraction must be in \(0, 1\], got 1.5"):
        build_multitask_dataset(["breastmnist"], label_fraction=1.5, data_dir=DATA_DIR)


@pytest.mark.parametrize("split", ["validation", "test"])
def test_label_fraction_never_shrinks_an_evaluation_split(split):
    """One set of arguments reused for the test loader must not score a model on a tenth of the test set."""
    with pytest.raises(ValueError, match=f"the {split} split is always whole"):
        build_multitask_dataset(["breastmnist"], split, label_fraction=0.1, data_dir=DATA_DIR)
    assert len(build_multitask_dataset(["breastmnist"], split, data_dir=DATA_DIR)) in (78, 156)


@pytest.mark.parametrize("split", ["val", "valid", "Test"])
def test_an_unknown_split_names_the_splits_before_any_file_is_read(split, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown split .*\['train', 'validation', 'test'\]"):
        build_multitask_dataset(["breastmnist"], split=split, data_dir=tmp_path / "absent")
