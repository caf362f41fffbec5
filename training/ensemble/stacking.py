"""Stage 5: soft vote and a stacked meta-learner over the level-1 models' OOF probabilities.

The meta-learner's OOF predictions for fold k come from a logistic regression fit on the other
folds' OOF rows only, so its reported score is cross-validated like every other model's.
The served meta-learner is refit on every row but the calibration lesions.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegressionCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def make_meta_learner(fold: np.ndarray):
    """Standardised log-probabilities -> multinomial logistic regression. The regularisation
    strength is chosen by log loss over the given rows' own folds (nested, lesion-grouped)."""
    splits = [(np.flatnonzero(fold != g), np.flatnonzero(fold == g)) for g in np.unique(fold)]
    lr = LogisticRegressionCV(
        Cs=[1e-4, 3e-4, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
        cv=splits,
        scoring="neg_log_loss",
        class_weight="balanced",
        max_iter=5000,
        l1_ratios=(0.0,),
        use_legacy_attributes=False,
    )
    return make_pipeline(StandardScaler(), lr)
