"""Offline evaluation: refits on a temporal split, ranking, tuning, the evaluate stage, its report and charts."""
