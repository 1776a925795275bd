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


def _with_kv(src, dst, **kv):
    from gguf import GGUFValueType

    from ffnskip_gguf.gguf_io import copy_gguf

    return str(copy_gguf(src, dst, set_kv=kv))


@pytest.mark.parametrize("value,vtype", [(600, "UINT32"), (0, "UINT32"), (2**32 - 1, "UINT32"), (30.0, "FLOAT32")])
def test_block_count_out_of_range_or_mistyped_is_a_clear_error(tmp_path, smollm2_path, value, vtype):
    # llama.cpp aborts the process on more than 512 layers: checked before the native load
    from gguf import GGUFValueType

    p = _with_kv(smollm2_path, tmp_path / "bc.gguf", **{"llama.block_count": (value, GGUFValueType[vtype], None)})
    with pytest.raises(ModelFileError, match="llama.block_count"):
        Llama(p, verbose=False)


def test_negative_rms_epsilon_is_a_clear_error(tmp_path, smollm2_path):
    # ggml asserts eps >= 0 at the first decode
    from gguf import GGUFValueType

    p = _with_kv(smollm2_path, tmp_path / "eps.gguf",
                 **{"llama.attention.layer_norm_rms_epsilon": (-1e-5, GGUFValueType.FLOAT32, None)})
    with pytest.raises(ModelFileError, match="layer_norm_rms_epsilon"):
        Llama(p, verbose=False)


def test_misspelled_ffn_keyword_is_rejected(smollm2_path):
    with pytest.raises(ValueError, match="ffn_skip_treshold"):
        Llama(smollm2_path, verbose=False, ffn_skip=True, ffn_skip_treshold=0.1)


@pytest.mark.parametrize("bad", [10**400, [10**400] * 30, ["0.9"] * 30, [True] * 30, {i: 0.9 for i in range(30)}])
def test_threshold_of_wrong_kind_names_the_argument(smollm2_path, bad):
    with pytest.raises(ValueError, match="ffn_skip_threshold"):
        Llama(smollm2_path, verbose=False, ffn_skip=True, ffn_skip_threshold=bad)


def test_file_cold_regions_overlapping_name_the_keys(tmp_path, smollm2_path):
    from gguf import GGUFValueType

    from ffnskip_gguf.errors import MetadataError

    p = _with_kv(smollm2_path, tmp_path / "cold.gguf",
                 **{"ffn_skip.cold_start": (20, GGUFValueType.UINT32, None),
                    "ffn_skip.cold_end": (20, GGUFValueType.UINT32, None)})
    with pytest.raises(MetadataError, match="ffn_skip.cold_start=20 \\+ ffn_skip.cold_end=20"):
        Llama(p, verbose=False, ffn_skip=True)
    # ffn_skip=False means dense, whatever the file carries
    llm = Llama(p, n_ctx=64, verbose=False)
    with pytest.raises(MetadataError):
        llm.set_ffn_skip(True)


def test_runner_rejects_use_after_close_and_bad_token_ids(smollm2_path):
    from ffnskip_gguf.runner import Runner

    r = Runner(smollm2_path, n_threads=2)
    with pytest.raises(ValueError, match="token id"):
        r.token_text(10**6)
    with pytest.raises(ValueError, match="token id"):
        r.decode([(2**32 + 1, 0, 0, True)])
    r.close()
    with pytest.raises(RuntimeError, match="closed"):
        r.decode([(1, 0, 0, True)])
    with pytest.raises(RuntimeError, match="closed"):
        r.tokenize("hi")
