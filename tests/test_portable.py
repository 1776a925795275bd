"""Portable builds (issue 15 B; docs/PORTABLE.md).

- The portable wheel (``scripts/build-wheel.sh``) installs with ``--no-index``
  into a fresh virtual environment whose PATH has no compiler or cmake, and
  ``ffnskip-gguf generate`` runs SmolLM2 with the gate on.
- It loads the CPU variant ggml scores best here, and the gate is exact
  (forced skips == zeroed ffn_down == static removal, never-fire == dense,
  decisions == the Python state machine, MoE blocks) on every variant this
  CPU runs: the existing tests, run once per variant (``FFNSKIP_CPU_VARIANT``).
- Under ``qemu-x86_64 -cpu Nehalem`` (SSE4.2, no AVX) a native build raises a
  clear ImportError instead of SIGILL, and the portable wheel generates.

Inputs: ``FFNSKIP_WHEELHOUSE`` (OUTDIR of build-wheel.sh with
FFNSKIP_WHEEL_DEPS=1), or ``FFNSKIP_PORTABLE_LIB`` (the lib folder of a
portable build, for the variant tests only). Without them the tests skip;
``FFNSKIP_REQUIRE_PORTABLE=1`` (CI) makes a skip a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import ffnskip_gguf
from ffnskip_gguf import _cpucheck

HERE = Path(__file__).resolve().parent
REQUIRE = os.environ.get("FFNSKIP_REQUIRE_PORTABLE") == "1"
QEMU = shutil.which("qemu-x86_64")
# an x86-64 CPU model without AVX (SSE4.2, POPCNT): older than any build machine
OLD_CPU = "Nehalem"
PROMPT = "The capital of France is"


def _need(ok: bool, why: str) -> None:
    if not ok:
        if REQUIRE:
            pytest.fail(f"FFNSKIP_REQUIRE_PORTABLE=1 but {why}")
        pytest.skip(why)


def _no_compiler_path(bin_dir: Path) -> str:
    """A PATH holding only the venv's scripts; asserts no compiler is reachable."""
    path = str(bin_dir)
    for tool in ("cc", "c++", "gcc", "g++", "clang", "cmake", "ninja", "make"):
        assert shutil.which(tool, path=path) is None, f"{tool} is on the test PATH {path}"
    return path


