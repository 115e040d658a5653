"""Is an evaluation set disjoint from a model's training set? Salted fingerprints, no identifiers.

A bundle stores ``training_fingerprint(train_records, salt)`` (``meta["training_set"]``):

- ``patient_hashes``: HMAC-SHA256 of every training patient id keyed by the site's pseudonym
  salt (``medtl.deid``), so without the salt a list of candidate ids cannot be matched;
- ``salt_fingerprint``: a keyed hash of a fixed text that tells whether an evaluation runs
  with the same salt, without revealing it;
- ``image_hashes``: every training image's decoded-pixel sha256 (``medtl.io.pixel_sha256``),
  HMAC'd with a random per-bundle ``image_nonce`` stored beside them: anyone holding the
  bundle can test whether an image they have was trained on, but cannot look a known image
  up in a precomputed table.

``check_overlap(fingerprint, records_or_manifest, salt)`` counts the evaluation patients and
images that the training set holds. Hashes are cut to 128 bits (32 hex chars): collisions stay
negligible and a bundle stays small. Lists are sorted, so they keep no record order.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from medtl.deid import SALT_ENV, SALT_FILE_ENV, load_salt
from medtl.errors import MedtlError, UnreadableImageError
from medtl.io.base import PIXEL_HASH_KEY
from medtl.manifest.table import PATH_COLUMN, Manifest

__all__ = [
    "FINGERPRINT_FORMAT",
    "OverlapReport",
    "check_overlap",
    "optional_salt",
    "salt_fingerprint",
    "training_fingerprint",
]

log = logging.getLogger(__name__)

FINGERPRINT_FORMAT = "medtl-training-set/1"
_HEX = 32  # 128-bit hashes
# Domain labels: a patient hash is never equal to a scan pseudonym of the same value.
_SALT_LABEL = b"medtl/salt-fingerprint/1"
_PATIENT_LABEL = "medtl/training-patient/1\x00"
_REQUIRED = ("format", "salt_fingerprint", "patient_hashes", "image_nonce", "image_hashes")


def optional_salt() -> str | None:
    """The site's pseudonym salt, or None when neither salt variable is set.

    Raises:
        ConfigError: a salt variable is set but unusable (missing or empty salt file).
    """
    if not (os.environ.get(SALT_ENV) or os.environ.get(SALT_FILE_ENV)):
        return None
    return load_salt()


def _hmac(key: bytes, text: str | bytes) -> str:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hmac.new(key, data, hashlib.sha256).hexdigest()[:_HEX]


def salt_fingerprint(salt: str) -> str:
    """A hash that identifies ``salt`` (same salt, same value) without revealing it."""
    return _hmac(salt.encode("utf-8"), _SALT_LABEL)


def _patient_hash(salt: str, patient_id: str) -> str:
    return _hmac(salt.encode("utf-8"), _PATIENT_LABEL + patient_id)


def _image_hash(nonce: str, pixel_sha256: str) -> str:
    return _hmac(bytes.fromhex(nonce), pixel_sha256)


def _patient_id(rec: Mapping[str, Any]) -> str | None:
    value = rec.get("patient_id")
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return None
    text = str(value).strip()
    return text or None


def _pixel_digests(records: Sequence[Mapping[str, Any]], decode_missing: bool) -> list[str | None]:
    """Each record's pixel sha256: its ``image_sha256``, else (``decode_missing``) decoded
    from ``image``; None when neither works."""
    out: list[str | None] = []
    decoded: dict[str, str | None] = {}  # one decode per path (2.5D rows share a volume)
    for rec in records:
        digest = rec.get(PIXEL_HASH_KEY)
        path = rec.get("image")
        if not digest and decode_missing and path:
            key = str(path)
            if key not in decoded:
                decoded[key] = _decode_digest(key)
            digest = decoded[key]
        out.append(str(digest) if digest else None)
    if decoded:
        log.info("leakage check: decoded %d image(s) to hash their pixels", len(decoded))
    return out


def _decode_digest(path: str) -> str | None:
    from medtl.io import load_image, pixel_sha256

    try:
        return pixel_sha256(load_image(path))
    except (UnreadableImageError, OSError) as err:
        log.info("leakage check: cannot hash %s: %s", path, err)
        return None


def training_fingerprint(
    records: Iterable[Mapping[str, Any]], salt: str | None, *, decode_missing: bool = True
) -> dict[str, Any]:
    """The JSON-safe fingerprint of a training set, for ``save_bundle(training_set=...)``.

    Args:
        records: the records the model was trained on (``TrainData.train_pool``: every
            non-test record; the held-out test patients must not be in it). Each needs
            ``patient_id`` and ``image``; ``image_sha256`` (set by
            ``medtl.data.prepare_records``) avoids decoding the image again.
        salt: the site's pseudonym salt (``optional_salt()``); None stores no patient hashes
            (evaluations can then compare image content only).
        decode_missing: decode images of records without ``image_sha256`` to hash them
            (under torchrun only the local rank's records carry one).

    Returns:
        ``{"format", "salt_fingerprint", "patient_hashes", "image_nonce", "image_hashes",
        "n_patients", "n_images", "n_unhashed"}``: hashes and counts only, never an id or path.
    """
    records = list(records)
    patients = {p for p in map(_patient_id, records) if p is not None}
    digests = _pixel_digests(records, decode_missing)
    nonce = secrets.token_hex(16)
    images = {_image_hash(nonce, d) for d in digests if d is not None}
    unhashed = sum(d is None for d in digests)
    if unhashed:
        log.warning(
            "training fingerprint: %d of %d image(s) have no pixel hash; evaluations cannot "
            "detect copies of them",
            unhashed,
            len(records),
        )
    return {
        "format": FINGERPRINT_FORMAT,
        "salt_fingerprint": salt_fingerprint(salt) if salt else None,
        "patient_hashes": sorted(_patient_hash(salt, p) for p in patients) if salt else None,
        "image_nonce": nonce,
        "image_hashes": sorted(images),
        "n_patients": len(patients),
        "n_images": len(images),
        "n_unhashed": unhashed,
    }


@dataclass(frozen=True)
class OverlapReport:
    """What an evaluation set shares with a training set (counts over evaluation records).

    ``shared_patient_ids`` and ``shared_rows`` name the evaluation side (its own pseudonyms
    and record positions) for messages to the user; :meth:`summary` leaves them out.
    """

    patients_compared: bool
    shared_patients: int
    n_patients: int
    shared_images: int
    images_compared: int  # evaluation records whose pixels could be hashed
    n_images: int
    note: str | None = None  # why patients were not compared, when they were not
    shared_patient_ids: tuple[str, ...] = field(default=(), repr=False)
    shared_rows: tuple[int, ...] = field(default=(), repr=False)

    @property
    def overlaps(self) -> bool:
        """True when any evaluation patient or image is in the training set."""
        return self.shared_patients > 0 or self.shared_images > 0

    def summary(self) -> dict[str, Any]:
        """Counts and flags only (JSON-safe): what a report may record."""
        return {
            "patients_compared": self.patients_compared,
            "shared_patients": self.shared_patients if self.patients_compared else None,
            "patients": self.n_patients,
            "shared_images": self.shared_images,
            "images_compared": self.images_compared,
            "images": self.n_images,
            "note": self.note,
        }

    def describe(self) -> str:
        """One line: what is shared, out of how many."""
        patients = (
            f"{self.shared_patients} of {self.n_patients} patient(s)"
            if self.patients_compared
            else "patients not compared"
        )
        return (
            f"{patients}, {self.shared_images} of {self.images_compared} image(s) "
            "(identical pixels) in the model's training set"
        )


def _records_of(source: Manifest | Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    if not isinstance(source, Manifest):
        return list(source)
    df = source.df
    return [
        {"patient_id": p, "image": path or None}
        for p, path in zip(
            df[source.patient_column].tolist(), df[PATH_COLUMN].tolist(), strict=True
        )
    ]


def _check_format(fingerprint: Mapping[str, Any]) -> None:
    missing = [k for k in _REQUIRED if k not in fingerprint]
    if fingerprint.get("format") != FINGERPRINT_FORMAT or missing:
        raise MedtlError(
            f"the model's training-set fingerprint has format {fingerprint.get('format')!r}"
            + (f" and lacks {missing}" if missing else "")
            + f"; this medtl reads {FINGERPRINT_FORMAT!r}. Upgrade medtl, or re-save the "
            "bundle with this version"
        )


def check_overlap(
    fingerprint: Mapping[str, Any],
    records_or_manifest: Manifest | Iterable[Mapping[str, Any]],
    salt: str | None,
    *,
    decode_missing: bool = True,
) -> OverlapReport:
    """Count the evaluation patients and images that ``fingerprint``'s training set holds.

    Patients are compared only when ``salt`` is the one the fingerprint was made with (the
    report's ``note`` says why not otherwise); image content is always compared. Records
    need ``patient_id`` and ``image``, and ``image_sha256`` when known (else the image is
    decoded when ``decode_missing``); a ``Manifest`` gives its rows (images decoded).

    Raises:
        MedtlError: the fingerprint is not one this medtl wrote.
    """
    _check_format(fingerprint)
    records = _records_of(records_or_manifest)
    patient_ids = [_patient_id(r) for r in records]
    eval_patients = sorted({p for p in patient_ids if p is not None})

    stored_salt = fingerprint.get("salt_fingerprint")
    note = None
    if fingerprint.get("patient_hashes") is None or not stored_salt:
        note = "the model was trained without a pseudonym salt, so it stores no patient hashes"
    elif not salt:
        note = (
            f"no pseudonym salt is configured here ({SALT_ENV} or {SALT_FILE_ENV}); set the "
            "site salt the model was trained with to compare patients"
        )
    elif not hmac.compare_digest(salt_fingerprint(salt), str(stored_salt)):
        note = (
            "the pseudonym salt differs from the one the model was trained with, so patient "
            "ids cannot be compared"
        )
    shared_ids: list[str] = []
    if note is None and salt:
        train_patients = set(fingerprint["patient_hashes"])
        shared_ids = [p for p in eval_patients if _patient_hash(salt, p) in train_patients]

    digests = _pixel_digests(records, decode_missing)
    nonce = str(fingerprint["image_nonce"])
    train_images = set(fingerprint["image_hashes"])
    shared_rows = [
        i for i, d in enumerate(digests) if d is not None and _image_hash(nonce, d) in train_images
    ]
    return OverlapReport(
        patients_compared=note is None,
        shared_patients=len(shared_ids),
        n_patients=len(eval_patients),
        shared_images=len(shared_rows),
        images_compared=sum(d is not None for d in digests),
        n_images=len(records),
        note=None if note is None else f"{note}; image content was compared",
        shared_patient_ids=tuple(shared_ids),
        shared_rows=tuple(shared_rows),
    )
