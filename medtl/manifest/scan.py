"""A manifest from a hospital DICOM export: read headers, group series, join labels, pseudonymise."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator, Sequence, Set
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import pandas as pd

from medtl.deid import (
    JOIN_KEYS,
    identifying_values,
    is_identifying_column,
    load_salt,
    pseudonymize,
)
from medtl.errors import ManifestError, look_up_option
from medtl.manifest._shared import examples, iter_progress
from medtl.manifest.table import IMAGE_COLUMN, write_manifest
from medtl.spreadsheet import write_csv

_SERIES_MODALITIES = frozenset({"CT", "MR", "PT", "NM"})
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


@dataclass
class ScanResult:
    """What ``scan_dicom_dir`` found; nothing is dropped without a row in a side table."""

    manifest: pd.DataFrame
    out: Path | None
    n_files: int
    n_dicom: int
    n_non_dicom: int
    n_non_image: int
    n_series: int
    unlabeled: pd.DataFrame  # path, reason
    unreadable: pd.DataFrame  # path, reason
    unlabeled_csv: Path | None = None
    unreadable_csv: Path | None = None
    dropped_columns: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        """Manifest rows written (images or series)."""
        return len(self.manifest)

    @property
    def n_unlabeled(self) -> int:
        """Images or series without a (consistent) label."""
        return len(self.unlabeled)

    @property
    def n_unreadable(self) -> int:
        """Files that could not be read or grouped into an image."""
        return len(self.unreadable)

    def summary(self) -> str:
        """A few lines for the CLI."""
        lines = [
            f"scanned {self.n_files} files: {self.n_dicom} DICOM, {self.n_non_dicom} other "
            f"(skipped), {self.n_non_image} non-image DICOM objects (skipped)",
            f"manifest rows: {self.n_rows} ({self.n_series} multi-file series)"
            + (f" -> {self.out}" if self.out else ""),
            f"unlabeled: {self.n_unlabeled}"
            + (f" (listed in {self.unlabeled_csv})" if self.unlabeled_csv else ""),
            f"unreadable: {self.n_unreadable}"
            + (f" (listed in {self.unreadable_csv})" if self.unreadable_csv else ""),
        ]
        if self.dropped_columns:
            lines.append(
                f"label columns left out as identifying: {', '.join(self.dropped_columns)}"
            )
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def scan_dicom_dir(
    root: str | Path,
    labels_csv: str | Path,
    key: str = "AccessionNumber",
    out: str | Path | None = None,
    keep_ids: bool = False,
    salt: str | None = None,
    progress: bool = True,
    label_column: str = "label",
) -> ScanResult:
    """Walk a DICOM export (headers only), join labels on ``key`` and build a manifest.

    Any nesting and file names are accepted; non-DICOM files and non-image objects are
    skipped and counted. Multi-file CT/MR/PT/NM series (files with ImagePositionPatient)
    become one row whose ``image`` is the series folder; every other image is one row.
    Columns: ``image`` (relative to ``out``'s folder; absolute when ``out`` is None),
    ``label``, ``patient_id`` and ``study_id`` (salted pseudonyms unless ``keep_ids``),
    the labels file's other columns (except identifier-like ones), ``site`` (from the
    labels file, else a pseudonym of InstitutionName), ``modality``, ``sex``,
    ``body_part``, ``view``, ``n_files``. Files without a label or that cannot be read
    are listed with the reason in ``<out>.unlabeled.csv`` and ``<out>.unreadable.csv``;
    those hold file paths, which can carry names when an exporter named folders after
    patients (the scan warns when it sees this in image paths).

    Args:
        root: the export folder.
        labels_csv: CSV/Parquet with a column named ``key`` and ``label_column``.
        key: DICOM attribute joined to the labels (one of ``medtl.deid.JOIN_KEYS``).
        out: manifest file to write (CSV/Parquet), or None to only return it.
        keep_ids: write real PatientID/StudyInstanceUID/InstitutionName (not for sharing).
        salt: pseudonym key; default :func:`medtl.deid.load_salt` (environment).
        progress: show a progress bar.
        label_column: the label column of the labels file.

    Raises:
        ConfigError: unknown ``key``, or no salt configured.
        ManifestError: the labels file lacks the key/label column or has conflicting labels.
    """
    key = look_up_option(key, JOIN_KEYS, "join key")
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"DICOM folder {root} does not exist (or is not a folder)")
    # None keeps the real identifiers; any other value is the pseudonym key.
    id_salt = None if keep_ids else (salt or load_salt())
    labels = _read_labels(Path(labels_csv), key, label_column)
    extra_cols, dropped = _label_file_columns(labels, label_column)

    folders, n_files = _list_files(root)
    phi_of_interest = _phi_candidates(labels, extra_cols)
    found = _read_headers(root, folders, n_files, labels, key, progress, phi_of_interest)
    del folders
    units, misplaced, n_series = _group_units(found.headers, found.folder_series)
    found.headers.clear()  # the units hold them now, and the join frees them row by row
    out_path = Path(out) if out else None
    base = out_path.resolve().parent if out_path else None
    join = _join_labels(units, root, labels, key, label_column, extra_cols, id_salt, base)
    frame = _manifest_frame(join.columns)  # empties join.columns

    df, guarded, warnings = _drop_identifying_columns(frame, extra_cols, found.phi)
    warnings += _scan_warnings(join.phi_paths, keep_ids)
    result = ScanResult(
        manifest=df,
        out=out_path,
        n_files=n_files,
        n_dicom=n_files - found.n_non_dicom,
        n_non_dicom=found.n_non_dicom,
        n_non_image=found.n_non_image,
        n_series=n_series,
        unlabeled=_side_table(join.unlabeled, root, base),
        unreadable=_side_table(found.unreadable + misplaced, root, base),
        dropped_columns=dropped + guarded,
        warnings=warnings,
    )
    if out_path is not None:
        _write_outputs(result, out_path)
    return result


# ---------------------------------------------------------------------------- labels file
@dataclass
class _Labels:
    """The labels file, one row per key value (the first), held as plain Python objects.

    As a pandas text frame (pyarrow), reading, checking and looking it up per image raised
    the scan's peak by about 12 MB more at 20,000 rows than at 1,000 (pyarrow's allocator
    keeps the pages it used); lists and a dict cost a quarter of that and look up faster.
    """

    columns: list[Any]  # the file's columns except the key, in file order
    rows: dict[str, tuple[Any, ...]]  # key value -> that row's values of ``columns``

    def pick(self, row: tuple[Any, ...], columns: Sequence[Any]) -> list[Any]:
        """The values of ``columns`` in ``row`` (one of ``rows``)."""
        return [row[self.columns.index(c)] for c in columns]


def _read_labels(labels_csv: Path, key: str, label_column: str) -> _Labels:
    """The labels table, one row per key value; conflicting duplicates are an error."""
    suffix = labels_csv.suffix.lower()
    if suffix in (".parquet", ".pq"):
        table = pd.read_parquet(labels_csv).fillna("").astype(str)
    else:
        table = pd.read_csv(
            labels_csv, dtype=object, keep_default_na=False, sep="\t" if suffix == ".tsv" else ","
        )
    for col in (key, label_column):
        if col not in table.columns:
            raise ManifestError(
                f"labels file {labels_csv} has no column '{col}'. Columns present: "
                f"{', '.join(map(str, table.columns))}. The join key column must be named like "
                f"the DICOM attribute (--key {key}) and labels go in '{label_column}'."
            )
    cells = {c: [v.strip() if isinstance(v, str) else v for v in table[c].tolist()] for c in table}
    # Few distinct labels: one string object each, not one per row.
    cells[label_column] = [sys.intern(v) if type(v) is str else v for v in cells[label_column]]
    index = table.index  # for line numbers
    del table
    keys = cells[key]
    conflicting = _conflicting_keys(keys, cells[label_column])
    if conflicting:
        # Line numbers only (the header is line 1): the key values are identifiers.
        bad = [str(index[i] + 2) for i, k in enumerate(keys) if k != "" and k in conflicting]
        raise ManifestError(
            f"labels file {labels_csv}: {len(conflicting)} {key} value(s) have "
            f"conflicting labels (lines {examples(bad)}); keep one label per key"
        )
    columns = [c for c in cells if c != key]
    rows: dict[str, tuple[Any, ...]] = {}
    for i, k in enumerate(keys):
        if k != "":  # rows without a key value are left out
            rows.setdefault(k, tuple(cells[c][i] for c in columns))
    return _Labels(columns, rows)


def _conflicting_keys(keys: list[Any], labels: list[Any]) -> set[Any]:
    """Key values with more than one label; empty keys, missing keys and missing labels are
    ignored (as ``groupby(key)[label].nunique()`` on the non-empty keys does)."""
    seen: dict[Any, Any] = {}
    conflicting = set()
    for k, label in zip(keys, labels, strict=True):
        if k == "" or pd.isna(k) or pd.isna(label):
            continue
        if seen.setdefault(k, label) != label:
            conflicting.add(k)
    return conflicting


def _label_file_columns(labels: _Labels, label_column: str) -> tuple[list[str], list[str]]:
    """The labels file's extra columns to copy, and those left out because they look like ids."""
    extra_cols = [c for c in labels.columns if c != label_column]
    dropped = [c for c in extra_cols if is_identifying_column(c) or c in JOIN_KEYS]
    return [c for c in extra_cols if c not in dropped], dropped


