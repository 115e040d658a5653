"""The batched prediction pass behind `medtl predict`, `medtl evaluate` and their Grad-CAM:
inputs decoded through the crash-isolated pool (:mod:`medtl.preparation.pool`, the one place
files are decoded), batched by shape, run on the chosen device (autocast on CUDA), and
returned as raw probabilities. An input that cannot be read keeps its reason and never stops
the run; Grad-CAM overlays are made from the same decoded tensors (no second decode).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from medtl.errors import ConfigError
from medtl.preparation.quarantine import QuarantineEntry

OnItem = Callable[[int, Mapping[Hashable, Any]], None]


@dataclass(frozen=True)
class PassOptions:
    """How the pass runs: device, batch size, decoding processes, progress, Grad-CAM."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 32
    workers: int | Literal["auto"] = "auto"  # decoding processes (0: in this process)
    progress: bool = True
    gradcam_dir: Path | None = None  # write <row>_<class>.png overlays here (2D models)
    gradcam_class: str | None = None  # default: positive class (binary), else the prediction
    # read DICOM images whose header says BurnedInAnnotation YES (default: refused unread)
    allow_burned_in: bool = False


@dataclass
class PassResult:
    """Logits in input order (NaN rows: not predicted), each row's error, and the Grad-CAM
    files written."""

    logits: np.ndarray
    errors: list[str | None]
    gradcams: list[Path] = field(default_factory=list)


def inference_device(spec: str) -> torch.device:
    """``auto`` (a GPU when one is visible), ``cpu``, ``cuda`` or ``cuda:N``; ConfigError naming
    the flag for anything else, for CUDA without a GPU, or for a GPU this machine lacks."""
    from medtl.training.distributed import resolve_device

    dev = resolve_device(spec, key="--device")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device '{spec}' is not supported; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"--device '{spec}': this machine has {n} GPU(s), cuda:0..{n - 1}")
    return dev


class _Batcher:
    """Collects decoded tensors of one shape and runs them through the model in batches."""

    def __init__(self, model: torch.nn.Module, device: torch.device, opts: PassOptions, cam: Any):
        self.model, self.device, self.opts, self.cam = model, device, opts, cam
        self.pending: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
        self.logits: dict[int, np.ndarray] = {}
        self.gradcams: list[Path] = []
        self.classes: list[str] = []
        self.task = "binary"

    def add(self, i: int, tensor: torch.Tensor) -> None:
        key = tuple(tensor.shape)
        group = self.pending.setdefault(key, [])
        group.append((i, tensor))
        if len(group) >= self.opts.batch_size:
            self.flush(key)

    def flush(self, key: tuple[int, ...] | None = None) -> None:
        for k in [key] if key is not None else list(self.pending):
            group = self.pending.pop(k, [])
            if group:
                self._run(group)

    def _run(self, group: list[tuple[int, torch.Tensor]]) -> None:
        cuda = self.device.type == "cuda"
        x = torch.stack([t for _, t in group])
        x = (x.pin_memory() if cuda else x).to(self.device, dtype=torch.float32, non_blocking=True)
        with torch.inference_mode(), _autocast(self.device):
            logits = self.model(x).float().cpu().numpy()
        for row, (i, _) in enumerate(group):
            self.logits[i] = logits[row]
        if self.cam is not None:
            self._gradcam(x, [i for i, _ in group], logits)

    def _gradcam(self, x: torch.Tensor, rows: list[int], logits: np.ndarray) -> None:
        from medtl.explain import gradcam_maps, write_overlay_png

        out = self.opts.gradcam_dir
        assert out is not None
        targets = _cam_classes(self.opts.gradcam_class, self.classes, self.task, logits)
        for idx in sorted(set(targets)):
            sel = [j for j, t in enumerate(targets) if t == idx]
            maps = gradcam_maps(self.model, x[sel], idx, cam=self.cam)
            for m, j in zip(maps, sel, strict=True):
                dst = out / f"{rows[j]:05d}_{self.classes[idx]}.png"
                image = x[j].float().cpu().numpy()
                self.gradcams.append(
                    write_overlay_png(image, m, f"Grad-CAM: {self.classes[idx]}", dst)
                )


