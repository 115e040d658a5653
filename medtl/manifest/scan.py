"""A manifest from a hospital DICOM export: read headers, group series, join labels, pseudonymise."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
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

    files = _list_files(root)
    found = _read_headers(root, files, key, progress)
    units, misplaced, n_series = _group_units(found.headers)
    out_path = Path(out) if out else None
    base = out_path.resolve().parent if out_path else None
    join = _join_labels(units, labels, key, label_column, extra_cols, id_salt, base)

    df, guarded, warnings = _drop_identifying_columns(
        _manifest_frame(join.rows), extra_cols, found.phi
    )
    warnings += _scan_warnings(join.phi_paths, keep_ids)
    result = ScanResult(
        manifest=df,
        out=out_path,
        n_files=len(files),
        n_dicom=len(files) - found.n_non_dicom,
        n_non_dicom=found.n_non_dicom,
        n_non_image=found.n_non_image,
        n_series=n_series,
        unlabeled=_side_table(join.unlabeled, base),
        unreadable=_side_table(found.unreadable + misplaced, base),
        dropped_columns=dropped + guarded,
        warnings=warnings,
    )
    if out_path is not None:
        _write_outputs(result, out_path)
    return result


# ---------------------------------------------------------------------------- labels file
def _read_labels(labels_csv: Path, key: str, label_column: str) -> pd.DataFrame:
    """The labels table, one row per key value; conflicting duplicates are an error."""
    suffix = labels_csv.suffix.lower()
    if suffix in (".parquet", ".pq"):
        labels = pd.read_parquet(labels_csv).fillna("").astype(str)
    else:
        labels = pd.read_csv(
            labels_csv, dtype=str, keep_default_na=False, sep="\t" if suffix == ".tsv" else ","
        )
    for col in (key, label_column):
        if col not in labels.columns:
            raise ManifestError(
                f"labels file {labels_csv} has no column '{col}'. Columns present: "
                f"{', '.join(map(str, labels.columns))}. The join key column must be named like "
                f"the DICOM attribute (--key {key}) and labels go in '{label_column}'."
            )
    labels = labels.map(lambda v: v.strip() if isinstance(v, str) else v)
    labels = labels[labels[key] != ""]
    n_label = labels.groupby(key)[label_column].nunique()
    if (n_label > 1).any():
        bad = labels.index[labels[key].isin(n_label[n_label > 1].index)]
        # Line numbers only: the key values are identifiers.
        raise ManifestError(
            f"labels file {labels_csv}: {int((n_label > 1).sum())} {key} value(s) have "
            f"conflicting labels (lines {examples([str(i + 2) for i in bad])}); keep one label "
            "per key"
        )
    return labels.drop_duplicates(subset=[key]).set_index(key)


def _label_file_columns(labels: pd.DataFrame, label_column: str) -> tuple[list[str], list[str]]:
    """The labels file's extra columns to copy, and those left out because they look like ids."""
    extra_cols = [c for c in labels.columns if c != label_column]
    dropped = [c for c in extra_cols if is_identifying_column(c) or c in JOIN_KEYS]
    return [c for c in extra_cols if c not in dropped], dropped


# ---------------------------------------------------------------------------- headers
@dataclass
class _Header:
    """The header fields of one image file that a manifest row needs."""

    path: Path
    key: str
    patient: str
    study: str
    series: str
    modality: str
    sex: str
    body_part: str
    view: str
    institution: str
    has_position: bool
    path_has_phi: bool


@dataclass
class _HeaderScan:
    """The readable image headers of an export, plus what was skipped and why."""

    headers: list[_Header] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    phi: set[str] = field(default_factory=set)  # identifying values seen, kept in memory
    n_non_dicom: int = 0
    n_non_image: int = 0