@pytest.fixture(scope="session")
def portable_venv(tmp_path_factory):
    """A fresh venv with the portable wheel installed from FFNSKIP_WHEELHOUSE
    (``--no-index``, no compiler on PATH). Returns (python, env)."""
    house = os.environ.get("FFNSKIP_WHEELHOUSE")
    _need(bool(house) and Path(house).is_dir(), "FFNSKIP_WHEELHOUSE is not set to build-wheel.sh's OUTDIR")
    wheels = sorted(Path(house).glob("ffnskip_gguf-*.whl"))
    _need(len(wheels) == 1, f"{house} holds {len(wheels)} ffnskip_gguf wheels, expected 1")
    assert "manylinux" in wheels[0].name, f"{wheels[0].name} was not repaired by auditwheel"
    venv_dir = tmp_path_factory.mktemp("portable") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv_dir)], check=True)
    py = venv_dir / "bin" / "python"
    env = {
        "PATH": _no_compiler_path(venv_dir / "bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_CACHE_DIR": "1",
        "LANG": "C.UTF-8",
    }
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-index", "--find-links", house, "ffnskip-gguf"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"pip install --no-index failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return py, env


def _installed_lib_dir(py: Path, env: dict) -> Path:
    r = subprocess.run([str(py), "-c", "import ffnskip_gguf; print(ffnskip_gguf.LIB_DIR)"],
                       env=env, capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    return Path(r.stdout.strip())


@pytest.fixture(scope="session")
def portable_lib(request) -> Path:
    """The lib folder of a portable build: FFNSKIP_PORTABLE_LIB or the wheel's."""
    env_lib = os.environ.get("FFNSKIP_PORTABLE_LIB")
    if env_lib:
        return Path(env_lib).resolve()
    py, env = request.getfixturevalue("portable_venv")
    return _installed_lib_dir(py, env)


def _probe(py: str, env: dict, code: str, *, qemu_cpu: str | None = None, timeout: int = 600):
    cmd = [py, "-c", code]
    if qemu_cpu:
        cmd = [QEMU, "-cpu", qemu_cpu, *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/", timeout=timeout)


def test_wheel_installs_without_a_compiler_and_generates_with_the_gate(portable_venv, smollm2_path):
    py, env = portable_venv
    exe = py.parent / "ffnskip-gguf"
    # a low tau and a short warm-up so that the gate visibly skips
    r = subprocess.run([str(exe), "generate", "-m", smollm2_path, "-p", PROMPT, "-n", "24", "--ffn-skip", "on",
                        "--threshold", "0.5", "--warmup", "4", "--threads", "2"],
                       env=env, capture_output=True, text=True, cwd="/", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stdout.strip()) > len(PROMPT)
    m = re.search(r"FFN skip ratio ([0-9.]+) over (\d+) decode tokens", r.stderr)
    assert m, r.stderr[-2000:]
    assert float(m.group(1)) > 0 and int(m.group(2)) >= 20, m.group(0)
    # the installed package is the wheel's, not this checkout's
    lib = _installed_lib_dir(py, env)
    assert str(lib).startswith(str(py.parent.parent)), lib
    assert _cpucheck.read_features(lib)["build"] == "portable"


def test_portable_build_loads_the_best_variant_this_cpu_runs(portable_lib):
    env = dict(os.environ, FFNSKIP_GGUF_LIB_PATH=str(portable_lib))
    env.pop("FFNSKIP_CPU_VARIANT", None)
    r = _probe(sys.executable, env, "import json, ffnskip_gguf as f, ffnskip_gguf._backends as b; "
               "print(json.dumps([f.CPU_VARIANT, b.variant_scores(f.LIB_DIR)]))")
    assert r.returncode == 0, r.stderr
    loaded, scores = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(scores) >= 2, scores
    assert scores["x64"] > 0, "the baseline variant runs on every x86-64"
    assert scores[loaded] == max(scores.values()) > 0, (loaded, scores)
    # independent of ggml's scoring: the kernel's view of this CPU
    flags = _cpuinfo_flags()
    if "haswell" in scores:
        has_haswell = {"avx", "avx2", "fma", "f16c", "bmi2"} <= flags
        assert (scores["haswell"] > 0) == has_haswell, (scores, sorted(flags))
        if has_haswell:
            assert loaded not in ("x64", "sse42", "sandybridge"), loaded
    if "skylakex" in scores:
        has_skx = {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"} <= flags
        assert (scores["skylakex"] > 0) == has_skx, (scores, sorted(flags))


def _cpuinfo_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("flags"))
    return set(line.split(":", 1)[1].split())


def test_an_unknown_variant_is_a_clear_import_error(portable_lib):
    env = dict(os.environ, FFNSKIP_GGUF_LIB_PATH=str(portable_lib), FFNSKIP_CPU_VARIANT="pentium3")
    r = _probe(sys.executable, env, "import ffnskip_gguf")
    assert r.returncode == 1 and "ImportError" in r.stderr and "not a CPU variant of this build" in r.stderr, r.stderr


def test_a_variant_this_cpu_cannot_run_is_a_clear_import_error(portable_lib):
    unrunnable = [v for v, s in _variant_scores(portable_lib).items() if s == 0]
    if not unrunnable:
        pytest.skip("this CPU runs every variant of the build")
    env = dict(os.environ, FFNSKIP_GGUF_LIB_PATH=str(portable_lib), FFNSKIP_CPU_VARIANT=unrunnable[0])
    r = _probe(sys.executable, env, "import ffnskip_gguf")
    assert r.returncode == 1 and "this CPU cannot run that variant" in r.stderr, r.stderr


def test_a_variant_asked_of_a_build_without_variants_is_a_clear_import_error():
    if ffnskip_gguf.CPU_VARIANT is not None:
        pytest.skip("the installed build is portable")
    env = dict(os.environ, FFNSKIP_GGUF_LIB_PATH=str(ffnskip_gguf.LIB_DIR), FFNSKIP_CPU_VARIANT="haswell")
    r = _probe(sys.executable, env, "import ffnskip_gguf")
    assert r.returncode == 1 and "has no CPU variant modules" in r.stderr, r.stderr


def _variant_scores(lib: Path) -> dict[str, int]:
    """ggml's score of every CPU variant of the build in ``lib`` (a subprocess:
    this process holds another build)."""
    env = dict(os.environ, FFNSKIP_GGUF_LIB_PATH=str(lib))
    r = _probe(sys.executable, env, "import json, ffnskip_gguf as f, ffnskip_gguf._backends as b; "
               "print(json.dumps(b.variant_scores(f.LIB_DIR)))")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _runnable_variants(lib: Path) -> list[str]:
    return sorted(v for v, s in _variant_scores(lib).items() if s > 0)


# the exactness tests of the gate, the probe and the MoE block, per variant
EXACT_TESTS = [
    "test_gate.py::test_forced_skip_equals_zeroed_ffn_down",
    "test_gate.py::test_static_removal_equals_zeroed_ffn_down",
    "test_gate.py::test_never_firing_threshold_is_bit_identical_to_dense",
    "test_gate.py::test_batched_never_firing_is_bit_identical_to_dense",
    "test_gate.py::test_gate_matches_the_callback_oracle[smollm2_path-llama]",
    "test_gate.py::test_gate_matches_the_callback_oracle[qwen3_synthetic_path-qwen3]",
    "test_probe.py::test_forced_probe_skips_equal_zeroed_ffn_down",
    "test_probe.py::test_probe_decisions_equal_the_python_emulation",
    "test_archs.py::test_forced_skip_equals_zeroed_ffn_down_and_static_removal[qwen3moe]",
    "test_archs.py::test_forced_skip_equals_zeroed_ffn_down_and_static_removal[gpt-oss]",
    "test_archs.py::test_forced_skip_equals_zeroed_ffn_down_and_static_removal[gemma4]",
    "test_archs.py::test_decisions_equal_the_python_state_machine[qwen35moe]",
]


def test_gate_is_exact_on_every_variant_this_cpu_runs(portable_lib):
    variants = _runnable_variants(portable_lib)
    assert "x64" in variants
    failures = []
    for v in variants:
        env = dict(os.environ, FFNSKIP_GGUF_LIB_PATH=str(portable_lib), FFNSKIP_CPU_VARIANT=v)
        env.pop("FFNSKIP_REQUIRE_PORTABLE", None)
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *EXACT_TESTS],
                           cwd=HERE, env=env, capture_output=True, text=True, timeout=1800)
        tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-500:]
        print(f"variant {v}: {tail}")
        # every listed test ran and passed: none skipped or deselected
        if r.returncode != 0 or not re.fullmatch(rf"{len(EXACT_TESTS)} passed(, \d+ warnings?)? in .*", tail):
            failures.append(f"{v}: {r.stdout[-3000:]}\n{r.stderr[-1000:]}")
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="session")
def qemu() -> str:
    _need(QEMU is not None, "qemu-x86_64 (Debian package qemu-user) is not installed")
    return QEMU


