"""pymerge: a model-merging engine (mergekit-compatible configs, native kernels, bounded memory).

``pymerge.merge(config, out_dir)`` merges checkpoints on disk; ``pymerge.ops`` merges tensors in memory;
``pymerge.search`` searches merge parameters under a user evaluator; ``pymerge.masks`` builds and applies
per-task masks.
The package works without its compiled extension (``pymerge._C``); native backends then say why at call time.
"""

__version__ = "0.1.0"

from .api import MergeReport, merge, verify  # noqa: E402
from .errors import BackendUnavailable, CheckpointError, ConfigError, MergeError, PymergeError  # noqa: E402
from . import masks, search  # noqa: E402

__all__ = ["merge", "verify", "MergeReport", "PymergeError", "CheckpointError", "ConfigError", "MergeError",
           "BackendUnavailable", "masks", "search", "__version__"]