def _list_files(root: Path) -> list[Path]:
    """Every file under ``root``, in a stable (sorted, depth-first) order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out += [Path(dirpath) / f for f in sorted(filenames)]
    return out


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


def _read_headers(root: Path, files: Sequence[Path], key: str, progress: bool) -> _HeaderScan:
    """Read the header of every DICOM file; count or list the ones that give no image."""
    scan = _HeaderScan()
    for path in iter_progress(files, "reading DICOM headers", progress):
        kind = _sniff(path)
        if kind is None:
            scan.n_non_dicom += 1
            continue
        try:
            rel = path.relative_to(root).as_posix()
            header, values = _read_header(path, rel, kind, key)
        except Exception as err:  # pydicom raises many types on damaged headers
            if kind == "raw":
                scan.n_non_dicom += 1  # only looked like a dataset
            else:
                scan.unreadable.append((path, f"header unreadable: {type(err).__name__}: {err}"))
            continue
        scan.phi |= values
        if header is None:
            scan.n_non_image += 1
        elif not header.patient:
            scan.unreadable.append((path, "no PatientID: the image cannot be grouped by patient"))
        else:
            scan.headers.append(header)
    return scan


def _text(ds: Any, keyword: str) -> str:
    """A header attribute as stripped text; empty when absent."""
    v = ds.get(keyword, "")
    return "" if v is None else str(v).strip()


def _read_header(path: Path, rel: str, kind: str, key: str) -> tuple[_Header | None, set[str]]:
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
    path_has_phi = _path_has_phi(ds, rel)
    header = _Header(
        path=path,
        key=_text(ds, key),
        patient=_text(ds, "PatientID"),
        study=_text(ds, "StudyInstanceUID"),
        series=_text(ds, "SeriesInstanceUID"),
        modality=_text(ds, "Modality").upper(),
        sex=_text(ds, "PatientSex").upper(),
        body_part=_text(ds, "BodyPartExamined").upper(),
        view=_text(ds, "ViewPosition").upper(),
        institution=_text(ds, "InstitutionName"),
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
_Unit = tuple[Path, list[_Header]]  # one manifest image (a file or a series folder), its files


def _group_units(headers: list[_Header]) -> tuple[list[_Unit], list[tuple[Path, str]], int]:
    """Group multi-file series; every other image is one per file.

    Returns the units, the files of series that cannot become one folder row (with the
    reason), and the number of multi-file series.
    """
    units: list[_Unit] = []
    by_series: dict[str, list[_Header]] = {}
    for h in headers:
        if h.modality in _SERIES_MODALITIES and h.has_position and h.series:
            by_series.setdefault(h.series, []).append(h)
        else:
            units.append((h.path, [h]))
    folder_series: dict[Path, set[str]] = {}
    for h in headers:
        folder_series.setdefault(h.path.parent, set()).add(h.series)
    misplaced: list[tuple[Path, str]] = []
    n_series = 0
    for members in by_series.values():
        if len(members) == 1:
            units.append((members[0].path, members))
            continue
        reason = _series_folder_problem(members, folder_series)
        if reason is None:
            units.append((members[0].path.parent, members))
            n_series += 1
        else:
            hint = f"{reason}; put each series in its own folder and scan again"
            misplaced += [(m.path, hint) for m in members]
    return units, misplaced, n_series


def _series_folder_problem(
    members: list[_Header], folder_series: dict[Path, set[str]]
) -> str | None:
    """Why a multi-file series cannot be one folder row, or None when its folder is its own."""
    folders = {m.path.parent for m in members}
    if len(folders) > 1:
        return "series spread over several folders"
    if folder_series[next(iter(folders))] != {members[0].series}:
        return "series shares its folder with other images"
    return None


# ---------------------------------------------------------------------------- manifest rows
@dataclass
class _Join:
    """Manifest rows of the labelled units, the unlabeled ones with why, and PHI-named paths."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    unlabeled: list[tuple[Path, str]] = field(default_factory=list)
    phi_paths: int = 0


def _join_labels(
    units: list[_Unit],
    labels: pd.DataFrame,
    key: str,
    label_column: str,
    extra_cols: list[str],
    salt: str | None,
    base: Path | None,
) -> _Join:
    """One manifest row per unit with a single label, in path order; the rest are unlabeled."""
    join = _Join()
    for image, members in sorted(units, key=lambda u: str(u[0])):
        label, why = _unit_label(members, labels, key, label_column)
        if label is None:
            join.unlabeled.append((image, why))
            continue
        first = members[0]
        label_row = labels.loc[first.key] if first.key in labels.index else None
        join.phi_paths += any(m.path_has_phi for m in members)
        row: dict[str, Any] = {
            IMAGE_COLUMN: _shown(image, base),
            "label": label,
            "patient_id": _identifier(first.patient, salt, "P-"),
            "study_id": _identifier(first.study, salt, "S-"),
        }
        for col in extra_cols:
            row[col] = label_row[col] if label_row is not None else ""
        if "site" not in extra_cols and first.institution:
            row["site"] = _identifier(first.institution, salt, "SITE-")
        row.update(
            modality=first.modality,
            sex=first.sex,
            body_part=first.body_part,
            view=first.view,
            n_files=len(members),
        )
        join.rows.append(row)
    return join


def _unit_label(
    members: list[_Header], labels: pd.DataFrame, key: str, label_column: str
) -> tuple[str | None, str]:
    """The one label of a unit's files, or None and the reason it has none."""
    found = {labels.at[m.key, label_column] for m in members if m.key in labels.index}
    if not found:
        what = "key value missing in the header" if not members[0].key else "no row"
        return None, f"{what} for its {key} in the labels file"
    if len(found) > 1:
        return None, "files of this series have different labels"
    return str(found.pop()), ""


def _identifier(value: str, salt: str | None, prefix: str) -> str:
    """The real identifier when ``salt`` is None (``keep_ids``), else its salted pseudonym."""
    return value if salt is None else pseudonymize(value, salt, prefix)


def _shown(path: Path, base: Path | None) -> str:
    """A path as written to the outputs: relative to ``base`` (POSIX), or absolute without."""
    if base is None:
        return str(path.resolve())
    return os.path.relpath(path.resolve(), base).replace(os.sep, "/")


def _manifest_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The manifest table; sex, body part and view are left out when empty in every row."""
    df = pd.DataFrame(
        rows, columns=None if rows else [IMAGE_COLUMN, "label", "patient_id", "study_id"]
    )
    return df.drop(
        columns=[
            c for c in ("body_part", "view", "sex") if c in df and not df[c].astype(bool).any()
        ]
    )


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
def _side_table(entries: list[tuple[Path, str]], base: Path | None) -> pd.DataFrame:
    """A side table of skipped files: their shown path and the reason."""
    return pd.DataFrame([(_shown(p, base), r) for p, r in entries], columns=["path", "reason"])


def _write_outputs(result: ScanResult, out_path: Path) -> None:
    """Write the manifest and its ``.unlabeled.csv`` / ``.unreadable.csv`` side tables."""
    write_manifest(result.manifest, out_path)
    stem = out_path.with_suffix("")
    result.unlabeled_csv = Path(f"{stem}.unlabeled.csv")
    result.unreadable_csv = Path(f"{stem}.unreadable.csv")
    write_csv(result.unlabeled, result.unlabeled_csv)  # paths cannot run as formulas
    write_csv(result.unreadable, result.unreadable_csv)
