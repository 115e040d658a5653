"""The decoding pool and the caches it fills (medtl.preparation), over real demo DICOM files:
parallel == serial, crash and hang isolation, SIGKILL and resume, a full disk, progress."""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data.utils import set_rnd
from prep_job import BrokenInWorker, CrashOn, demo_items, demo_pair
from prep_job import run as run_job

from medtl.config import build_config
from medtl.data import build_dataset, cache_folder, file_identity_hash, prepare_records
from medtl.errors import ConfigError, UnreadableImageError
from medtl.io import load_image
from medtl.preparation import (
    CacheSpaceError,
    PackedDataset,
    PackedStore,
    PoolStartError,
    ShardWriter,
    decode_stream,
    packed_folder,
    resolve_workers,
)
from medtl.preparation.atomic import open_locked_temp
from medtl.preparation.progress import PrepareProgress
from medtl.preparation.store import decode_array

JOB = Path(__file__).parent / "prep_job.py"


@pytest.fixture(scope="module")
def pair():
    return demo_pair()


@pytest.fixture(scope="module")
def items(demo_data):
    return demo_items(demo_data.manifest_csv, 12)


def _broken(tmp_path: Path) -> Path:
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 20)
    return bad


def _records(items):
    return [{**it, "label": i % 2, "patient_id": f"p{i}", "row": i} for i, it in enumerate(items)]


def _packed(cache_dir: Path, pair) -> PackedStore:
    return PackedStore(packed_folder(cache_folder(cache_dir, pair)))


def test_parallel_equals_serial_and_quarantines_the_corrupt_file(items, pair, tmp_path):
    bad, missing = _broken(tmp_path), tmp_path / "missing.dcm"
    recs = _records(items)
    recs[4:4] = [{**recs[0], "image": str(bad)}]  # one corrupt file among many, mid-list
    recs.append({**recs[1], "image": str(missing)})
    serial = prepare_records(recs, pair, tmp_path / "s", 0.5, False, store="packed")
    pool = prepare_records(recs, pair, tmp_path / "p", 0.5, False, workers=2, store="packed")

    assert pool.records == serial.records and len(pool.records) == 12
    assert pool.quarantine == serial.quarantine
    with pytest.raises(UnreadableImageError) as reader:  # the reader's own reason, verbatim
        load_image(bad)
    assert [(q.path, q.reason) for q in pool.quarantine][0] == (str(bad), reader.value.reason)
    assert pool.quarantine[1].path == str(missing)

    a, b = _packed(tmp_path / "s", pair), _packed(tmp_path / "p", pair)
    assert set(a.entries) == set(b.entries) and len(a) == 12
    for key in a.entries:  # same bytes, same values beside them
        assert np.array_equal(a.raw(key), b.raw(key))
        assert a.entries[key].meta == b.entries[key].meta
    # The persistent store through the pool: the same .pt files MONAI would read as its own.
    pt = prepare_records(recs, pair, tmp_path / "pt", 0.5, False, workers=2, store="persistent")
    assert pt.quarantine == serial.quarantine
    for key in a.entries:
        saved = torch.load(cache_folder(tmp_path / "pt", pair) / f"{key}.pt", weights_only=True)
        assert torch.equal(saved["image"], torch.from_numpy(np.array(a.raw(key))))


def test_build_dataset_reads_the_packed_store_exactly(items, pair, tmp_path):
    recs = _records(items[:6])
    prepared = prepare_records(recs, pair, tmp_path, 0.0, False, store="packed")
    ds = build_dataset(prepared.records, pair, tmp_path, "disk")
    raw = build_dataset(prepared.records, pair, tmp_path, "none")
    assert isinstance(ds.inner, PackedDataset)
    for i in range(len(ds)):
        assert (
            torch.equal(ds[i]["image"], raw[i]["image"]) and ds[i]["image"].dtype == torch.float32
        )
    # An augmented epoch is the same whichever store it reads (MONAI seeds by attribute walk).
    epochs = []
    for store in ("persistent", "packed"):
        train = demo_pair(train=True)
        prepare_records(recs, train, tmp_path / store, 0.0, False, store=store)
        aug = build_dataset(recs, train, tmp_path / store, "disk")
        set_rnd(aug, 5)
        epochs.append(torch.stack([aug[i]["image"] for i in range(len(aug))]))
    assert torch.equal(*epochs) and not torch.equal(
        epochs[0], torch.stack([raw[i]["image"] for i in range(len(raw))])
    )
    # Same invalidation as PersistentDataset: a changed file is a new key, not a stale hit.
    os.utime(recs[0]["image"], ns=(time.time_ns(), time.time_ns() + 10**9))
    again = build_dataset(prepared.records, pair, tmp_path, "disk")
    assert not isinstance(again.inner, PackedDataset)


