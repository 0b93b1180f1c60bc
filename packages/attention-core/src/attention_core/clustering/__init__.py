"""Clustering algorithms used to group queries (see :mod:`attention_core.clustering.hamming`)."""
