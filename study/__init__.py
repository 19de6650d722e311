"""The science: task families, models, estimators, training, evaluation and theory (no Ray)."""