# ---------------------------------------------------------------------------- headers
# One _Header per image file is held until the series are grouped, so it is kept small:
# slots, the path as (shared folder, name) strings relative to the export, and repeated
# values (modality, site, the UIDs of neighbouring slices) stored once.
@dataclass(slots=True)
class _Header:
    """The header fields of one image file that a manifest row needs."""

    folder: str  # relative POSIX folder, "" for the export root; one object per folder
    name: str
    label_row: tuple[Any, ...] | None  # the labels file's row of its key value, if any
    has_key: bool  # whether the header has a key value at all
    patient: str
    study: str
    series: str  # "" unless the file may be a series member (see _in_series)
    modality: str
    sex: str
    body_part: str
    view: str
    institution: str
    has_position: bool
    path_has_phi: bool

    @property
    def rel(self) -> str:
        """The file's path relative to the export, POSIX."""
        return _rel_path(self.folder, self.name)


@dataclass
class _HeaderScan:
    """The readable image headers of an export, plus what was skipped and why."""

    headers: list[_Header] = field(default_factory=list)
    # relative folder -> the one SeriesInstanceUID of its images; None when they differ
    folder_series: dict[str, str | None] = field(default_factory=dict)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # relative path, reason
    # identifying values seen that the labels file's copied columns also hold (in memory)
    phi: set[str] = field(default_factory=set)
    n_non_dicom: int = 0
    n_non_image: int = 0


