"""Loading configs from the `--config` string form ("configs/x.py:arg") and validating them."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import ml_collections

from configs import common

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load "path/to/config.py[:arg]" (relative to the working directory or the repo root)."""
    path_str, _, arg = spec.partition(":")
    path = pathlib.Path(path_str)
    if not path.exists() and (REPO / path).exists():
        path = REPO / path
    if not path.exists():
        raise FileNotFoundError(f"config file {path_str} not found")
    module_spec = importlib.util.spec_from_file_location(f"_rankseg_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def resolve(config: ml_collections.ConfigDict | str) -> ml_collections.ConfigDict:
    """A validated config from a ConfigDict or a `--config` string."""
    if isinstance(config, str):
        config = load_config(config)
    common.validate(config)
    return config
