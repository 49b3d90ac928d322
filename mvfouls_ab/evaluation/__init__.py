"""Evaluation: how a model's predictions are scored (knows no training).

official.py  the official SoccerNet MVFouls metric, per-class reports, the official prediction-file writer
metrics.py   DetailedMetrics per epoch and the metric-name scheme ({split}/{task}/{metric}) MLflow reads
targets.py   the design's targets, the only copy
predict.py   official prediction files (and the challenge zip) from a logged model
"""
