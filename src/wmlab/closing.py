"""``with`` support for the objects that hold processes, files or envs and free them in
``close()``: one mixin, so that leaving a block always frees them the same way."""

from __future__ import annotations

from typing import Self


class Closing:
    """Mixin: ``with obj:`` returns ``obj`` and calls ``obj.close()`` on the way out, also
    when the block raises."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
