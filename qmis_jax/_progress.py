"""A progress bar for long studies (tqdm), or one that shows nothing."""

from __future__ import annotations


class _NullBar:
    def set_description(self, *_):
        pass

    def set_postfix_str(self, *_):
        pass

    def update(self, *_):
        pass

    def close(self):
        pass


def progress_bar(total: int, enabled: bool):
    """A tqdm bar over ``total`` points, or a silent stand-in when ``enabled`` is False."""
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="point", dynamic_ncols=True)
