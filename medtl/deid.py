"""PHI rules: which DICOM attributes identify a person, and salted pseudonyms to replace them.

The attribute list follows the spirit of the DICOM PS3.15 Annex E Basic Application
Confidentiality Profile (names, IDs, dates, addresses, institutions, physicians, devices,
UIDs). medtl never writes these values anywhere: manifest scans replace the patient and
study identifiers with keyed pseudonyms (HMAC-SHA256), and the readers in ``medtl.io``
drop them from image metadata.

The pseudonym key (the "salt") is a site secret: without it a pseudonym cannot be linked back
to an MRN by hashing candidate MRNs. It is read from ``MEDTL_PSEUDONYM_SALT`` or from the file
named by ``MEDTL_PSEUDONYM_SALT_FILE``; there is deliberately no built-in default.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medtl.errors import ConfigError

SALT_ENV = "MEDTL_PSEUDONYM_SALT"
SALT_FILE_ENV = "MEDTL_PSEUDONYM_SALT_FILE"

# Keywords of attributes whose values identify a patient, a study, a person or a place
# (PS3.15 Table E.1-1, basic profile: attributes with action D/Z/X/U). Dates and times are
# included: with a birth date they re-identify.
IDENTIFYING_ATTRIBUTES: frozenset[str] = frozenset(
    {
        # patient
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "PatientBirthName",
        "PatientMotherBirthName",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientTelecomInformation",
        "MilitaryRank",
        "BranchOfService",
        "MedicalRecordLocator",
        "EthnicGroup",
        "Occupation",
        "AdditionalPatientHistory",
        "PatientComments",
        "PatientInsurancePlanCodeSequence",
        "ResponsiblePerson",
        "ResponsibleOrganization",
        "RegionOfResidence",
        "CountryOfResidence",
        "PatientReligiousPreference",
        # study / visit
        "AccessionNumber",
        "StudyID",
        "AdmissionID",
        "IssuerOfAdmissionIDSequence",
        "RequestedProcedureID",
        "PerformedProcedureStepID",
        "ScheduledProcedureStepID",
        "FillerOrderNumberImagingServiceRequest",
        "PlacerOrderNumberImagingServiceRequest",
        "StudyDescription",
        "RequestAttributesSequence",
        # people and places
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "ReferringPhysicianName",
        "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers",
        "PerformingPhysicianName",
        "NameOfPhysiciansReadingStudy",
        "PhysiciansOfRecord",
        "OperatorsName",
        "RequestingPhysician",
        "ScheduledPerformingPhysicianName",
        "StationName",
        "DeviceSerialNumber",
        "PersonName",
        # dates and times
        "StudyDate",
        "SeriesDate",
        "AcquisitionDate",
        "ContentDate",
        "AcquisitionDateTime",
        "StudyTime",
        "SeriesTime",
        "AcquisitionTime",
        "ContentTime",
        "InstanceCreationDate",
        "InstanceCreationTime",
        # UIDs that link instances to a study/patient (class and syntax UIDs are not listed)
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "MediaStorageSOPInstanceUID",
        "FrameOfReferenceUID",
        "SynchronizationFrameOfReferenceUID",
        "ReferencedSOPInstanceUID",
        "ReferencedFrameOfReferenceUID",
        "IrradiationEventUID",
        "InstanceCreatorUID",
        "StorageMediaFileSetUID",
        "DimensionOrganizationUID",
        "ConcatenationUID",
        "DeviceUID",
    }
)

# Not listed, on purpose: PatientSex, PatientAge, BodyPartExamined, ViewPosition, Modality,
# Manufacturer (PS3.15 "Retain Patient Characteristics" / device options): subgroup reports need
# them and alone they do not identify. Private tags can hold anything; medtl never copies them.

# Keys a manifest scan may join labels on (all identifying; none is copied to the output).
JOIN_KEYS: tuple[str, ...] = (
    "AccessionNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "PatientID",
)

# Column names in a site's own CSVs that usually hold identifiers (compared case- and
# punctuation-insensitively), in addition to the attribute keywords above.
IDENTIFYING_COLUMN_NAMES: frozenset[str] = frozenset(
    {"mrn", "name", "patientname", "dob", "birthdate", "accession", "accessionno", "ssn", "nhs"}
)


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


_IDENTIFYING_NORMED = {_norm(k) for k in IDENTIFYING_ATTRIBUTES} | IDENTIFYING_COLUMN_NAMES


def is_identifying_column(name: str) -> bool:
    """True if a table column named ``name`` probably holds identifiers (e.g. ``MRN``, ``Patient ID``)."""
    return _norm(name) in _IDENTIFYING_NORMED


def pseudonymize(value: Any, salt: str, prefix: str = "P-") -> str:
    """Keyed pseudonym of ``value``: ``prefix`` + 12 hex chars of HMAC-SHA256(salt, value).

    Same value and salt give the same pseudonym, so patients stay grouped across scans of
    the same site; without the salt the mapping cannot be rebuilt from a list of MRNs.
    """
    if not salt:
        raise ConfigError(f"an empty pseudonym salt is not allowed; {salt_help()}")
    text = str(value).strip()
    digest = hmac.new(salt.encode("utf-8"), text.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{prefix}{digest[:12]}"


def salt_help() -> str:
    """How to configure the pseudonym salt (used in error messages)."""
    return (
        f"set {SALT_ENV} to a long random secret kept by your site (e.g. "
        f'`export {SALT_ENV}="$(openssl rand -hex 32)"`), or put it in a file readable only '
        f"by you and set {SALT_FILE_ENV}=/path/to/file. Use the same salt for every scan of a "
        "site so that pseudonyms stay stable."
    )


def load_salt() -> str:
    """Read the site's pseudonym salt from the environment (or a file it names).

    Raises:
        ConfigError: no salt is configured, the salt file is missing, or it is empty.
    """
    value = os.environ.get(SALT_ENV)
    if value:
        return value
    file_name = os.environ.get(SALT_FILE_ENV)
    if file_name:
        path = Path(file_name).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"{SALT_FILE_ENV}={file_name} does not name a readable file; {salt_help()}"
            )
        salt = path.read_text(encoding="utf-8").strip()
        if not salt:
            raise ConfigError(f"salt file {file_name} is empty; {salt_help()}")
        return salt
    raise ConfigError(f"no pseudonym salt configured: {salt_help()}")


def identifying_values(
    ds: Any, keywords: Iterable[str] = IDENTIFYING_ATTRIBUTES, name_parts: bool = False
) -> set[str]:
    """Every non-empty identifying value in a pydicom dataset (and its file meta), as strings.

    With ``name_parts`` person names also give each ``^``-separated component of 3+
    characters ("DOE" from "DOE^JOHN"); short parts make substring searches noisy.
    """
    keywords = tuple(keywords)
    out: set[str] = set()
    sources = [ds]
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        sources.append(meta)
    for source in sources:
        for kw in keywords:
            if kw not in source:
                continue
            elem = source[kw]
            if elem.VR == "SQ":
                for item in elem.value:
                    out |= identifying_values(item, keywords, name_parts)
                continue
            values = elem.value if elem.VM > 1 else [elem.value]
            for v in values:
                text = str(v).strip()
                if not text:
                    continue
                out.add(text)
                if name_parts and elem.VR == "PN":
                    out |= {part for part in text.split("^") if len(part) >= 3}
    return out
