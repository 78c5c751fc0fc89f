"""Numpy and torch only: top-N selection, hybrid scoring, ranking metrics, the text encoder and tower."""
