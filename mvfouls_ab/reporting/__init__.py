"""Reporting: every plotly figure once (figures.py) and the self-contained HTML reports (report.py)."""
