"""
Before the first iteration: a report of a config's datasets against the config (imbalance, object
sizes against the anchors, the classes, the schedule) with the overrides it suggests.
``tools/analyze_data.py`` prints and saves it; train_net.py logs :func:`preflight_summary`.
"""
from .report import load_datasets, preflight_report, preflight_summary, render_report

__all__ = ["load_datasets", "preflight_report", "preflight_summary", "render_report"]
