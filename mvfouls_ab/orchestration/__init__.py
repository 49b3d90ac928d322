"""Orchestration: what runs many trainings and keeps their state in an Optuna RDB storage.

storage.py  the one storage factory (URL checks, heartbeats, connection settings) and the default storage URL
workers.py  the one launcher of worker processes (the study's --workers N, the A/B runner's --workers N)
The study (study.py), the A/B runner (abtest.py) and the ranking sit on top of these; the MLflow parent runs they
share are made by tracking.runs (one claim protocol).
"""
