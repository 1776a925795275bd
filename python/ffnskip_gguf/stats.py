"""Typed view of the per-context FFN-skip statistics (DESIGN.md sections 3, 5)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class FfnSkipStats:
    """Cumulative FFN-skip statistics of one context.

    Attributes:
        n_layer: layers of the model (L).
        decode_tokens: generated tokens decoded (warm-up ones included;
            prompt tokens, embedding inputs and re-decoded prompt tokens
            excluded). ``Llama`` tells the library which is which (README,
            "Prompt and generated tokens"); through the raw C API a token
            counts when it is the only token of its sequence in the batch.
        rejected_tokens: of those, speculative draft tokens the sampler
            rejected (or never verified before generation stopped).
        skipped: FFN blocks skipped (gate or static removal) over decode tokens.
        run: FFN blocks run over decode tokens.
        skip_ratio: skipped / (n_layer x decode_tokens); 0.0 before any decode.
        skipped_per_layer, run_per_layer: the same counts by layer, length L.
        cos_mean_per_layer: mean cos(h_j, o_j) over decode tokens whose FFN j
            ran; None where it never ran (or the gate was off).
        supported: False when this context decodes dense; ``reason`` says why
            (when True, ``reason`` is empty or names the unverified path in
            effect, e.g. the CUDA gate forced on by FFNSKIP_CUDA_GATE=1).
    """

    n_layer: int
    decode_tokens: int
    skipped: int
    run: int
    skip_ratio: float
    skipped_per_layer: list[int]
    run_per_layer: list[int]
    cos_mean_per_layer: list[float | None]
    supported: bool
    reason: str = ""
    mode: str = "off"
    rejected_tokens: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready dict (the server's ``/ffn_skip/stats`` body)."""
        d = asdict(self)
        d.pop("extra", None)
        return d


def from_c(st, reason: str, mode: str) -> FfnSkipStats:
    """Build FfnSkipStats from a ``_lib.ffnskip_stats`` struct."""
    L = min(int(st.n_layer), len(st.run))
    skipped = [int(st.skipped[j]) for j in range(L)]
    run = [int(st.run[j]) for j in range(L)]
    cos = [(st.cos_sum[j] / st.cos_count[j]) if st.cos_count[j] else None for j in range(L)]
    dt = int(st.decode_tokens)
    total_skipped = sum(skipped)
    return FfnSkipStats(
        n_layer=L, decode_tokens=dt, skipped=total_skipped, run=sum(run),
        skip_ratio=(total_skipped / (L * dt)) if dt and L else 0.0,
        skipped_per_layer=skipped, run_per_layer=run, cos_mean_per_layer=cos,
        supported=bool(st.supported), reason=reason, mode=mode, rejected_tokens=int(st.rejected_tokens),
    )


def read(ctx) -> FfnSkipStats:
    """Statistics of native context ``ctx`` (a ``llama_context*``): counters,
    whether it gates (and why not), and the mode the library runs in (an
    adaptive policy without budget runs as static, ``policy.to_c``)."""
    import ctypes

    from . import _lib

    st = _lib.ffnskip_stats()
    _lib.ffnskip_get_stats(ctx, ctypes.byref(st))
    reason = ctypes.create_string_buffer(512)
    _lib.ffnskip_supported(ctx, reason, len(reason))
    p = _lib.ffnskip_params()
    _lib.ffnskip_get_params(ctx, ctypes.byref(p))
    mode = {_lib.FFNSKIP_MODE_OFF: "off", _lib.FFNSKIP_MODE_ADAPTIVE: "adaptive",
            _lib.FFNSKIP_MODE_STATIC: "static"}.get(int(p.mode), str(int(p.mode)))
    return from_c(st, reason.value.decode(errors="replace"), mode)


def cuda_graph_counts() -> dict[str, int] | None:
    """How the CUDA backend of this process has computed its graphs since it
    loaded: ``{"eager": n, "captures": n, "replays": n}`` (one count per graph
    compute: run without a CUDA graph, captured into a new CUDA graph, or a
    captured graph replayed unchanged; counted in ggml-cuda, patches/0007 and
    cpp/ffn-skip-cuda.cu). ``None`` when the library has no CUDA backend.
    A decode whose skip decisions change only device memory replays."""
    import ctypes

    from . import _lib

    counts = (ctypes.c_uint64 * 3)()
    if _lib.ffnskip_cuda_graph_counts(counts) != 0:
        return None
    return {"eager": int(counts[0]), "captures": int(counts[1]), "replays": int(counts[2])}