def test_native_build_on_an_older_cpu_raises_a_clear_import_error(qemu):
    feats = _cpucheck.read_features(ffnskip_gguf.LIB_DIR)
    if feats is None or feats["build"] == "portable":
        pytest.skip(f"the installed build ({ffnskip_gguf.LIB_DIR}) is not a native build")
    if not any(m in feats["require"] for m in ("__AVX__", "__AVX2__", "__FMA__", "__F16C__")):
        pytest.skip("this native build needs nothing Nehalem lacks")
    env = dict(os.environ, FFNSKIP_GGUF_LIB_PATH=str(ffnskip_gguf.LIB_DIR))
    r = _probe(sys.executable, env, "import ffnskip_gguf", qemu_cpu=OLD_CPU)
    assert r.returncode == 1, f"exit {r.returncode} (SIGILL is -4 or 132):\n{r.stderr[-2000:]}"
    err = r.stderr
    assert "ImportError: ffnskip_gguf: this CPU lacks" in err, err[-2000:]
    assert "avx" in err.split("this CPU lacks", 1)[1].split("which", 1)[0]
    assert "rebuild on this machine" in err and "portable wheel" in err


def test_portable_wheel_generates_on_an_older_cpu(qemu, portable_venv, smollm2_path):
    py, env = portable_venv
    r = _probe(str(py), env, "import ffnskip_gguf as f; print(f.CPU_VARIANT)", qemu_cpu=OLD_CPU)
    assert r.returncode == 0, r.stderr[-2000:]
    variant = r.stdout.strip().splitlines()[-1]
    assert variant in ("sse42", "x64"), variant
    exe = py.parent / "ffnskip-gguf"
    r = subprocess.run([qemu, "-cpu", OLD_CPU, str(py), str(exe), "generate", "-m", smollm2_path, "-p", PROMPT,
                        "-n", "8", "--ffn-skip", "on", "--threads", "2"],
                       env=env, capture_output=True, text=True, cwd="/", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stdout.strip()) > len(PROMPT)
    assert re.search(r"FFN skip ratio [0-9.]+ over \d+ decode tokens", r.stderr), r.stderr[-2000:]


