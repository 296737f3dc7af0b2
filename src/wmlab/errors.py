"""The one exception type users see.

Every problem a user can fix (bad config, unknown env, corrupt file, empty dataset...)
is raised as a ``WmlabError`` whose message names the problem and the fix; the CLI prints
it as a single line and exits non-zero instead of showing a traceback.
"""


class WmlabError(Exception):
    """A problem with the user's input or data, explained in one line."""


class ConfigError(WmlabError):
    """A preset, config file or ``--set`` override is invalid."""


class UnknownEnvError(WmlabError):
    """An environment name that wmlab cannot make."""


class StoreError(WmlabError):
    """An episode store or episode file that is missing, empty, corrupt or mismatched."""
