"""minicd: post-train small LLMs into ICD medical coders (prompting -> SFT -> GRPO -> PHI)."""

from minicd.errors import CheckpointError, ConfigError, DataError, DistributedError, MinicdError

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DistributedError",
    "MinicdError",
    "__version__",
]
