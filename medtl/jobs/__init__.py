"""The jobs medtl runs, each as named stages: ``run_train`` is `medtl train`.

Stages, in data-flow order (each module one stage; see docs/architecture.md):
prepare (manifest -> records -> splits -> cache) -> folds (one fold in, one result out)
-> pooling (out-of-fold table, thresholds) -> refit -> outputs (report, bundle) -> tracking.
"""

from medtl.jobs.summary import print_train_summary
from medtl.jobs.train import TrainOutcome, default_run_dir, run_train

__all__ = ["TrainOutcome", "default_run_dir", "print_train_summary", "run_train"]
