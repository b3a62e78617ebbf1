"""Neuron Warehouse: an out-of-core activation warehouse for MLP neurons of language models."""

__version__ = "0.1.0"
