"""The pinned llama-cpp-python release whose vendored llama.cpp we patch.

Keep in step with ``cmake/pin.cmake`` and ``pyproject.toml`` (``tests/test_wiring.py``
checks that the three agree).
"""

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
