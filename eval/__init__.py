"""Evaluation for sequential knowledge editing: data loaders, scoring, metrics and probes (import submodules directly)."""
