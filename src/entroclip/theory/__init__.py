"""Tabular softmax theory lab."""
