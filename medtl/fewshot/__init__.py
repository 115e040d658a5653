"""Few-shot learning from a handful of labelled patients, on cached backbone embeddings.

``episodes`` (patient-level N-way K-shot sampler), ``classifiers`` (prototype and regularised
logistic heads, both a cosine head of the model), ``evaluate`` (episodic means with CIs),
``embed`` (manifest -> cached embeddings per backbone variant), ``fit`` and ``job`` (the
`medtl fewshot` job: episodic evaluation, or fit on support / score query / save a bundle).
"""

from medtl.fewshot.classifiers import CLASSIFIERS, CosineHead, get_classifier
from medtl.fewshot.episodes import Episode, PatientTable, patient_table, sample_episodes
from medtl.fewshot.evaluate import EpisodicResult, MeanCI, evaluate_episodes, mean_ci
from medtl.fewshot.job import (
    EpisodicOutcome,
    FitOutcome,
    fewshot_config,
    run_fewshot_episodes,
    run_fewshot_fit,
)

__all__ = [
    "CLASSIFIERS",
    "CosineHead",
    "Episode",
    "EpisodicOutcome",
    "EpisodicResult",
    "FitOutcome",
    "MeanCI",
    "PatientTable",
    "evaluate_episodes",
    "fewshot_config",
    "get_classifier",
    "mean_ci",
    "patient_table",
    "run_fewshot_episodes",
    "run_fewshot_fit",
    "sample_episodes",
]
