"""C: the controller's model (``model``) and the CMA-ES that searches its parameters
against any ``Fitness`` (``cmaes``), with C's checkpoints and their loaders. The C stage,
which scores C with the agent's rollouts, is ``wmlab.pipeline.controller_stage``."""

from wmlab.controller.cmaes import (
    BEST_WEIGHTS,
    MEAN_WEIGHTS,
    EsResult,
    Fitness,
    finished_generations,
    load_controller_params,
    load_snapshots,
    run_es,
)
from wmlab.controller.model import (
    ControllerShape,
    check_shape,
    controller_shape,
    feature_size,
    population_forward,
    shape_info,
)

__all__ = ["BEST_WEIGHTS", "MEAN_WEIGHTS", "ControllerShape", "EsResult", "Fitness",
           "check_shape", "controller_shape", "feature_size", "finished_generations",
           "load_controller_params", "load_snapshots", "population_forward", "run_es",
           "shape_info"]
