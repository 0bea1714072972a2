"""Provisioning pipelines: the chains of stages a user travels, as data plus their evaluation."""
