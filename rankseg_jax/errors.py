"""The exceptions that mean "the user's input is wrong" (shown as one line, exit status 2)."""

from __future__ import annotations

from configs.common import ConfigError
from rankseg_jax.checkpoint import CheckpointNotFoundError
from rankseg_jax.convert.loading import CheckpointFormatError
from rankseg_jax.convert.mmseg import CheckpointMismatchError
from rankseg_jax.convert.torch_pickle import CheckpointError
from rankseg_jax.data.base import DatasetError
from rankseg_jax.data.pipeline import CorruptRecordError, DataStateError
from rankseg_jax.distributed import DistributedError
from rankseg_jax.download import DownloadError
from rankseg_jax.provenance import ResumeMismatchError
from rankseg_jax.sharding import MeshError

USER_ERRORS = (
    ConfigError,
    CheckpointNotFoundError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointError,
    DatasetError,
    CorruptRecordError,
    DataStateError,
    ResumeMismatchError,
    MeshError,
    DownloadError,
    DistributedError,
    FileNotFoundError,
)