@pytest.mark.timeout(300)
def test_worker_crash_or_hang_quarantines_that_file_and_the_run_completes(items, pair, tmp_path):
    names = [Path(it["image"]).name for it in items]
    assert len(set(names[:3])) == 3
    crashes = {names[0]: "segv", names[1]: "abort", names[2]: "hang"}
    picked = [items[0], items[3], items[1], items[4], items[2], items[5]]
    out = dict(decode_stream(picked, CrashOn(pair.deterministic, crashes), 2, timeout_s=3.0))
    assert sorted(out) == list(range(6))  # every item answered: no hung pool
    reasons = {i: getattr(out[i], "reason", None) for i in out}
    assert reasons[0] == "decoder crashed (signal 11, SIGSEGV)"
    assert reasons[2] == "decoder crashed (signal 6, SIGABRT)"
    assert reasons[4] is not None and "data.decode_timeout_s=3" in reasons[4]
    for i in (1, 3, 5):
        expect = pair.deterministic(dict(picked[i]))["image"]
        assert torch.equal(out[i]["image"], expect)


def test_a_worker_that_cannot_start_is_an_error_not_a_quarantine(items):
    with pytest.raises(PoolStartError, match=r"exit code 1.*__main__.*prepare_workers=0"):
        list(decode_stream(items[:3], BrokenInWorker(), 2))


def _job(demo_data, cache: Path, out: Path, delay: float) -> subprocess.Popen:
    cmd = [sys.executable, str(JOB), "--manifest", str(demo_data.manifest_csv)]
    cmd += ["--cache", str(cache), "--out", str(out), "--delay", str(delay)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux /proc)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def _committed(folder: Path) -> dict[str, tuple[int, int]]:
    """Committed shard files (index and data) -> (inode, mtime_ns)."""
    out = {}
    for idx in folder.glob("*.json"):
        for p in (idx, idx.with_suffix(".bin")):
            st = p.stat()
            out[p.name] = (st.st_ino, st.st_mtime_ns)
    return out


@pytest.mark.timeout(400)
def test_sigkill_mid_preparation_resumes_without_recomputing(demo_data, pair, tmp_path):
    cache = tmp_path / "cache"
    folder = packed_folder(cache_folder(cache, pair))
    job = _job(demo_data, cache, tmp_path / "a.json", delay=0.4)
    deadline = time.monotonic() + 240
    while len(list(folder.glob("*.json"))) < 2:  # two shards of 3 committed, more in flight
        assert job.poll() is None, job.stderr.read() if job.stderr else ""
        assert time.monotonic() < deadline, "no shard committed in time"
        time.sleep(0.05)
    pool = _descendants(job.pid)  # the forkserver and the decoding workers, mid-item
    assert len(pool) >= 3
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=30)
    assert job.returncode == -9 and not (tmp_path / "a.json").exists()
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{p}").exists() for p in pool):  # no orphan outlives the job
        assert time.monotonic() < deadline, f"workers still alive: {pool}"
        time.sleep(0.1)
    before = _committed(folder)
    kept = len(PackedStore(folder))
    assert 6 <= kept < 24

    # Resume here, through this process's pool: the same job function the script ran.
    args = argparse.Namespace(
        manifest=demo_data.manifest_csv, cache=cache, limit=24, delay=0.0, shard_entries=3,
        workers=2,
    )  # fmt: skip
    stats = run_job(args)
    assert stats == {"hits": kept, "decoded": 24 - kept, "quarantined": 0}  # nothing redone
    after = _committed(folder)
    assert {k: after[k] for k in before} == before  # same inode, same mtime
    assert not list(folder.glob(".tmp-*"))  # the killed writer's open shard was cleaned up
    store = PackedStore(folder)
    assert len(store) == 24 and store.verify() == []
    for it in demo_items(demo_data.manifest_csv, 24):  # every entry loads, with the right pixels
        got = store.read(file_identity_hash(it).decode())["image"]
        assert torch.equal(got, pair.deterministic(dict(it))["image"])


