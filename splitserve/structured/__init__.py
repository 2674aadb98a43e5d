"""Structured outputs and tool calls: grammar specs (gateway), compiled matchers (workers), tool-call parsers.

`spec` and `validate` never import torch; `matcher` runs in the engine's process.
"""
