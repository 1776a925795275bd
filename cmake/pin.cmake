# The pinned llama.cpp: the vendor/llama.cpp tree of this llama-cpp-python sdist.
# Keep in step with python/ffnskip_gguf/_pin.py and pyproject.toml (a test checks).
set(FFNSKIP_LLAMA_CPP_PYTHON_VERSION "0.3.36")
set(FFNSKIP_SDIST_NAME "llama_cpp_python-${FFNSKIP_LLAMA_CPP_PYTHON_VERSION}.tar.gz")
set(FFNSKIP_SDIST_SHA256 "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
