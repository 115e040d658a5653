"""Manifests: read, write and validate them, hash their content, and build them from DICOM exports.

A manifest is a CSV or Parquet table, one row per image (schema: ``data_manifests/README.md``):
``image`` (a DICOM file, a DICOM series folder, NIfTI or PNG/JPEG; relative to the
manifest's folder or absolute), ``label`` and ``patient_id``; optional ``study_id``,
``site``, ``fold``, ``split``; any other column is kept (subgroups, notes).

``scan_dicom_dir`` turns a hospital DICOM export plus a labels CSV into such a manifest,
reading headers only and writing salted pseudonyms instead of identifiers
(``medtl.deid``): no name, MRN, date, accession number, institution or UID reaches it.

Modules: ``table`` (the record, reading/writing, content hash), ``validate`` (checks and
their report) and ``scan`` (DICOM export to manifest); ``scan`` and ``validate`` build on
``table``, never the other way round.
"""

from __future__ import annotations

from medtl.manifest.scan import ScanResult, scan_dicom_dir
from medtl.manifest.table import (
    IMAGE_COLUMN,
    Manifest,
    manifest_content_hash,
    read_manifest,
    write_manifest,
)

# Public constants that were never in __all__: importable, but not star-exported.
from medtl.manifest.table import OPTIONAL_COLUMNS as OPTIONAL_COLUMNS
from medtl.manifest.table import PATH_COLUMN as PATH_COLUMN
from medtl.manifest.table import TABLE_SUFFIXES as TABLE_SUFFIXES
from medtl.manifest.validate import Issue, ValidationReport, render_summary, validate_manifest

__all__ = [
    "IMAGE_COLUMN",
    "Manifest",
    "Issue",
    "ValidationReport",
    "ScanResult",
    "read_manifest",
    "write_manifest",
    "validate_manifest",
    "manifest_content_hash",
    "render_summary",
    "scan_dicom_dir",
]
