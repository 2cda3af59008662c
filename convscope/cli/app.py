"""The CLI's former root, kept so that ``convscope.cli.app:main`` entry points and ``from
convscope.cli.app import app`` keep working. The app is built in ``convscope.cli.main``; the shared
helpers live in ``convscope.cli.common``. Nothing inside convscope imports this module.
"""

from __future__ import annotations

from convscope.cli.common import (
    bundled_photo,
    expand_images,
    layer_record,
    layer_records,
    load_good_images,
    open_model,
    reflow_help,
    split_layers,
)
from convscope.cli.info_cmd import summary_json
from convscope.cli.main import app, main

__all__ = [
    "app", "bundled_photo", "expand_images", "layer_record", "layer_records", "load_good_images", "main",
    "open_model", "reflow_help", "split_layers", "summary_json",
]
