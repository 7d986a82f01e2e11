"""Every named error cogvlm raises, under one base.

`CogVLMError` is what a user of the API catches, and what the CLI turns into one line and exit
code 2 (`cogvlm.cli.main`). Each error also keeps the built-in base it always had (`ValueError`,
`RuntimeError`, `OSError`), so code that caught those before still does. This module imports
nothing, so a data reader can raise a `UsageError` without sitting above the model.
"""

from __future__ import annotations


class CogVLMError(Exception):
    """Base of every named cogvlm error: the message says what went wrong and how to fix it."""


class UsageError(CogVLMError, ValueError):
    """A flag value, option or file the user can fix: one line on stderr and exit code 2."""


class ConfigError(CogVLMError, ValueError):
    """A config file or model name that cannot describe a CogVLM model."""


class CheckpointError(CogVLMError, ValueError):
    """A checkpoint that cannot be found or does not fit the model; the message says how to fix it."""


class Bnb4bitError(CogVLMError, ValueError):
    """A bitsandbytes tensor this reader does not handle (double quantization, 8-bit)."""


class QuantError(CogVLMError, ValueError):
    """A quantization request the kernels cannot serve (bits, group size)."""


class TokenizerError(CogVLMError, ValueError):
    """A tokenizer that cannot be found or does not fit the model."""


class ImageError(CogVLMError, ValueError):
    """An image that cannot be read; the message says which and why."""


class ImageTooLargeError(ImageError):
    """An image file or bitmap over a size limit; the message names the limit (and its flag)."""


class ImageRequiredError(CogVLMError, ValueError):
    """CogAgent has no text-only mode: its cross-attention needs an image (docs/models.md)."""


class ContextLengthError(CogVLMError, ValueError):
    """The prompt leaves no room to generate within `max_length`."""


class PlanError(CogVLMError, ValueError):
    """The model does not fit the memory given; the message names a split or quantization that does."""


class TensorParallelError(CogVLMError, RuntimeError):
    """The ranks could not start, or one of them stopped: the message says which and why."""


class KernelBuildError(CogVLMError, RuntimeError):
    """Our CPU kernels could not be built (another process has held the build for too long):
    logged, and PyTorch's kernels are used instead."""


class TrainingError(CogVLMError, ValueError):
    """A fine-tuning request the user can fix (flags, data): the CLI prints it as one line."""


class ShardError(CogVLMError):
    """A shard that cannot be read as a whole (not a tar or Parquet file, cut short): it is
    reported and left unwritten, so a rerun tries it again; the other shards go on."""


class WriteError(CogVLMError, OSError):
    """A result file could not be written (a read-only folder, a full disk): the user's to fix."""


class GenerationError(CogVLMError, RuntimeError):
    """The engine failed for this request (the server log has the traceback)."""


class VideoError(CogVLMError, ValueError):
    """A video that cannot be read or used (a clip of the wrong shape, a video for a model that
    takes none, a video with an image); the message says which and why."""
