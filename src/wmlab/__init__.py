"""wmlab: World Models (Ha & Schmidhuber 2018) as real software."""

from wmlab.errors import WmlabError
from wmlab.version import __version__

__all__ = ["WmlabError", "__version__"]
