"""Orchestration: what runs many trainings, keeps their state in an Optuna RDB storage and ranks them.

storage.py       the one storage factory (URL checks, heartbeats, connection settings) and the default URL
workers.py       the one launcher of worker processes (the study's and the A/B runner's --workers N)
search_space.py  the study's search space (experiments/search_space.yaml is the default)
study.py         the Optuna study: a trial = a TrainingConfig, a Trainer run, an MLflow child run
train.py         one training run from a config (python -m mvfouls_ab.train), logged like a trial
ranking.py       the leaderboard against the targets (evaluation/targets.py)
ab.py, stats.py  A/B experiments (arms x seeds x folds as cells) and their paired statistics
The MLflow parent runs several workers may create at once are claimed with tracking.claim_run (one protocol).
"""
