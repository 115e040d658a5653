"""Patient-level N-way K-shot episodes (pure): a shot is one labelled patient, all its images.

Written here rather than taken from easyfsl's ``TaskSampler`` (easyfsl 1.5.0): that sampler
draws *images* per label, so one patient's images can land in both support and query; it
needs a fixed query size per class and draws from Python's global ``random`` state. Here
patients are drawn with a seeded numpy ``Generator``, support and query never share a
patient, and the query is by default every remaining patient of the episode's classes
(the MedFMC protocol).

A patient's class is the most frequent label among its images, ties going to the class
listed later (for a binary task: the positive class). Inside an episode each image keeps its
own label, so a positive patient's earlier normal study is a normal image of the support.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medtl.errors import ConfigError

__all__ = [
    "Episode",
    "PatientTable",
    "check_shots",
    "patient_class",
    "patient_table",
    "sample_episodes",
]


def patient_class(labels: Sequence[int] | np.ndarray) -> int:
    """The class of a patient from its images' class indices: the most frequent one, ties
    going to the later class (binary: a patient with as many nodule as normal images is a
    nodule patient)."""
    values, counts = np.unique(np.asarray(labels, dtype=int), return_counts=True)
    if len(values) == 0:
        raise ValueError("a patient needs at least one labelled image")
    return int(values[counts == counts.max()].max())


@dataclass(frozen=True)
class PatientTable:
    """The patients of a labelled image set: ids (sorted), class and image rows of each."""

    patients: tuple[str, ...]
    classes: np.ndarray  # (P,) class index of each patient
    rows: tuple[np.ndarray, ...]  # image row indices of each patient

    def patients_of(self, c: int) -> np.ndarray:
        """Positions (into ``patients``) of the patients of class ``c``."""
        return np.flatnonzero(self.classes == c)

    def counts(self, n_classes: int) -> list[int]:
        """Patients per class, for every class index ``0 .. n_classes - 1``."""
        return [int((self.classes == c).sum()) for c in range(n_classes)]


def patient_table(patient_ids: Sequence[str], labels: Sequence[int] | np.ndarray) -> PatientTable:
    """Group image rows by patient (single-label class indices)."""
    pids = np.asarray([str(p) for p in patient_ids])
    y = np.asarray(labels, dtype=int)
    if len(pids) != len(y):
        raise ValueError(f"{len(pids)} patient ids for {len(y)} labels")
    patients, inverse = np.unique(pids, return_inverse=True)
    rows = tuple(np.flatnonzero(inverse == i) for i in range(len(patients)))
    classes = np.array([patient_class(y[r]) for r in rows], dtype=int)
    return PatientTable(tuple(str(p) for p in patients), classes, rows)


@dataclass(frozen=True)
class Episode:
    """One few-shot task: its classes (dataset indices, ascending), and which patients and
    image rows form the support and the query."""

    classes: tuple[int, ...]
    support_patients: tuple[str, ...]
    query_patients: tuple[str, ...]
    support_rows: np.ndarray
    query_rows: np.ndarray


def check_shots(
    table: PatientTable,
    class_names: Sequence[str],
    k_shot: int,
    n_way: int | None = None,
    n_query: int | None = None,
) -> None:
    """ConfigError unless every class has the ``k_shot`` support patients plus at least one
    (or ``n_query``) query patient that an episode needs; the message names each short class."""
    n_classes = len(class_names)
    if k_shot < 1:
        raise ConfigError(f"shots must be whole patients per class (>= 1), got {k_shot}")
    way = n_classes if n_way is None else n_way
    if not 2 <= way <= n_classes:
        raise ConfigError(
            f"strategy.fewshot_ways={n_way}: an episode needs 2..{n_classes} classes "
            f"(this data has {n_classes}: {', '.join(class_names)})"
        )
    need = k_shot + (n_query or 1)
    counts = table.counts(n_classes)
    short = [f"'{class_names[c]}' has {n}" for c, n in enumerate(counts) if n < need]
    if short:
        query = f"{n_query} query patients" if n_query else "at least 1 query patient"
        most = min(counts) - (n_query or 1)
        fix = f"use at most {most} shots or add patients" if most >= 1 else "add patients"
        raise ConfigError(
            f"{k_shot}-shot episodes need {need} patients per class ({k_shot} support + "
            f"{query}), but class {'; class '.join(short)} patient(s). Patients per class: "
            + ", ".join(f"{class_names[c]}={n}" for c, n in enumerate(counts))
            + f"; {fix}."
        )


def _draw(
    table: PatientTable,
    classes: np.ndarray,
    k_shot: int,
    n_query: int | None,
    rng: np.random.Generator,
) -> Episode:
    support: list[int] = []
    query: list[int] = []
    for c in classes:
        order = rng.permutation(table.patients_of(int(c)))
        support.extend(order[:k_shot].tolist())
        rest = order[k_shot:]
        query.extend((rest if n_query is None else rest[:n_query]).tolist())

    def rows(ps: list[int]) -> np.ndarray:
        return np.sort(np.concatenate([table.rows[p] for p in ps]))

    return Episode(
        classes=tuple(int(c) for c in classes),
        support_patients=tuple(table.patients[p] for p in support),
        query_patients=tuple(table.patients[p] for p in query),
        support_rows=rows(support),
        query_rows=rows(query),
    )


def sample_episodes(
    table: PatientTable,
    class_names: Sequence[str],
    k_shot: int,
    n_episodes: int,
    seed: int,
    n_way: int | None = None,
    n_query: int | None = None,
) -> list[Episode]:
    """``n_episodes`` N-way ``k_shot`` episodes drawn by patient, reproducible for a seed.

    Each episode picks ``n_way`` classes (default: all), then ``k_shot`` support patients per
    class and as query the remaining patients of those classes (or ``n_query`` per class).
    The generator is seeded by ``(seed, k_shot)``, so the episodes of one k do not depend on
    which other k are evaluated.

    Raises:
        ConfigError: a class has too few patients for ``k_shot`` (see :func:`check_shots`).
    """
    check_shots(table, class_names, k_shot, n_way, n_query)
    n_classes = len(class_names)
    way = n_classes if n_way is None else n_way
    rng = np.random.default_rng([int(seed), int(k_shot)])
    episodes = []
    for _ in range(n_episodes):
        classes = np.arange(n_classes)
        if way < n_classes:
            classes = np.sort(rng.choice(n_classes, size=way, replace=False))
        episodes.append(_draw(table, classes, k_shot, n_query, rng))
    return episodes
