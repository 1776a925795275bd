"""Split GGUFs (``*-00001-of-0000N.gguf``, issue 13 D7): ``inspect`` reads
the whole shard set (size, FFN share) and names a missing shard;
``calibrate`` refuses before any work instead of writing a file that does
not load."""

from __future__ import annotations

import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from ffnskip_gguf import Llama
from ffnskip_gguf.bench import ffn_byte_share
from ffnskip_gguf.calibrate import CalibrationError, calibrate
from ffnskip_gguf.cli import main as cli_main
from ffnskip_gguf.errors import ModelFileError
from ffnskip_gguf.inspection import inspect_model


@pytest.fixture(scope="module")
def split_model(smollm2_path, tmp_path_factory):
    """SmolLM2 written by gguf-py with split_max_tensors=100 (3 shards)."""
    d = tmp_path_factory.mktemp("split")
    r = GGUFReader(smollm2_path)
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(str(d / "smol.gguf"), arch=arch, split_max_tensors=100)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        t = f.types[0]
        w.add_key_value(f.name, f.contents(), t, sub_type=f.types[-1] if t == GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    shards = sorted(d.glob("smol-*-of-*.gguf"))
    assert len(shards) == 3, shards
    return shards


def test_a_split_model_loads_and_inspects_as_a_whole(split_model, smollm2_path, capsys):
    llm = Llama(str(split_model[0]), n_ctx=64, verbose=False)
    llm.close()
    ins = inspect_model(split_model[0])
    assert ins.shards == 3
    assert ins.size == sum(p.stat().st_size for p in split_model)
    assert ins.ffn_share == pytest.approx(ffn_byte_share(smollm2_path))  # 51.5%, not the first shard's share
    assert cli_main(["inspect", str(split_model[1])]) == 0  # any shard names the set
    assert "3 shards" in capsys.readouterr().out


def test_a_missing_shard_is_named(split_model, tmp_path):
    import shutil

    for p in split_model[:2]:
        shutil.copy(p, tmp_path / p.name)
    with pytest.raises(ModelFileError, match=f"shard {split_model[2].name} .* missing"):
        inspect_model(tmp_path / split_model[0].name)


def test_calibrate_refuses_a_split_model_before_any_work(split_model, tmp_path):
    with pytest.raises(CalibrationError, match="split GGUF .*3 shards.*merge"):
        calibrate(str(split_model[0]), tmp_path / "out.gguf", target_skip=0.1, progress=False)
    assert not (tmp_path / "out.gguf").exists()
