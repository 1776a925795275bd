"""OpenAI-compatible HTTP server: llama-cpp-python's server with our ``Llama``.

``ffnskip-gguf serve --model NAME_OR_PATH [--ffn-skip ...]`` (issue 7). All
of llama-cpp-python's routes work unchanged (``/v1/completions``,
``/v1/chat/completions``, streaming, ``/v1/models``, ...); its app is built
by ``llama_cpp.server.app.create_app`` with a model proxy that constructs
``ffnskip_gguf.Llama`` instead of ``llama_cpp.Llama``. Additions:

- every completion and chat completion carries the FFN-skip statistics of
  that response in an extension field ``ffn_skip`` = ``{"skip_ratio",
  "decode_tokens", "skipped"}`` (streaming: in the chunk that carries
  ``finish_reason``), and non-streaming responses also in the header
  ``X-FFN-Skip-Ratio``. Requests are serialized by llama-cpp-python's lock,
  so the difference of the context's counters around one call is exactly
  that response's;
- ``GET /ffn_skip/stats``: the process totals with the fields of
  ``FfnSkipStats`` (DESIGN.md section 5) plus the settings in effect.
"""

from __future__ import annotations

import contextvars
import json
import re
import types
from typing import Any, Iterator

import llama_cpp

from .llama import Llama

HEADER = "X-FFN-Skip-Ratio"


_APP_CREATED = False
_RESPONSE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("ffnskip_response", default=None)


def _delta(llm: "Llama", before) -> dict:
    after = llm.ffn_skip_stats()
    dt = after.decode_tokens - before.decode_tokens
    sk = after.skipped - before.skipped
    return {"skip_ratio": (sk / (after.n_layer * dt)) if dt else 0.0, "decode_tokens": dt, "skipped": sk}


class ServedLlama(Llama):
    """``Llama`` whose completions carry their own FFN-skip statistics.

    Non-streaming: the extension field ``ffn_skip`` of the returned dict
    (llama-cpp-python's response model drops unknown fields, so the server
    also sends it as the ``X-FFN-Skip-Ratio`` header); streaming: ``ffn_skip``
    in the chunk that carries ``finish_reason``.
    """

    _ffn_last_response: dict | None = None

    def _ffn_wrap(self, out, before):
        if isinstance(out, dict):
            out["ffn_skip"] = self._ffn_record(_delta(self, before))
            return out

        def stream() -> Iterator[dict]:
            for chunk in out:
                if any(c.get("finish_reason") is not None for c in (chunk.get("choices") or [])):
                    chunk["ffn_skip"] = self._ffn_record(_delta(self, before))
                yield chunk

        return stream()

    def _ffn_record(self, d: dict) -> dict:
        self._ffn_last_response = d
        holder = _RESPONSE.get()
        if holder is not None:
            holder.update(d)
        return d

    def create_completion(self, *args: Any, **kwargs: Any):  # noqa: D102 (llama_cpp.Llama's)
        before = self.ffn_skip_stats()
        return self._ffn_wrap(super().create_completion(*args, **kwargs), before)

    def create_chat_completion(self, *args: Any, **kwargs: Any):  # noqa: D102 (llama_cpp.Llama's)
        before = self.ffn_skip_stats()
        return self._ffn_wrap(super().create_chat_completion(*args, **kwargs), before)


class _LlamaCppView(types.ModuleType):
    """``llama_cpp`` as llama-cpp-python's server modules see it, with
    ``Llama`` = ``llama_class``: its routes call ``llama_cpp.Llama.__call__``
    and ``llama_cpp.Llama.create_chat_completion`` on the class."""

    def __init__(self, llama_class: type) -> None:
        super().__init__("llama_cpp")
        self.Llama = llama_class

    def __getattr__(self, name: str) -> Any:
        return getattr(llama_cpp, name)


def grammar_problem(g: str) -> str:
    """A cheap structural check of a GBNF grammar before llama.cpp's parser
    sees it (it crashes on some malformed input, e.g. ``root ::= (((``):
    a ``root`` rule, balanced brackets outside literals and character
    classes, closed literals. Returns a message or ""."""
    if not re.search(r"(^|\n)\s*root\s*::=", g):
        return "grammar: no rule named root (GBNF: root ::= ...)"
    depth, i, n = [], 0, len(g)
    while i < n:
        ch = g[i]
        if ch == "#":  # comment to end of line
            while i < n and g[i] != "\n":
                i += 1
            continue
        if ch in "\"[":  # string literal / character class: skip to its end (backslash escapes)
            close = '"' if ch == '"' else "]"
            i += 1
            while i < n and g[i] != close:
                i += 2 if g[i] == "\\" else 1
            if i >= n:
                return "grammar: unterminated " + ("string literal" if ch == '"' else "character class")
        elif ch == "(":
            depth.append(ch)
        elif ch == ")":
            if not depth:
                return "grammar: unbalanced ')'"
            depth.pop()
        elif ch == "{":
            depth.append(ch)
        elif ch == "}":
            if not depth or depth.pop() != "{":
                return "grammar: unbalanced '}'"
        i += 1
    if depth:
        return f"grammar: unclosed '{depth[-1]}'"
    return ""