def _cam_classes(
    name: str | None, classes: Sequence[str], task: str, logits: np.ndarray
) -> list[int]:
    if name is not None:
        return [list(classes).index(name)] * len(logits)
    if task == "binary":
        return [1] * len(logits)
    return [int(k) for k in logits.argmax(1)]


def _autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA (fp16 on GPUs without bf16); full precision on the CPU."""
    if device.type != "cuda":
        return torch.autocast("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def run_pass(
    bundle: Any,
    items: Sequence[tuple[str, Path]],
    transform: Any,
    opts: PassOptions,
    *,
    refused: Mapping[int, str] | None = None,
    on_item: OnItem | None = None,
) -> PassResult:
    """Decode, batch and predict ``items`` (``(display, path)``); rows in ``refused`` are not
    read and keep the reason. Returns logits: the caller turns them into (calibrated)
    probabilities."""
    from medtl.preparation.pool import decode_stream, resolve_workers
    from medtl.preparation.progress import PrepareProgress

    refused = refused or {}
    device = inference_device(opts.device)
    model = bundle.model.to(device).eval()
    if device.type == "cuda" and bundle.spatial_dims == 2:
        model = model.to(memory_format=torch.channels_last)
    errors: list[str | None] = [refused.get(i) for i in range(len(items))]
    todo = [i for i, (_, p) in enumerate(items) if i not in refused]
    for i in todo:
        if not items[i][1].exists():
            errors[i] = "FileNotFoundError: no such file or folder"
    todo = [i for i in todo if errors[i] is None]
    batcher = _Batcher(model, device, opts, _make_cam(bundle, model, opts))
    batcher.classes, batcher.task = list(bundle.classes), bundle.task
    workers = resolve_workers(opts.workers, len(todo)) if _picklable(transform) else 0
    # Every failure on one input (reader or transforms) comes back as its QuarantineEntry.
    items_todo = [{"image": str(items[i][1])} for i in todo]
    timeout = bundle.cfg.data.decode_timeout_s  # the training run's limit for one file
    stream = decode_stream(items_todo, transform, workers, timeout)
    with PrepareProgress(len(todo), "predicting", opts.progress) as bar:
        # Results arrive in completion order; they are batched in input order, so batches
        # (and their floating-point sums) are the same whatever the worker count.
        ready: dict[int, Any] = {}
        nxt = 0
        for pos, out in stream:
            bar.advance()
            ready[pos] = out
            while nxt in ready:
                _take(todo[nxt], ready.pop(nxt), errors, batcher, on_item)
                nxt += 1
        batcher.flush()
    model.to("cpu")
    logits = np.full((len(items), len(bundle.classes)), np.nan)
    for i, row in batcher.logits.items():
        logits[i] = row
    return PassResult(logits, errors, sorted(batcher.gradcams))


def _take(
    i: int, out: Any, errors: list[str | None], batcher: _Batcher, on_item: OnItem | None
) -> None:
    """One decoded input (or its quarantine entry) into the batcher."""
    if isinstance(out, QuarantineEntry):
        errors[i] = out.reason
        return
    if on_item is not None:
        on_item(i, out)
    batcher.add(i, torch.as_tensor(np.asarray(out["image"]), dtype=torch.float32))


def _make_cam(bundle: Any, model: torch.nn.Module, opts: PassOptions) -> Any:
    if opts.gradcam_dir is None:
        return None
    from monai.visualize import GradCAM

    from medtl.errors import look_up_option
    from medtl.explain import last_conv_layer

    if bundle.spatial_dims != 2:
        raise ConfigError("--gradcam overlays are for 2D models (transforms.preset cxr_2d/ct_2p5d)")
    if opts.gradcam_class is not None:
        look_up_option(opts.gradcam_class, bundle.classes, "Grad-CAM class")
    Path(opts.gradcam_dir).mkdir(parents=True, exist_ok=True)
    return GradCAM(nn_module=model, target_layers=last_conv_layer(model))


def _picklable(transform: Any) -> bool:
    """Whether ``transform`` can be sent to decoding processes (a caller's lambda cannot: it is
    then run in this process, without crash isolation)."""
    import pickle

    try:
        pickle.dumps(transform)
    except Exception:  # noqa: BLE001 - any pickling failure means: decode here
        return False
    return True
