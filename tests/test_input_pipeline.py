"""The input pipeline: persistent workers that resume bit-identically, augmentation keyed by
(seed, epoch, index), the batch (GPU) augmentation path held to MONAI's per-image transforms,
and the per-epoch data-stall metric. The "GPU" path runs on CPU tensors here."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fit_job import demo_split, tiny_config
from monai.transforms import AffineGrid, Compose, RandFlipd

from medtl.augment import (
    AffineOp,
    BatchAugment,
    affine_matrix,
    cat_params,
    epoch_augment_seed,
    monai_sampled_params,
    resolve_augment_device,
    seed_monai_item,
)
from medtl.config import TransformConfig
from medtl.errors import ConfigError, MedtlError
from medtl.models import get_backbone_spec
from medtl.training import fit
from medtl.training.engine import Engine
from medtl.training.sampling import build_train_sampler
from medtl.training.strategies import get_strategy
from medtl.transforms import build_transforms

JOB = Path(__file__).parent / "fit_job.py"
# Every preset and augmentation level: (preset, spatial size, backbone, in_channels).
PRESETS = {
    "cxr_2d": ([24, 20], "tf_efficientnet_lite0", 1),
    "ct_2p5d": ([20, 24], "tf_efficientnet_lite0", 3),
    "ct_3d": ([10, 12, 8], "densenet121_3d", 1),
}
CASES = [(p, level) for p in PRESETS for level in ("light", "standard")]


def _random_ops(preset: str, level: str):
    """The preset's random part (a MONAI Compose) and the shape of one image it takes."""
    size, backbone, chans = PRESETS[preset]
    tcfg = TransformConfig(preset=preset, spatial_size=size, augment=level, slices=chans)
    pair = build_transforms(tcfg, get_backbone_spec(backbone).preprocess, chans, train=True)
    return pair.random, (pair.out_channels, *size)


def _smooth(shape, gen):
    """Normalised-looking images: smooth structure plus a little texture, values about [-2, 2]."""
    x = torch.rand(*shape, generator=gen)
    pool = torch.nn.functional.avg_pool2d if len(shape) == 4 else torch.nn.functional.avg_pool3d
    return 4 * pool(x, 3, stride=1, padding=1) - 2 + 0.1 * x


