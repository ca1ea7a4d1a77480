"""Clusters: the pure side (store contract, timings, node states, placement, HA rules)."""
