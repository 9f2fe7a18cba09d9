"""Settings for ``bench/floor_bench.py``: the app's own, with three bench-only views added
to its URLs (``floor_urls``). Never used outside that benchmark."""

from ragsite.settings import *  # noqa: F403

ROOT_URLCONF = "floor_urls"
