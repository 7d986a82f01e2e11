"""cogvlm: a fast, faithful runtime for the CogVLM family of visual language models."""

from .api import ChatSession, CogVLM
from .checkpoint import CheckpointError, load_model
from .generate import ContextLengthError, SamplingParams
from .image import ImageError
from .prompt import ImageRequiredError

__all__ = ["ChatSession", "CheckpointError", "CogVLM", "ContextLengthError", "ImageError", "ImageRequiredError",
           "SamplingParams", "load_model"]
__version__ = "0.1.0"