MAX_BODY = 16 * 2**20  # bytes; a prompt is at most n_ctx tokens anyway


async def _error(send, status: int, message: str) -> None:
    payload = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                    "code": None}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"access-control-allow-origin", b"*")]})
    await send({"type": "http.response.body", "body": payload})


class _JsonBodyGuard:
    """ASGI middleware: a POST body that is not valid JSON gets a 400 with an
    OpenAI-style JSON error (llama-cpp-python's error handler re-parses the
    body and answers 500 text otherwise), one over ``MAX_BODY`` a 413; and
    the response of a non-streaming completion gets the ``X-FFN-Skip-Ratio``
    header from a per-request holder that ``ServedLlama`` fills."""

    def __init__(self, app, n_vocab: int = 0):
        self.app = app
        self.n_vocab = n_vocab

    def check(self, path: str, doc: Any) -> str:
        """Inputs that crash llama-cpp-python's native code instead of raising
        (upstream): out-of-range token ids (abort) and malformed grammars
        (segfault in the GBNF parser). Returns a message, or "" when fine."""
        if not isinstance(doc, dict):
            return ""
        if path.endswith("/detokenize") and isinstance(doc.get("tokens"), list):
            bad = [t for t in doc["tokens"] if not isinstance(t, int) or isinstance(t, bool)
                   or not 0 <= t < self.n_vocab]
            if bad:
                return f"token ids must be integers in [0, {self.n_vocab}), got {bad[0]!r}"
        g = doc.get("grammar")
        if isinstance(g, str):
            return grammar_problem(g)
        return ""

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        chunks, more, size = [], True, 0
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > MAX_BODY:
                return await _error(send, 413, f"request body larger than {MAX_BODY} bytes")
        body = b"".join(chunks)
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            return await _error(send, 400, f"request body is not valid JSON: {e}" if body else "request body is empty")
        problem = self.check(scope.get("path", ""), doc)
        if problem:
            return await _error(send, 400, problem)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        holder: dict = {}
        token = _RESPONSE.set(holder)

        async def send_with_header(msg):
            if msg["type"] == "http.response.start" and holder:
                msg = dict(msg)
                msg["headers"] = list(msg.get("headers") or []) + [
                    (HEADER.lower().encode(), f"{holder['skip_ratio']:.6f}".encode())]
            await send(msg)

        try:
            await self.app(scope, replay, send_with_header)
        finally:
            _RESPONSE.reset(token)


CLIENT_ERRORS = (ValueError, UnicodeError, AssertionError, TypeError, KeyError, IndexError)


def _patch_validation_errors() -> None:
    """llama-cpp-python's route error handler answers 500 for request
    validation errors (max_tokens=-5, temperature="hot"); they are the
    client's: answer 400 ``invalid_request_error`` like the OpenAI API."""
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError
    from llama_cpp.server.errors import ErrorResponse, RouteErrorHandler

    orig = RouteErrorHandler.error_message_wrapper
    if getattr(orig, "_ffnskip", False):
        return

    def wrapper(self, error, body=None):
        if isinstance(error, (RequestValidationError, ValidationError)):
            return 400, ErrorResponse(message=str(error), type="invalid_request_error", param=None, code=None)
        status, resp = orig(self, error, body)
        if status == 500 and isinstance(error, RuntimeError) and "embedding=True" in str(error):
            # POST /v1/embeddings to a server not started in embedding mode
            return 400, ErrorResponse(message="this server was not started in embedding mode; embeddings need a "
                                      "server started with embedding=True (llama-cpp-python: --embedding)",
                                      type="invalid_request_error", param=None, code=None)
        if status == 500 and isinstance(error, CLIENT_ERRORS):
            # what llama-cpp-python raises on inputs it cannot handle (empty
            # prompt: AssertionError; a prompt list; unencodable text; bad
            # logit_bias keys; unknown content parts): the request's fault
            msg = str(error) or f"invalid request ({type(error).__name__})"
            return 400, ErrorResponse(message=msg, type="invalid_request_error", param=None, code=None)
        return status, resp

    wrapper._ffnskip = True  # type: ignore[attr-defined]
    RouteErrorHandler.error_message_wrapper = wrapper  # type: ignore[method-assign]


