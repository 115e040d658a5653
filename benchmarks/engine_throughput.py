"""Benchmark: training-step throughput of medtl's engine vs a plain MONAI-tutorial loop.

Same model, data, batch size and device in one run; throughput is images/s of the second
epoch (the first pays one-off costs). On CUDA it also compares fp32 with AMP + channels_last.
Prints a Markdown table and writes it to benchmarks/results/engine_throughput.md.

    python benchmarks/engine_throughput.py
    python benchmarks/engine_throughput.py --device cuda --backbone resnet50 --size 224
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def plain_loop(model, dataset, batch_size: int, device: torch.device, epochs: int) -> float:
    """The MONAI classification tutorial loop; returns images/s of the last epoch."""
    from monai.data import DataLoader

    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=0,
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


def compute_only(model, batch_size: int, size: int, in_chans: int, amp: bool, steps: int = 30):
    """Images/s of forward+backward+step on GPU-resident tensors: the model's compute ceiling,
    with the input pipeline taken out (fp32 vs bf16 autocast + channels_last)."""
    device = torch.device("cuda")
    model = model.to(device)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, in_chans, size, size, device=device)
    if amp:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch_size,), device=device)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        loss = loss_fn(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument(
        "--random-init",
        action="store_true",
        help="explicitly train from random weights (speed does not depend on the weights; "
        "for backbones whose weight files are not on this machine)",
    )
    ap.add_argument(
        "--out", default=None, help="results file (default results/engine_throughput.md)"
    )
    a = ap.parse_args()

    from medtl.config import build_config
    from medtl.data import build_dataset, prepare_records, records_from_manifest
    from medtl.demo_data import make_demo_data
    from medtl.manifest import read_manifest
    from medtl.models import create_model, get_backbone_spec
    from medtl.training import fit
    from medtl.transforms import build_transforms

    tmp = Path(tempfile.mkdtemp(prefix="medtl_bench_tp_"))
    rows = []
    try:
        demo = make_demo_data(
            tmp / "demo", n_patients=a.patients, image_size=max(96, a.size), seed=0
        )
        model_cfg = {"backbone": a.backbone}
        if a.random_init:
            model_cfg.update({"weights": None, "allow_random_init": True})
        base = {
            "model": model_cfg,
            "transforms": {"spatial_size": [a.size, a.size], "augment": "none"},
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
            "data": {"cache_dir": str(tmp / "cache"), "num_workers": 0},
            "tracking": {"enabled": False},
        }
        cfg = build_config(base, ["strategy.name=fine_tune"])
        records, classes = records_from_manifest(read_manifest(demo.manifest_csv), cfg)
        cfg.data.task = "binary"
        spec = get_backbone_spec(cfg.model.backbone)
        tr = build_transforms(
            cfg.transforms,
            spec.preprocess,
            cfg.model.in_channels,
            cfg.model.channel_adapt,
            train=False,
        )
        records = prepare_records(records, tr, tmp / "cache", 1.0, progress=False).records
        ds = build_dataset(records, tr, tmp / "cache", "memory")
        n = len(classes)
        device = torch.device(a.device)

        torch.manual_seed(0)
        rows.append(
            (
                "plain MONAI-tutorial loop, fp32",
                plain_loop(create_model(cfg.model, n), ds, a.batch_size, device, a.epochs),
            )
        )
        arms = [("medtl engine, fp32", {})]
        if device.type == "cuda":
            arms.append(
                ("medtl engine, AMP + channels_last", {"amp": "auto", "channels_last": True})
            )
        for name, extra in arms:
            c = cfg.model_copy(deep=True)
            for k, v in extra.items():
                setattr(c.train, k, v)
            torch.manual_seed(0)
            res = fit(
                c,
                create_model(c.model, n),
                ds,
                None,
                workdir=tmp / name.replace(" ", "_"),
                resume=False,
            )
            rows.append((name, float(res.history[-1]["images_per_s"])))
        if device.type == "cuda":
            chans = int(ds[0]["image"].shape[0])
            for name, amp in [
                ("compute only (data on GPU), fp32", False),
                ("compute only (data on GPU), bf16 AMP + channels_last", True),
            ]:
                torch.manual_seed(0)
                model = create_model(cfg.model, n)
                rows.append((name, compute_only(model, a.batch_size, a.size, chans, amp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ref = rows[0][1]
    lines = [
        f"Training throughput: {a.backbone}, {a.size}px, batch {a.batch_size}, "
        f"{len(records)} images, device {a.device} "
        f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}; "
        f"epoch {a.epochs} of {a.epochs}){', random init' if a.random_init else ''}",
        "",
        "| loop | images/s | vs plain loop |",
        "|---|---:|---:|",
    ] + [f"| {name} | {r:.1f} | {r / ref:.2f}x |" for name, r in rows]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(a.out) if a.out else RESULTS / "engine_throughput.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")


if __name__ == "__main__":
    main()
