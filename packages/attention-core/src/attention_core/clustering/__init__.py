"""Clustering algorithms used to group queries (see `attention_core.clustering.hamming`)."""
