"""The MLflow pyfunc flavour of a medtl bundle (kept apart so prediction never imports MLflow)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from medtl.bundle import load_bundle
from medtl.inference import predict
from medtl.tracking.store import import_mlflow

if TYPE_CHECKING:
    from mlflow.pyfunc import PythonModel
else:  # mlflow is imported only through import_mlflow (offline environment first)
    PythonModel = import_mlflow().pyfunc.PythonModel


class MedtlPyfunc(PythonModel):
    """MLflow pyfunc over a medtl bundle: DataFrame with ``image`` paths -> probabilities.

    Logged "from code" (see ``medtl.tracking.runs``), so nothing is pickled; the bundle is
    the ``bundle`` artifact and is loaded from safetensors.
    """

    def load_context(self, context: Any) -> None:
        self.bundle = load_bundle(context.artifacts["bundle"])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        return predict(self.bundle, model_input)
