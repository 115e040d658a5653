"""Benchmark: training-step throughput of medtl's engine vs a plain MONAI-tutorial loop.

Same model, data, batch size, workers and augmentation in one run; throughput is images/s of
the last epoch (the first pays one-off costs), with the engine's ``data_stall`` (host time
waiting for batches / step time). On CUDA it also compares fp32 with AMP + channels_last and,
with ``--augment``, augmentation per image in the loader workers with the batch ops on the GPU.
Prints a Markdown table and writes it to benchmarks/results/engine_throughput.md.

    python benchmarks/engine_throughput.py
    python benchmarks/engine_throughput.py --device cuda --backbone resnet50 --size 224 \
        --batch-size 64 --workers 8 --augment standard --epochs 3
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def plain_loop(
    model, dataset, batch_size: int, device: torch.device, epochs: int, workers: int = 0
) -> float:
    """The MONAI classification tutorial loop; returns images/s of the last epoch."""
    from monai.data import DataLoader

    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    model.to(device)
    loss_function = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    rate = 0.0
    for _ in range(epochs):
        model.train()
        seen, t0 = 0, time.perf_counter()
        for batch in loader:
            inputs = batch["image"].to(device)
            labels = batch["label"].to(device).long().view(-1)
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = loss_function(outputs, labels)
            loss.backward()
            optimizer.step()
            seen += inputs.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = seen / (time.perf_counter() - t0)
    return rate


def compute_only(
    model,
    batch_size: int,
    size: int,
    in_chans: int,
    amp: bool,
    steps: int = 30,
    device: torch.device | None = None,
):
    """Images/s of forward+backward+step on device-resident tensors: the model's compute
    ceiling, with the input pipeline taken out (fp32 vs bf16 autocast + channels_last)."""
    device = device or torch.device("cuda")
    model = model.to(device)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, in_chans, size, size, device=device)
    if amp:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch_size,), device=device)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        loss = loss_fn(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch_size / (time.perf_counter() - t0)


def engine_arms(cfg, ds, n: int, device: torch.device, augmented: bool, tmp: Path) -> list:
    """(name, images/s, data stall) of the medtl engine: fp32; on CUDA also AMP +
    channels_last, and with augmentation the same with the augmentation on the GPU."""
    from medtl.models import create_model
    from medtl.training import fit

    amp = {"amp": "auto", "channels_last": True}
    arms: list[tuple[str, dict, str]] = [("medtl engine, fp32", {}, "cpu")]
    if device.type == "cuda":
        arms.append(("medtl engine, AMP + channels_last", amp, "cpu"))
        if augmented:
            arms.append(("medtl engine, AMP + channels_last, augment on GPU", amp, "cuda"))
    rows = []
    for name, extra, where in arms:
        c = cfg.model_copy(deep=True)
        for k, v in extra.items():
            setattr(c.train, k, v)
        c.data.augment_device = where
        torch.manual_seed(0)
        workdir = tmp / name.replace(" ", "_").replace(",", "")
        res = fit(c, create_model(c.model, n), ds, None, workdir=workdir, resume=False)
        last = res.history[-1]
        rows.append((name, float(last["images_per_s"]), float(last["data_stall"])))
    return rows


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="data.num_workers (loader workers)")
    ap.add_argument(
        "--augment", default="none", choices=("none", "light", "standard"), help="preset level"
    )
    ap.add_argument(
        "--random-init",
        action="store_true",
        help="explicitly train from random weights (speed does not depend on the weights; "
        "for backbones whose weight files are not on this machine)",
    )
    ap.add_argument(
        "--out", default=None, help="results file (default results/engine_throughput.md)"
    )
    return ap.parse_args()


def write_table(a: argparse.Namespace, rows: list, n_images: int, device: torch.device) -> None:
    """Print the Markdown table and write it to ``--out`` (default results/)."""
    ref = rows[0][1]
    lines = [
        f"Training throughput: {a.backbone}, {a.size}px, batch {a.batch_size}, "
        f"{n_images} images, {a.workers} workers, augment {a.augment}, device {a.device} "
        f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}; "
        f"epoch {a.epochs} of {a.epochs}){', random init' if a.random_init else ''}",
        "",
        "| loop | images/s | data stall | vs plain loop |",
        "|---|---:|---:|---:|",
    ] + [
        f"| {name} | {r:.1f} | {'' if st is None else f'{st:.0%}'} | {r / ref:.2f}x |"
        for name, r, st in rows
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(a.out) if a.out else RESULTS / "engine_throughput.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")


def main() -> None:
    a = parse_args()
    from medtl.config import build_config
    from medtl.data import build_dataset, prepare_records, records_from_manifest
    from medtl.demo_data import make_demo_data
    from medtl.manifest import read_manifest
    from medtl.models import create_model, get_backbone_spec
    from medtl.transforms import build_transforms

    tmp = Path(tempfile.mkdtemp(prefix="medtl_bench_tp_"))
    rows: list[tuple[str, float, float | None]] = []
    try:
        demo = make_demo_data(
            tmp / "demo", n_patients=a.patients, image_size=max(96, a.size), seed=0
        )
        model_cfg = {"backbone": a.backbone}
        if a.random_init:
            model_cfg.update({"weights": None, "allow_random_init": True})
        base = {
            "model": model_cfg,
            "transforms": {"spatial_size": [a.size, a.size], "augment": a.augment},
            "train": {
                "device": a.device,
                "batch_size": a.batch_size,
                "progress": False,
                "epochs": a.epochs,
                "early_stopping_patience": None,
                "sampler": "random",
                "amp": "off",
                "channels_last": False,
            },
            "data": {"cache_dir": str(tmp / "cache"), "num_workers": a.workers},
            "tracking": {"enabled": False},
        }
        cfg = build_config(base, ["strategy.name=fine_tune"])
        records, classes = records_from_manifest(read_manifest(demo.manifest_csv), cfg)
        cfg.data.task = "binary"
        spec = get_backbone_spec(cfg.model.backbone)
        args = (cfg.transforms, spec.preprocess, cfg.model.in_channels, cfg.model.channel_adapt)
        tr = build_transforms(*args, train=False)
        records = prepare_records(records, tr, tmp / "cache", 1.0, progress=False).records
        ds = build_dataset(records, build_transforms(*args, train=True), tmp / "cache", "memory")
        n = len(classes)
        device = torch.device(a.device)

        torch.manual_seed(0)
        rows.append(
            (
                "plain MONAI-tutorial loop, fp32",
                plain_loop(
                    create_model(cfg.model, n), ds, a.batch_size, device, a.epochs, a.workers
                ),
                None,
            )
        )
        rows += engine_arms(cfg, ds, n, device, a.augment != "none", tmp)
        if device.type == "cuda":
            chans = int(ds[0]["image"].shape[0])
            for name, amp_on in [
                ("compute only (data on GPU), fp32", False),
                ("compute only (data on GPU), bf16 AMP + channels_last", True),
            ]:
                torch.manual_seed(0)
                model = create_model(cfg.model, n)
                rate = compute_only(model, a.batch_size, a.size, chans, amp_on)
                rows.append((name, rate, None))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    write_table(a, rows, len(records), device)


if __name__ == "__main__":
    main()