# --- the instruction-set check itself (no emulator, no wheel needed) ---

def _checker_dir(tmp_path: Path, require: str, build: str = "native") -> Path:
    """A fresh folder with a copy of the checker and a features file (a new
    folder each time: overwriting a loaded library would crash the process)."""
    checker = Path(ffnskip_gguf.LIB_DIR) / _cpucheck._checker_name()
    if not checker.is_file():
        pytest.skip(f"this build has no {checker.name} (not x86-64)")
    d = Path(tempfile.mkdtemp(dir=tmp_path))
    shutil.copy(checker, d / checker.name)
    (d / _cpucheck.FEATURES_FILE).write_text(f"build: {build}\nflags: -march=native\nrequire: {require}\n")
    return d


def test_checker_answers_per_macro_and_minus_one_for_unknown_ones(tmp_path):
    has = _cpucheck.cpu_has_fn(_checker_dir(tmp_path, ""))
    assert has(b"__SSE3__") == 1  # every x86-64 CPU since 2004 (and qemu's Nehalem)
    assert has(b"__NOT_AN_ISA__") == -1
    assert has(None) == -2


def test_a_feature_this_cpu_lacks_is_an_import_error_naming_it(tmp_path):
    has = _cpucheck.cpu_has_fn(_checker_dir(tmp_path, ""))
    lacking = [m for m in ("__AVX512FP16__", "__AMX_TILE__", "__AVX512BF16__", "__AVX512F__", "__AVXVNNI__")
               if has(m.encode()) == 0]
    if not lacking:
        pytest.skip("this CPU has every feature the test could ask for")
    d = _checker_dir(tmp_path, f"__SSE3__ {lacking[0]} __NOT_AN_ISA__")
    with pytest.raises(ImportError, match=f"this CPU lacks {_cpucheck.feature_label(lacking[0])}, which"):
        _cpucheck.check_cpu(d)
    assert _cpucheck.missing_features(d)[1] == [lacking[0]]


