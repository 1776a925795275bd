"""Import wiring: llama_cpp runs on our patched library, pins agree, wrong
orders and versions fail with a clear ImportError."""

import re
import subprocess
import sys
from pathlib import Path

import llama_cpp

import ffnskip_gguf
from ffnskip_gguf import _lib

ROOT = Path(__file__).resolve().parents[1]


def test_llama_cpp_loads_the_patched_library():
    loaded = Path(llama_cpp.llama_cpp._lib._name).resolve()
    assert loaded.parent == ffnskip_gguf.LIB_DIR
    assert _lib.ffnskip_api_version() == _lib.FFNSKIP_API_VERSION


def test_pins_agree_between_cmake_python_and_pyproject():
    cmake = (ROOT / "cmake" / "pin.cmake").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    pin = ffnskip_gguf.LLAMA_CPP_PYTHON_VERSION
    assert f'set(FFNSKIP_LLAMA_CPP_PYTHON_VERSION "{pin}")' in cmake
    assert f'"llama-cpp-python[server]=={pin}"' in pyproject
    assert llama_cpp.__version__ == pin
    assert _lib.ffnskip_llama_cpp_pin().decode() == pin


def test_llama_is_a_llama_cpp_subclass():
    assert issubclass(ffnskip_gguf.Llama, llama_cpp.Llama)


def _run(code: str, env_extra=None):
    import os

    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_after_llama_cpp_with_another_library_fails_clearly(stock_lib_dir):
    r = _run("import llama_cpp\nimport ffnskip_gguf", {"LLAMA_CPP_LIB_PATH": str(stock_lib_dir)})
    assert r.returncode != 0
    assert "ImportError" in r.stderr
    assert "imported before ffnskip_gguf" in r.stderr


def test_import_after_llama_cpp_with_our_library_works():
    r = _run("import llama_cpp\nimport ffnskip_gguf\nprint('ok')",
             {"LLAMA_CPP_LIB_PATH": str(ffnskip_gguf.LIB_DIR)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_wrong_llama_cpp_python_version_fails_clearly():
    code = (
        "import importlib.metadata as m\n"
        "orig = m.version\n"
        "m.version = lambda n: '0.3.1' if n.replace('-', '_') == 'llama_cpp_python' else orig(n)\n"
        "import ffnskip_gguf\n"
    )
    r = _run(code)
    assert r.returncode != 0
    assert re.search(r"ImportError: .*llama-cpp-python==0\.3\.36 but 0\.3\.1 is installed", r.stderr), r.stderr
