"""cogvlm: a fast, faithful runtime for the CogVLM family of visual language models."""

from .api import ChatSession, CogVLM
from .checkpoint import load_model
from .errors import (CheckpointError, CogVLMError, ContextLengthError, ImageError, ImageRequiredError, TokenizerError,
                     UsageError)
from .generate import SamplingParams
from .options import LoadOptions

__all__ = ["ChatSession", "CheckpointError", "CogVLM", "CogVLMError", "ContextLengthError", "ImageError",
           "ImageRequiredError", "LoadOptions", "SamplingParams", "TokenizerError", "UsageError", "load_model"]
__version__ = "0.1.0"