def test_full_disk_is_a_clear_error_naming_the_folder_and_the_space(
    items, pair, tmp_path, monkeypatch
):
    recs = _records(items[:5])
    real_write = ShardWriter._write
    calls = {"n": 0}

    def write(self, fh, data):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, fh, data)

    monkeypatch.setattr(ShardWriter, "_write", write)
    folder = packed_folder(cache_folder(tmp_path, pair))
    with pytest.raises(CacheSpaceError) as err:
        prepare_records(recs, pair, tmp_path, 0.0, False, store="packed")
    msg = str(err.value)
    assert str(folder) in msg and "No space left on device" in msg
    per_image = 32 * 32 * 4
    assert f"({per_image * 5} bytes) more are needed for the 5 image(s)" in msg
    assert re.search(r"\(\d+ bytes\) are free", msg) and "data.cache_dir" in msg
    assert not list(folder.glob(".tmp-*")) and not list(folder.glob("*.bin"))


def test_concurrent_writers_share_a_folder_and_only_dead_temps_are_removed(tmp_path):
    folder = tmp_path / "packed-float32"
    a, b = ShardWriter(folder, shard_entries=2), ShardWriter(folder, shard_entries=2)
    img = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    for i in range(3):
        a.put(f"k{i}", {"image": img + i, "pixel_sha256": f"h{i}"})
        b.put(f"k{i + 2}", {"image": img - i})  # k2 is written by both: equal duplicates
    live, fh = open_locked_temp(folder, ".bin")  # a third writer, still running
    dead = folder / ".tmp-deadwriter.bin"
    dead.write_bytes(b"half")  # left by a killed writer: no lock
    ShardWriter(folder)  # opening a writer cleans up
    assert live.exists() and not dead.exists()
    fh.close()
    store = PackedStore(folder)
    assert sorted(store.entries) == ["k0", "k1", "k2", "k3"]  # pending k4 was never committed
    assert store.read("k1")["pixel_sha256"] == "h1"
    assert torch.equal(store.read("k0")["image"], torch.from_numpy(img))
    a.close(), b.close()
    assert len(PackedStore(folder)) == 5


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 0.0), ("float16", 1e-3), ("uint8", 4e-3)])
def test_packed_dtypes_round_trip(tmp_path, dtype, tol):
    x = np.random.default_rng(0).uniform(-1, 1, (1, 16, 16)).astype(np.float32)
    w = ShardWriter(tmp_path, dtype=dtype)
    w.put("k", {"image": x})
    w.close()
    store = PackedStore(tmp_path)
    assert store.raw("k").dtype == np.dtype(dtype)
    back = decode_array(store.raw("k"), store.entries["k"].arrays["image"])
    assert back.dtype == np.float32 and float(np.abs(back - x).max()) <= tol
    assert tol == 0.0 or float(np.abs(back - x).max()) > 0.0  # lossy stores really are


def test_progress_logs_one_line_per_tenth_off_a_terminal(capsys):
    with PrepareProgress(25, "decoding", enabled=True, tty=False) as bar:
        for _ in range(25):
            bar.advance()
    assert [ln.split(" (")[1].split(")")[0] for ln in bar.lines] == [
        f"{p}%" for p in range(10, 101, 10)
    ]
    assert all("images/s, ETA " in ln for ln in bar.lines)
    assert capsys.readouterr().out.splitlines() == bar.lines


def test_worker_count_and_config(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_workers("auto") == max(1, cores // 2)
    assert resolve_workers(8, n_tasks=3) == 3 and resolve_workers(0) == 0
    with pytest.raises(ConfigError, match="prepare_workers=-1"):
        resolve_workers(-1)
    cfg = build_config({})
    assert (cfg.data.prepare_workers, cfg.data.cache_store) == ("auto", "packed")
    with pytest.raises(ConfigError, match="prepare_workers"):
        build_config({"data": {"prepare_workers": -2}})
    with pytest.raises(ConfigError, match="cache_store"):
        build_config({"data": {"cache_store": "lmdb"}})