_Folder = tuple[str, list[str]]  # a folder's relative POSIX path ("" for the root), its files


def _list_files(root: Path) -> tuple[list[_Folder], int]:
    """Every folder under ``root`` with its files, in a stable (sorted, depth-first) order,
    and the number of files."""
    out: list[_Folder] = []
    n_files = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        folder = "" if dirpath == os.fspath(root) else Path(dirpath).relative_to(root).as_posix()
        out.append((folder, sorted(filenames)))
        n_files += len(filenames)
    return out, n_files


def _rel_path(folder: str, name: str) -> str:
    """A file's POSIX path relative to the export, from its relative folder ("" for the root)."""
    return f"{folder}/{name}" if folder else name


def _iter_files(root: Path, folders: list[_Folder]) -> Iterator[tuple[Path, str, str]]:
    """Each file of ``folders`` (under ``root``) as (path, relative folder, name)."""
    for folder, names in folders:
        where = root / folder
        for name in names:
            yield where / name, folder, name


def _sniff(path: Path) -> str | None:
    """'dicom' (DICM preamble), 'raw' (starts like a preamble-less dataset) or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return None
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    # Old exports sometimes drop the preamble: the file then starts with a group 0002/0008 tag.
    if len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[2:4] < b"\x00\x10":
        return "raw"
    return None


def _read_headers(
    root: Path,
    folders: list[_Folder],
    n_files: int,
    labels: _Labels,
    key: str,
    progress: bool,
    phi_of_interest: Set[str],
) -> _HeaderScan:
    """Read the header of every DICOM file; count or list the ones that give no image.

    Only identifying values in ``phi_of_interest`` are kept: the values a manifest column
    can hold (see :func:`_phi_candidates`). Each folder's series is noted as the files are
    read, so a header keeps its SeriesInstanceUID only when it may be a series member.
    """
    scan = _HeaderScan()
    last: _Header | None = None
    files = _iter_files(root, folders)
    for path, folder, name in iter_progress(files, "reading DICOM headers", progress, n_files):
        kind = _sniff(path)
        if kind is None:
            scan.n_non_dicom += 1
            continue
        rel = _rel_path(folder, name)
        try:
            header, values = _read_header(path, folder, name, kind, key, labels)
        except Exception as err:  # pydicom raises many types on damaged headers
            if kind == "raw":
                scan.n_non_dicom += 1  # only looked like a dataset
            else:
                scan.unreadable.append((rel, f"header unreadable: {type(err).__name__}: {err}"))
            continue
        scan.phi |= values & phi_of_interest
        if header is None:
            scan.n_non_image += 1
        elif not header.patient:
            scan.unreadable.append((rel, "no PatientID: the image cannot be grouped by patient"))
        else:
            if last is not None:  # the files of a series usually follow each other
                _share_ids(header, last)
            seen = scan.folder_series.setdefault(folder, header.series)
            if seen is not None and seen != header.series:
                scan.folder_series[folder] = None
            if not _in_series(header):
                header.series = ""  # only a series member needs its UID from here on
            scan.headers.append(header)
            last = header
    return scan


def _in_series(header: _Header) -> bool:
    """Whether the file may be a slice of a multi-file series (CT/MR/PT/NM with a position)."""
    return header.modality in _SERIES_MODALITIES and header.has_position and bool(header.series)


def _share_ids(header: _Header, previous: _Header) -> None:
    """Point ``header``'s patient, study and series at ``previous``'s equal strings."""
    if header.patient == previous.patient:
        header.patient = previous.patient
    if header.study == previous.study:
        header.study = previous.study
    if header.series == previous.series:
        header.series = previous.series


def _text(ds: Any, keyword: str) -> str:
    """A header attribute as stripped text; empty when absent."""
    v = ds.get(keyword, "")
    return "" if v is None else str(v).strip()


def _read_header(
    path: Path, folder: str, name: str, kind: str, key: str, labels: _Labels
) -> tuple[_Header | None, set[str]]:
    """Header fields a manifest needs, and the file's identifying values (kept in memory)."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, force=kind == "raw")
    if len(ds) == 0:  # pydicom reads a file cut inside its header as an empty dataset
        raise ValueError("no data elements after the file meta (truncated file?)")
    meta = getattr(ds, "file_meta", None)
    sop_class = _text(ds, "SOPClassUID") or (_text(meta, "MediaStorageSOPClassUID") if meta else "")
    phi = identifying_values(ds, name_parts=True)
    if not _is_image_object(ds, sop_class):
        return None, phi
    path_has_phi = _path_has_phi(ds, _rel_path(folder, name))
    intern = sys.intern  # few distinct values, one object each
    key_value = _text(ds, key)
    header = _Header(
        folder=folder,
        name=name,
        label_row=labels.rows.get(key_value),
        has_key=bool(key_value),
        patient=_text(ds, "PatientID"),
        study=_text(ds, "StudyInstanceUID"),
        series=_text(ds, "SeriesInstanceUID"),
        modality=intern(_text(ds, "Modality").upper()),
        sex=intern(_text(ds, "PatientSex").upper()),
        body_part=intern(_text(ds, "BodyPartExamined").upper()),
        view=intern(_text(ds, "ViewPosition").upper()),
        institution=intern(_text(ds, "InstitutionName")),
        has_position="ImagePositionPatient" in ds,
        path_has_phi=path_has_phi,
    )
    return header, phi


