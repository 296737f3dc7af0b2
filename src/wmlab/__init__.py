"""wmlab: World Models (Ha & Schmidhuber 2018) as real software.

The public API, for notebooks and your own code (``docs/api.md``):

>>> import wmlab
>>> cfg = wmlab.load_config("doom", "quick", ["run.root=runs"])
>>> results = wmlab.Pipeline(cfg).run()          # collect -> V -> M -> C -> evaluate -> report
>>> agent = wmlab.Agent.load("doom")             # a shipped agent, or a run directory
>>> env = wmlab.make_env("doom")
>>> frame, _ = env.reset(seed=7)
>>> agent.reset(seed=7)
>>> action = agent.act(frame)
>>> dreams = wmlab.DreamEnv.load("doom", num_envs=16)  # M's dream as a Gymnasium vector env
>>> wmlab.available_pretrained()
['carracing', 'doom']
"""

from importlib import import_module
from typing import Any

from wmlab.errors import WmlabError
from wmlab.version import __version__

# name -> (module, attribute). Loaded on first use, so `import wmlab` (and every `wmlab`
# command, --help included) does not import torch until something needs it.
_PUBLIC = {
    "load_config": ("wmlab.config", "load_config"),
    "Config": ("wmlab.config", "Config"),
    "Pipeline": ("wmlab.pipeline", "Pipeline"),
    "Agent": ("wmlab.agent", "Agent"),
    "DreamEnv": ("wmlab.dream", "DreamEnv"),
    "DreamSettings": ("wmlab.dream", "DreamSettings"),
    "make_env": ("wmlab.envs", "make"),
    "available_pretrained": ("wmlab.shipped", "available"),
}

__all__ = ["WmlabError", "__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'wmlab' has no attribute {name!r}")
    module, attribute = _PUBLIC[name]
    return getattr(import_module(module), attribute)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