def create_app(model_path: str, *, ffn_kwargs: dict | None = None, n_ctx: int = 2048, n_threads: int | None = None,
               seed: int = 0, verbose: bool = False, api_key: str | None = None, **model_settings: Any):
    """Build the FastAPI app (llama-cpp-python's, with ``ServedLlama``).

    Args:
        model_path: GGUF path (checked by ``Llama``: clear errors for bad files).
        ffn_kwargs: ``Llama`` FFN-skip keywords (``ffn_skip=True``, ...).
        n_ctx, n_threads, seed, verbose, api_key, model_settings: llama-cpp-python
            ``ModelSettings`` / ``ServerSettings`` fields.
    Returns: the app (serve it with uvicorn). One app per process: llama-cpp-python's
        server keeps its model in module state.
    Raises: ModelFileError / ValueError as ``Llama`` does.
    """
    from fastapi.responses import JSONResponse
    from fastapi import Depends
    from llama_cpp.server import app as app_mod
    from llama_cpp.server import model as model_mod
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from .runner import _default_threads

    global _APP_CREATED
    if _APP_CREATED:
        raise RuntimeError("one server app per process: llama-cpp-python's server keeps its model in module state")
    from . import policy

    kw = dict(ffn_kwargs or {})
    unknown = sorted(k for k in kw if k != "ffn_skip" and k not in policy.KEYWORDS)
    if unknown:
        raise ValueError(f"unknown FFN-skip setting(s): {', '.join(unknown)}")
    fmt = model_settings.get("chat_format")
    if fmt is not None:
        try:
            llama_cpp.llama_chat_format.get_chat_completion_handler(fmt)
        except Exception:  # noqa: BLE001  llama-cpp-python raises a bare Exception
            raise ValueError(f"unknown chat format {fmt!r}") from None

    class _Served(ServedLlama):
        # the FFN-skip keywords of this app; llama-cpp-python's loader passes the rest
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kw, **kwargs})

    _patch_validation_errors()
    threads = n_threads or _default_threads()
    ms = ModelSettings(model=str(model_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=seed,
                       verbose=verbose, **model_settings)
    # interrupt_requests off: llama-cpp-python's default cuts a running stream
    # whenever any other request (even GET /v1/models) waits for the model
    ss = ServerSettings(api_key=api_key, interrupt_requests=False)
    # llama-cpp-python's server builds and calls the model through the name
    # ``llama_cpp.Llama`` of its modules (model.py: the loader; app.py:
    # ``llama_cpp.Llama.__call__`` / ``.create_chat_completion`` on the class):
    # both modules see a view of llama_cpp whose Llama is ours. One app per
    # process (the server keeps its model in module state anyway).
    view = _LlamaCppView(_Served)
    model_mod.llama_cpp = view
    app_mod.llama_cpp = view
    app = app_mod.create_app(server_settings=ss, model_settings=[ms])
    _APP_CREATED = True

    @app.get("/ffn_skip/stats", tags=["FFN skip"], dependencies=[Depends(app_mod.authenticate)])
    def ffn_skip_stats(llama_proxy=Depends(app_mod.get_llama_proxy)) -> JSONResponse:
        """Process totals (the fields of DESIGN.md section 5), the settings in
        effect with their sources, and the last response's numbers. Taken
        under the server's model lock: a consistent snapshot, after the
        request in progress."""
        llm = llama_proxy()
        st = llm.ffn_skip_stats().to_dict()
        p = llm.ffn_skip_params()
        st["params"] = {k: v for k, v in vars(p).items() if k != "sources"}
        st["params"]["sources"] = dict(p.sources)
        st["last_response"] = llm._ffn_last_response
        return JSONResponse(st)

    app.add_middleware(_JsonBodyGuard, n_vocab=int(llama_cpp.llama_vocab_n_tokens(
        llama_cpp.llama_model_get_vocab(app_mod._llama_proxy()._model.model))))
    return app


def serve(model_path: str, *, host: str = "127.0.0.1", port: int = 8000, **kw: Any) -> None:
    """Run the server until interrupted (uvicorn). Raises OSError when the
    address cannot be bound (checked before the model is loaded), ValueError
    on bad settings."""
    import socket

    import uvicorn
    from pydantic import ValidationError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OSError(f"cannot resolve host {host!r}: {e}") from None
    fam, _, _, _, addr = infos[0]
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    try:
        app = create_app(model_path, **kw)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ValueError(f"invalid server settings: {errs}") from None
    import sys

    print(f"serving {model_path} on http://{host}:{port}/v1 (FFN-skip stats: /ffn_skip/stats)", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