def _is_image_object(ds: Any, sop_class: str) -> bool:
    """False for a DICOMDIR, structured report, presentation state or other non-image object."""
    import pydicom

    if sop_class == _DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        return False
    if sop_class:
        name = pydicom.uid.UID(sop_class).name
        return name == sop_class or "Image Storage" in name  # unknown UIDs count as images
    return "Rows" in ds


def _path_has_phi(ds: Any, rel: str) -> bool:
    """True when the file's path contains its patient id, accession number or a name part."""
    # Exporters sometimes name folders after the patient or the accession number.
    in_path = [_text(ds, "PatientID"), _text(ds, "AccessionNumber")]
    in_path += [part for part in _text(ds, "PatientName").split("^") if len(part) >= 4]
    rel_upper = rel.upper()
    return any(len(v) >= 4 and v.upper() in rel_upper for v in in_path)


# ---------------------------------------------------------------------------- series
# One manifest image: a file, or the folder of a multi-file series (its files, 2 or more).
_Unit = tuple[_Header, ...]


def _unit_path(unit: _Unit) -> str:
    """A unit's image relative to the export: its series folder, or its one file."""
    return unit[0].folder if len(unit) > 1 else unit[0].rel


def _group_units(
    headers: list[_Header], folder_series: dict[str, str | None]
) -> tuple[list[_Unit], list[tuple[str, str]], int]:
    """Group multi-file series; every other image is one per file.

    Returns the units, the files of series that cannot become one folder row (relative
    path, reason), and the number of multi-file series.
    """
    units: list[_Unit] = []
    by_series: dict[str, list[_Header]] = {}
    for h in headers:
        if _in_series(h):
            by_series.setdefault(h.series, []).append(h)
        else:
            units.append((h,))
    misplaced: list[tuple[str, str]] = []
    n_series = 0
    for members in by_series.values():
        if len(members) == 1:
            units.append((members[0],))
            continue
        reason = _series_folder_problem(members, folder_series)
        if reason is None:
            units.append(tuple(members))
            n_series += 1
        else:
            hint = f"{reason}; put each series in its own folder and scan again"
            misplaced += [(m.rel, hint) for m in members]
    return units, misplaced, n_series


