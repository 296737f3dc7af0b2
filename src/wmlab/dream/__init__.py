"""M's dream: B dreams stepped as one tensor program (``batched``), the rules a dream runs
by (``settings``), several Ms dreaming together (``ensemble``), the Gymnasium vector-env
face of it (``env``), the reference policies and the dream side of M's calibration
(``reference``, ``calibration``), and the pictures: GIFs decoded by V (``pictures``,
``gallery``). The playable dream is ``wmlab.play``'s."""

from wmlab.dream.batched import BatchedDream, DreamStart
from wmlab.dream.ensemble import EnsembleDream
from wmlab.dream.env import DreamEnv
from wmlab.dream.reference import action_converter, dream_calibration, reference_policy
from wmlab.dream.settings import DreamSettings

__all__ = ["BatchedDream", "DreamSettings", "DreamStart", "DreamEnv",
           "EnsembleDream", "action_converter", "dream_calibration", "reference_policy"]
