"""Episodes on disk or any fsspec URL: writing, verifying, streaming frames and series."""

from wmlab.data.episode_file import Episode, EpisodeReader, encode_episode
from wmlab.data.store import EpisodeStore, VerifyReport, episode_name, format_info

__all__ = ["Episode", "EpisodeReader", "EpisodeStore", "VerifyReport", "encode_episode",
           "episode_name", "format_info"]
