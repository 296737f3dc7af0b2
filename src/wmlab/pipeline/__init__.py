"""A run's pipeline: a generic stage engine (``engine``) and the stages of World Models
(``stages``), with ``Pipeline`` running them over one run directory."""

from wmlab.pipeline.engine import Engine, Prior, Stage, StageResult, config_slice
from wmlab.pipeline.stages import (
    Pipeline,
    default_stages,
    describe_results,
    iteration_config,
    shadowed_by_later,
)

__all__ = ["Engine", "Pipeline", "Prior", "Stage", "StageResult", "config_slice",
           "default_stages", "describe_results", "iteration_config", "shadowed_by_later"]
