"""Where the model-side packages meet: the backbone (``models``) with its memory branch (``memory``),
and Engram's tokenizer names resolved with ``data_prep``. Everything that builds a model goes through
:func:`build_model`; nothing below this package imports it."""
from assembly.model import build_model, engram_tokenizer_file

__all__ = ["build_model", "engram_tokenizer_file"]
