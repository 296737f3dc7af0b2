"""wmlab: World Models (Ha & Schmidhuber 2018) as real software."""

from wmlab.errors import WmlabError

__version__ = "0.1.0"

__all__ = ["WmlabError", "__version__"]