def _series_folder_problem(
    members: list[_Header], folder_series: dict[str, str | None]
) -> str | None:
    """Why a multi-file series cannot be one folder row, or None when its folder is its own."""
    folders = {m.folder for m in members}
    if len(folders) > 1:
        return "series spread over several folders"
    if folder_series[next(iter(folders))] != members[0].series:
        return "series shares its folder with other images"
    return None


# ---------------------------------------------------------------------------- manifest rows
@dataclass
class _Join:
    """Manifest columns of the labelled units, the unlabeled ones with why, and PHI-named paths.

    The rows are kept as one list per column (a dict per row cost more than its values).
    """

    columns: dict[str, list[Any]] = field(default_factory=dict)
    n_rows: int = 0
    unlabeled: list[tuple[str, str]] = field(default_factory=list)  # relative path, reason
    phi_paths: int = 0


def _join_labels(
    units: list[_Unit],
    root: Path,
    labels: _Labels,
    key: str,
    label_column: str,
    extra_cols: list[str],
    salt: str | None,
    base: Path | None,
) -> _Join:
    """One manifest row per unit with a single label, in path order; the rest are unlabeled.

    Empties ``units`` as it goes, so each unit's headers are freed once its row is made.
    """
    join = _Join()
    # Neighbouring rows share patient, study and site: one pseudonym (HMAC) and string each.
    identifier = lru_cache(maxsize=4096)(partial(_identifier, salt=salt))
    units.sort(key=lambda u: str(root / _unit_path(u)))
    for members in _drain(units):
        image = _unit_path(members)
        label, why = _unit_label(members, labels, key, label_column)
        if label is None:
            join.unlabeled.append((image, why))
            continue
        first = members[0]
        join.phi_paths += any(m.path_has_phi for m in members)
        row: dict[str, Any] = {
            IMAGE_COLUMN: _shown(root / image, base),
            "label": label,
            "patient_id": identifier(first.patient, prefix="P-"),
            "study_id": identifier(first.study, prefix="S-"),
        }
        extra = labels.pick(first.label_row, extra_cols) if first.label_row is not None else None
        for i, col in enumerate(extra_cols):
            row[col] = extra[i] if extra is not None else ""
        if "site" not in extra_cols and first.institution:
            row["site"] = identifier(first.institution, prefix="SITE-")
        row.update(
            modality=first.modality,
            sex=first.sex,
            body_part=first.body_part,
            view=first.view,
            n_files=len(members),
        )
        _append_row(join.columns, row, join.n_rows)
        join.n_rows += 1
    return join


def _drain(items: list[_Unit]) -> Iterator[_Unit]:
    """Yield the items of a list in order while emptying it (each is freed once used)."""
    items.reverse()
    while items:
        yield items.pop()


def _append_row(columns: dict[str, list[Any]], row: dict[str, Any], n_rows: int) -> None:
    """Add ``row`` to ``columns`` (``n_rows`` long) as a frame of row dicts lays it out: a new
    key becomes a column, NaN in the rows before; a key the row lacks is NaN."""
    for col, value in row.items():
        if col not in columns:
            columns[col] = [math.nan] * n_rows
        columns[col].append(value)
    for values in columns.values():
        if len(values) == n_rows:
            values.append(math.nan)


def _unit_label(
    members: _Unit, labels: _Labels, key: str, label_column: str
) -> tuple[str | None, str]:
    """The one label of a unit's files, or None and the reason it has none."""
    at = labels.columns.index(label_column)
    found = {m.label_row[at] for m in members if m.label_row is not None}
    if not found:
        what = "key value missing in the header" if not members[0].has_key else "no row"
        return None, f"{what} for its {key} in the labels file"
    if len(found) > 1:
        return None, "files of this series have different labels"
    return str(found.pop()), ""


