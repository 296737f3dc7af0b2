"""Episodes on disk or any fsspec URL: writing, verifying, streaming frames and series.

``episode_file`` is the one-file-per-episode format (``.wmep``), ``store`` the folder of
episodes collection writes and training reads, ``sampling`` the shuffled frame batches.
"""

from wmlab.data.episode_file import (
    Episode,
    EpisodeFileError,
    EpisodeReader,
    decode_episode,
    encode_episode,
    read_chunk,
    read_episode,
    read_meta,
    verify_file,
    write_episode,
)
from wmlab.data.store import (
    EpisodeStore,
    StoreManifest,
    VerifyReport,
    episode_id,
    format_info,
    parse_episode_id,
)

__all__ = ["Episode", "EpisodeFileError", "EpisodeReader", "EpisodeStore", "StoreManifest",
           "VerifyReport", "decode_episode", "encode_episode", "episode_id", "format_info",
           "parse_episode_id", "read_chunk", "read_episode", "read_meta", "verify_file",
           "write_episode"]
