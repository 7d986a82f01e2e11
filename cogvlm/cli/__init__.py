"""The `cogvlm` command: one module per verb above the engine, importing down only.

main.py parses and dispatches, and turns any `CogVLMError` into one line and exit code 2;
flags.py holds the model and sampling flags every verb shares and turns them into `LoadOptions`.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
