"""Bad model paths and files raise a clear Python exception, never a crash."""

import shutil

import pytest

from ffnskip_gguf import Llama, ModelFileError
from ffnskip_gguf.errors import ModelIsDirectoryError, ModelNotFoundError


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model file not found") as e:
        Llama(str(tmp_path / "nope.gguf"), verbose=False)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)


def test_directory(tmp_path):
    with pytest.raises(ModelIsDirectoryError, match="is a directory"):
        Llama(str(tmp_path), verbose=False)


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("hello, this is not a model\n" * 10)
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        Llama(str(p), verbose=False)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        Llama(str(p), verbose=False)


@pytest.mark.parametrize("keep", [10, 4096, 1_000_000, -1000])
def test_truncated_gguf(tmp_path, smollm2_path, keep):
    data = open(smollm2_path, "rb").read()
    cut = data[:keep] if keep > 0 else data[:keep]
    p = tmp_path / "truncated.gguf"
    p.write_bytes(cut)
    with pytest.raises(ModelFileError, match="truncated|malformed"):
        Llama(str(p), verbose=False)


def test_valid_copy_still_loads(tmp_path, smollm2_path):
    # the checks above do not reject good files
    p = tmp_path / "copy.gguf"
    shutil.copy(smollm2_path, p)
    llm = Llama(str(p), n_ctx=64, verbose=False)
    assert llm.n_vocab() > 1000
