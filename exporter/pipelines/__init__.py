"""Provisioning pipelines: the chains of stages a user travels, as data plus their evaluation.

``definitions`` holds the names (stages, reasons, actions); ``hybrid`` and ``cloud`` evaluate their
chain over the source tables; ``evaluation`` holds what both share; ``explain`` describes one user.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from exporter.pipelines.evaluation import Pipeline


def implementation(name: str) -> Pipeline:
    """The evaluator of a pipeline by its name (``hybrid_mdm`` or ``cloud``)."""
    from exporter.pipelines.cloud import CloudPipeline
    from exporter.pipelines.hybrid import HybridMdmPipeline

    implementations: dict[str, Pipeline] = {"hybrid_mdm": HybridMdmPipeline(), "cloud": CloudPipeline()}
    return implementations[name]
