"""Exceptions of ffnskip_gguf. Every bad model file raises a ModelFileError
(a ValueError); the missing-file and directory cases are also the matching
OSError subclasses, so ``except FileNotFoundError`` keeps working."""


class ModelFileError(ValueError):
    """The model path does not name a loadable GGUF file (message says why)."""


class ModelNotFoundError(ModelFileError, FileNotFoundError):
    """The model path does not exist."""


class ModelIsDirectoryError(ModelFileError, IsADirectoryError):
    """The model path is a directory, not a GGUF file."""


class MetadataError(ModelFileError):
    """An ``ffn_skip.*`` metadata key has a wrong type or an out-of-range value;
    the message names the key."""
