"""Offline evaluation: refits on temporal splits, ranking, tuning, the evaluate stage and its report.

In reading order: `refit` (a protocol's split, its models fitted), `ranking` (views and per-user
metrics), `tuning` and `validation` (choices made on validation splits), `evaluate` (the stage);
`report`, `report_html`, `charts`, `screenshot` (results and the HTML report); `explore` and
`data_quality` (the notebooks' views).
"""