# --------------------------------------------------------------------------- GPU path vs MONAI
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: torch's thread pool only adds contention on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def _cpu_path(preset: str, level: str, n: int = 240):
    """The CPU path on ``n`` small images, one at a time as the loader runs it: (inputs,
    outputs, the parameters MONAI drew as a batch)."""
    compose, shape = _random_ops(preset, level)
    small = (shape[0], *[max(4, s // 2) for s in shape[1:]])
    images = _smooth((n, *small), torch.Generator().manual_seed(1))
    outs, params, rng = [], [], np.random.RandomState(0)
    for i, x in enumerate(images):
        seed_monai_item(compose, rng, 11, i)
        outs.append(torch.as_tensor(compose({"image": x.clone()})["image"]))
        params.append(monai_sampled_params(compose, x.shape))
    return images, torch.stack(outs), cat_params(params)


@pytest.mark.parametrize(("preset", "level"), CASES)
def test_batch_path_matches_monai_given_the_same_parameters(preset, level):
    compose, _ = _random_ops(preset, level)
    batch_aug = BatchAugment.from_monai(compose)
    assert len(batch_aug.ops) == len([t for t in compose.transforms if hasattr(t, "prob")]) >= 3
    images, ref, params = _cpu_path(preset, level)
    fired = torch.stack([p.on for p in params])  # (ops, images)
    assert fired.any(1).all() and (~fired).any(1).all(), "every op on some images, off others"
    got = batch_aug.apply(images, params)  # the batch (GPU) code path, on CPU tensors
    assert (got - ref).abs().max().item() < 1e-5
    touched = fired.any(0)
    assert torch.equal(ref[~touched], images[~touched])  # no op drawn: the image as it was
    assert (ref - images)[touched].flatten(1).abs().amax(1).min().item() > 0


@pytest.mark.parametrize("nd", [2, 3])
def test_affine_matrix_composes_like_monai(nd):
    g = torch.Generator().manual_seed(nd)
    for _ in range(5):
        rot = (torch.rand(nd if nd == 3 else 1, generator=g) - 0.5).tolist()
        shift = (4 * torch.rand(nd, generator=g) - 2).tolist()
        scale = (1 + 0.3 * (torch.rand(nd, generator=g) - 0.5)).tolist()
        _, want = AffineGrid(rotate_params=rot, translate_params=shift, scale_params=scale)(
            spatial_size=[6] * nd
        )
        got = affine_matrix(nd, *[[torch.tensor([v]) for v in p] for p in (rot, shift, scale)])
        torch.testing.assert_close(got[0], torch.as_tensor(want).float(), rtol=0, atol=1e-6)


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    grid = torch.cat([a, b]).sort().values
    ca = torch.searchsorted(a.sort().values, grid, right=True) / len(a)
    cb = torch.searchsorted(b.sort().values, grid, right=True) / len(b)
    return float((ca - cb).abs().max())


def _draws(params) -> tuple[torch.Tensor, torch.Tensor]:
    """(fired flags, the fired samples' parameter values as columns) for one op's params."""
    if hasattr(params, "matrix"):
        values = params.matrix.flatten(1)
    elif hasattr(params, "value"):
        values = params.value[:, None]
    else:  # noise: each fired sample's spread
        values = params.noise.flatten(1).std(1, keepdim=True)
    return params.on, values[params.on]


@pytest.mark.parametrize(("preset", "level"), CASES)
def test_sampled_parameters_follow_the_preset_ranges(preset, level):
    """The batch path draws each op's parameters from MONAI's distributions: the same firing
    rate, and the same range and shape of every affine entry and value (two-sample KS)."""
    compose, _ = _random_ops(preset, level)
    batch_aug = BatchAugment.from_monai(compose)
    images, _, theirs = _cpu_path(preset, level)
    n = 4000
    ours = batch_aug.sample(epoch_augment_seed(0, 0), torch.arange(n), (n, *images.shape[1:]))
    for op, a, b in zip(batch_aug.ops, ours, theirs, strict=True):
        on_a, va = _draws(a)
        on_b, vb = _draws(b)
        assert abs(on_a.float().mean().item() - op.prob) < 0.03, (op, on_a.float().mean())
        assert abs(on_b.float().mean().item() - op.prob) < 0.12
        for col in range(va.shape[1]):
            if vb[:, col].std() > 1e-6:
                assert _ks(va[:, col], vb[:, col]) < 0.3, (op, col)
            else:  # a constant entry (0 or 1 of the matrix): the same constant
                assert torch.allclose(va[:, col], vb[0, col].expand(len(va)), atol=1e-6)


def test_the_cxr_standard_rotation_reaches_its_15_degrees():
    compose, shape = _random_ops("cxr_2d", "standard")
    op = BatchAugment.from_monai(compose).ops[0]
    assert isinstance(op, AffineOp)
    assert op.rotate == ((-math.radians(15), math.radians(15)),)
    p = BatchAugment((op,)).sample(5, torch.arange(3000), (3000, *shape))[0]
    angle = torch.atan2(p.matrix[:, 1, 0], p.matrix[:, 0, 0])  # R @ T @ S: col 0 is s0 * (c, s)
    assert math.radians(14.8) < angle.abs().max().item() <= math.radians(15) + 1e-6


def test_batch_draws_depend_only_on_seed_epoch_and_index():
    compose, shape = _random_ops("cxr_2d", "standard")
    aug = BatchAugment.from_monai(compose)
    x = _smooth((5, *shape), torch.Generator().manual_seed(2))
    key = epoch_augment_seed(4, 1)
    one = aug(x, key, torch.tensor([10, 11, 12, 13, 14]))
    shuffled = aug(x[[3, 0]], key, torch.tensor([13, 10]))  # another batch, other neighbours
    assert torch.equal(shuffled, one[[3, 0]])
    assert not torch.equal(aug(x, epoch_augment_seed(4, 2), torch.arange(10, 15)), one)


def test_the_batch_path_refuses_what_it_cannot_do():
    with pytest.raises(
        MedtlError, match="RandFlipd has no batch .*RandAffined.*augment_device=cpu"
    ):
        BatchAugment.from_monai(Compose([RandFlipd(keys="image", prob=0.5)]))
    with pytest.raises(ConfigError, match="augment_device=cuda but training runs on cpu"):
        resolve_augment_device("cuda", torch.device("cpu"))
    with pytest.raises(ConfigError, match="data.augment_device 'gpu'.*auto, cpu, cuda"):
        resolve_augment_device("gpu", torch.device("cpu"))
    assert resolve_augment_device("auto", torch.device("cpu")) == "cpu"
    assert resolve_augment_device("auto", torch.device("cuda")) == "cuda"


# --------------------------------------------------------------------------- loaders in the engine
@pytest.fixture(scope="module")
def split(demo_data, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cfg = tiny_config(["transforms.augment=standard"], cache_dir=cache)
    train_ds, val_ds, classes = demo_split(demo_data.manifest_csv, cfg, cache)
    return cfg, train_ds, val_ds, classes


def _engine(split, tmp_path, workers: int, overrides=()):
    from medtl.models import create_model

    base, train_ds, val_ds, classes = split
    cfg = tiny_config(["transforms.augment=standard", f"data.num_workers={workers}", *overrides])
    cfg.data.task, cfg.data.classes = base.data.task, base.data.classes
    model = create_model(cfg.model, len(classes), spatial_dims=2)
    return Engine(cfg, model, train_ds, val_ds, get_strategy(cfg), workdir=tmp_path)


def _epoch(engine, epoch):
    return [(b["index"].clone(), b["image"].clone()) for b in engine.training_batches(epoch)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(i, j) and torch.equal(x, y) for (i, x), (j, y) in zip(a, b, strict=True)
    )


def test_persistent_workers_keep_the_sampler_and_key_augmentation_by_index(split, tmp_path):
    two = _engine(split, tmp_path / "two", workers=2)
    loader = two.train_loader(0)
    e0 = _epoch(two, 0)
    workers = [w.pid for w in loader._iterator._workers]
    e1 = _epoch(two, 1)
    assert two.train_loader(1) is loader  # one loader for every epoch ...
    assert [w.pid for w in loader._iterator._workers] == workers  # ... and the same processes
    for epoch, batches in ((0, e0), (1, e1)):  # the class-balanced draws of a fresh sampler
        fresh = build_train_sampler(
            two.train_ds, two.train_labels, two.task, seed=two.cfg.seed, epoch=epoch
        )
        drawn = torch.cat([i for i, _ in batches]).tolist()
        assert drawn == list(fresh)[: len(drawn)] and len(drawn) >= len(fresh) - 1
    assert not torch.equal(e0[0][1], e1[0][1])
    one = _engine(split, tmp_path / "one", workers=1)
    assert _same(_epoch(one, 1), e1)  # which worker loads an item does not matter
    two.release_loaders()
    one.release_loaders()


def test_device_augmentation_path_on_cpu_tensors(split, tmp_path, monkeypatch):
    """augment_device=cuda's engine path with CPU tensors: the loader yields deterministic
    images, the batch ops augment them, and worker count changes nothing."""
    monkeypatch.setattr("medtl.training.engine.resolve_augment_device", lambda s, d: "cuda")
    zero = _engine(split, tmp_path / "zero", workers=0)
    assert zero.batch_augment is not None and zero._train_source.random is None
    batches = _epoch(zero, 2)
    det = zero.train_ds.deterministic_view()
    index, image = batches[0]
    plain = torch.stack([det[int(i)]["image"] for i in index])
    want = zero.batch_augment(plain, epoch_augment_seed(zero.cfg.seed, 2), index)
    assert torch.equal(image, want) and not torch.equal(image, plain)
    two = _engine(split, tmp_path / "two", workers=2)
    assert _same(_epoch(two, 2), batches)
    two.release_loaders()


def test_fit_logs_data_stall_and_images_per_s(split, tmp_path, monkeypatch):
    from medtl.models import create_model

    monkeypatch.setattr("medtl.training.engine.resolve_augment_device", lambda s, d: "cuda")
    base, train_ds, val_ds, classes = split
    cfg = tiny_config(["transforms.augment=standard", "data.num_workers=2", "train.epochs=1"])
    cfg.data.task, cfg.data.classes = base.data.task, base.data.classes
    logged = []
    res = fit(
        cfg,
        create_model(cfg.model, len(classes), spatial_dims=2),
        train_ds,
        val_ds,
        workdir=tmp_path,
        log_fn=lambda m, e: logged.append(m),
    )
    assert len(res.history) == 1 and len(logged) == 1
    for row, sent in zip(res.history, logged, strict=True):
        assert 0.0 <= row["data_stall"] <= 1.0 and row["images_per_s"] > 0
        assert sent["data_stall"] == row["data_stall"] and np.isfinite(row["train_loss"])
    assert 0.0 < res.history[-1]["val_auroc"] <= 1.0


# --------------------------------------------------------------------------- kill and resume
SETTINGS = [
    "strategy.name=gradual_unfreeze",
    "strategy.head_only_epochs=1",
    "train.epochs=2",
    "train.warmup_epochs=0.5",
    "model.dropout=0.2",
    "transforms.augment=standard",
    "transforms.spatial_size=[32,32]",
    "train.checkpoint_every=1",
    "data.num_workers=2",
]


def _job_args(manifest, workdir, cache, out, kill_after=None) -> list[str]:
    args = ["--manifest", str(manifest), "--workdir", str(workdir), "--cache", str(cache)]
    args += ["--out", str(out), *[a for s in SETTINGS for a in ("--set", s)]]
    return args + ([] if kill_after is None else ["--kill-after-epoch", str(kill_after)])


def _run(args: list[str], log: Path) -> int:
    # Output to a file, not a pipe: the SIGKILL'd run's orphaned workers (they exit on their
    # own within seconds) would hold a pipe open and keep the test waiting.
    with log.open("w") as fh:
        cmd = [sys.executable, str(JOB), *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(cmd, stdout=fh, stderr=fh, env=env, timeout=600).returncode


def test_sigkill_resume_with_persistent_workers_is_bit_identical(demo_data, tmp_path):
    from fit_job import main as fit_job

    manifest, cache = demo_data.manifest_csv, tmp_path / "cache"
    # The uninterrupted run in this process (saves a start-up); the killed one in its own.
    fit_job(_job_args(manifest, tmp_path / "full", cache, tmp_path / "full.npz"))
    res = _job_args(manifest, tmp_path / "res", cache, tmp_path / "res.npz", kill_after=0)
    assert _run(res, tmp_path / "killed.log") == -9, (tmp_path / "killed.log").read_text()[-2000:]
    assert not (tmp_path / "res.npz").exists()
    assert _run(res[:-2], tmp_path / "resumed.log") == 0, (tmp_path / "resumed.log").read_text()

    a, b = np.load(tmp_path / "full.npz"), np.load(tmp_path / "res.npz")
    assert list(a["epochs_run"]) == [0, 1] and list(b["epochs_run"]) == [1]  # really resumed
    np.testing.assert_array_equal(a["history"], b["history"])
    np.testing.assert_array_equal(a["val_probs"], b["val_probs"])
    weights = [k for k in a.files if k.startswith("w/")]
    assert len(weights) > 100
    assert all(a[k].tobytes() == b[k].tobytes() for k in weights)