def _identifier(value: str, prefix: str, salt: str | None) -> str:
    """The real identifier when ``salt`` is None (``keep_ids``), else its salted pseudonym."""
    return value if salt is None else pseudonymize(value, salt, prefix)


def _shown(path: Path, base: Path | None) -> str:
    """A path as written to the outputs: relative to ``base`` (POSIX), or absolute without."""
    if base is None:
        return str(path.resolve())
    return os.path.relpath(path.resolve(), base).replace(os.sep, "/")


def _manifest_frame(columns: dict[str, list[Any]]) -> pd.DataFrame:
    """The manifest table; sex, body part and view are left out when empty in every row.

    Empties ``columns`` as it converts them, so each list is freed once it is in the frame.
    """
    if not columns:
        return pd.DataFrame(columns=[IMAGE_COLUMN, "label", "patient_id", "study_id"])
    df = pd.DataFrame({col: _column(columns.pop(col)) for col in list(columns)})
    return df.drop(
        columns=[
            c for c in ("body_part", "view", "sex") if c in df and not df[c].astype(bool).any()
        ]
    )


def _column(values: list[Any]) -> pd.Series:
    """``pd.Series(values)``, with the same dtype; text held by the system allocator.

    pandas keeps text columns in pyarrow, whose default allocator (mimalloc) held about three
    times the text's size while building them (12 MB for 4 columns of 20,000 paths, against
    5 MB with the system allocator); the frame was the peak of the scan.
    """
    if not all(type(v) is str for v in values):
        return pd.Series(values)  # numbers, or text with gaps: pandas infers as it always did
    dtype = pd.Series(values[:1]).dtype
    if not (isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow"):
        return pd.Series(values)  # text as Python objects (older pandas, no pyarrow)
    import pyarrow as pa  # type: ignore[import-untyped]  # a dependency; ships no stubs

    # large_string: what pandas stores its text in, so the array is not converted again
    text = pa.array(values, type=pa.large_string(), memory_pool=pa.system_memory_pool())
    return pd.Series(text, dtype=dtype)


def _phi_candidates(labels: _Labels, extra_cols: list[str]) -> frozenset[str]:
    """The values the copied labels-file columns hold: the only identifying header values
    :func:`_drop_identifying_columns` can match (its cells come from these or are empty)."""
    at = [labels.columns.index(c) for c in extra_cols]
    return frozenset(str(row[i]) for row in labels.rows.values() for i in at)


def _drop_identifying_columns(
    df: pd.DataFrame, extra_cols: list[str], phi: set[str]
) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Leave out label-file columns whose cells equal identifying header values.

    Returns the table, the columns left out and a warning for each.
    """
    dropped: list[str] = []
    warnings: list[str] = []
    for col in extra_cols:
        if col in df.columns and df[col].astype(str).isin(phi).any():
            df = df.drop(columns=col)
            dropped.append(col)
            warnings.append(f"labels column '{col}' holds identifying header values; left out")
    return df, dropped, warnings


def _scan_warnings(phi_paths: int, keep_ids: bool) -> list[str]:
    """Warnings about identifiers that still reach the outputs (paths, ``keep_ids``)."""
    warnings = []
    if phi_paths:
        warnings.append(
            f"{phi_paths} image path(s) contain identifying values (folders or files named after "
            "patients or accession numbers); rename them before sharing the manifest"
        )
    if keep_ids:
        warnings.append("--keep-ids: patient_id/study_id/site hold real identifiers")
    return warnings


# ---------------------------------------------------------------------------- outputs
def _side_table(entries: list[tuple[str, str]], root: Path, base: Path | None) -> pd.DataFrame:
    """A side table of skipped files (paths relative to ``root``): shown path and reason."""
    rows = [(_shown(root / p, base), r) for p, r in entries]
    return pd.DataFrame(rows, columns=["path", "reason"])


def _write_outputs(result: ScanResult, out_path: Path) -> None:
    """Write the manifest and its ``.unlabeled.csv`` / ``.unreadable.csv`` side tables."""
    write_manifest(result.manifest, out_path)
    stem = out_path.with_suffix("")
    result.unlabeled_csv = Path(f"{stem}.unlabeled.csv")
    result.unreadable_csv = Path(f"{stem}.unreadable.csv")
    write_csv(result.unlabeled, result.unlabeled_csv)  # paths cannot run as formulas
    write_csv(result.unreadable, result.unreadable_csv)