def test_checker_agrees_with_the_kernels_cpu_flags(tmp_path):
    has = _cpucheck.cpu_has_fn(_checker_dir(tmp_path, ""))
    flags = _cpuinfo_flags()
    # macro -> /proc/cpuinfo name (Linux arch/x86/include/asm/cpufeatures.h)
    names = {"__SSE3__": "pni", "__SSSE3__": "ssse3", "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2",
             "__POPCNT__": "popcnt", "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma", "__F16C__": "f16c",
             "__BMI__": "bmi1", "__BMI2__": "bmi2", "__MOVBE__": "movbe", "__AES__": "aes", "__PCLMUL__": "pclmulqdq",
             "__SHA__": "sha_ni", "__ADX__": "adx", "__RDRND__": "rdrand", "__RDSEED__": "rdseed",
             "__LZCNT__": "abm", "__AVX512F__": "avx512f", "__AVX512BW__": "avx512bw", "__AVX512VL__": "avx512vl",
             "__AVX512DQ__": "avx512dq", "__AVX512CD__": "avx512cd", "__AVX512VNNI__": "avx512_vnni",
             "__AVX512BF16__": "avx512_bf16", "__AVX512VBMI__": "avx512vbmi", "__AVXVNNI__": "avx_vnni",
             "__GFNI__": "gfni", "__VAES__": "vaes", "__VPCLMULQDQ__": "vpclmulqdq", "__AMX_TILE__": "amx_tile"}
    wrong = {m: (has(m.encode()), n in flags) for m, n in names.items() if has(m.encode()) != int(n in flags)}
    # Linux may hide a flag CPUID reports where the instruction is broken:
    # RDRAND when its boot self-test fails (arch/x86/kernel/cpu/rdrand.c),
    # RDSEED on AMD Zen 5 (family 1Ah) without the microcode that fixes it
    # (arch/x86/kernel/cpu/amd.c; the CI machine). The checker answers CPUID,
    # which is what running code gets; compilers never emit these two on
    # their own, so no build depends on them.
    cpuinfo = Path("/proc/cpuinfo").read_text()
    zen5 = "AuthenticAMD" in cpuinfo and re.search(r"^cpu family\s*:\s*26$", cpuinfo, re.M) is not None
    hideable = {"__RDRND__"} | ({"__RDSEED__"} if zen5 else set())
    left = {m: v for m, v in wrong.items() if not (m in hideable and v == (1, False))}
    assert not left, left


def test_recorded_features_this_cpu_has_pass(tmp_path):
    _cpucheck.check_cpu(_checker_dir(tmp_path, "__SSE3__ __SSSE3__ __NOT_AN_ISA__"))


@pytest.mark.parametrize("text", ["build: native\n", "require: __AVX__\n", "nonsense\n",
                                  "build: native\nrequire: __AVX__\ncolour: blue\n", "build: a b\nrequire:\n"])
def test_a_malformed_features_file_is_a_clear_import_error(tmp_path, text):
    (tmp_path / _cpucheck.FEATURES_FILE).write_text(text)
    with pytest.raises(ImportError, match="cpu-features.txt"):
        _cpucheck.read_features(tmp_path)


def test_the_installed_build_records_what_it_needs():
    feats = _cpucheck.read_features(ffnskip_gguf.LIB_DIR)
    assert feats is not None, "cmake/cpu-features.cmake wrote no cpu-features.txt"
    assert feats["build"] in ("native", "flags", "portable")
    if feats["build"] == "native":
        assert "-march=native" in feats["flags"] and "__SSE3__" in feats["require"]
    if feats["build"] == "portable":
        assert "__AVX__" not in feats["require"] and ffnskip_gguf.CPU_VARIANT is not None
    else:
        assert ffnskip_gguf.CPU_VARIANT is None
    _cpucheck.check_cpu(ffnskip_gguf.LIB_DIR)  # it runs here, so it passes here
