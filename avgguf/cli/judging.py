"""What `avgguf eval` and `avgguf tune` share: the judge's rows per domain, the AV that serves a domain, and
the judge's engine built from the command line (one rule for both: --n-gpu-layers, --n-ctx, --threads)."""

from __future__ import annotations

from pathlib import Path

from avgguf.config.modelfile import Modelfile
from avgguf.gguf import adapter_format as fmt
from avgguf.runtime.engine import Engine
from avgguf.runtime.threads import ThreadPolicy

JUDGE_CTX = 1024  # the judge's context without --n-ctx: a preference row (query + reference answer) is short


def queries_by_domain(rows: list[dict], limit: int | None = None) -> dict[str, list[dict]]:
    """The rows grouped by their domain, in file order; with `limit`, at most that many per domain, evenly
    spaced, so every held-out topic stays represented."""
    by_domain: dict[str, list[dict]] = {}
    for row in rows:
        by_domain.setdefault(row["domain"], []).append(row)
    if limit:
        by_domain = {d: rs[:: max(1, -(-len(rs) // limit))][:limit] for d, rs in by_domain.items()}
    return by_domain


def av_for_domain(mf: Modelfile, domain: str) -> str | None:
    """The AV named `domain`, else the first whose adapter says `avgguf.av.domain: domain`; None if none."""
    if domain in mf.av_paths:
        return domain
    for name, path in mf.av_paths.items():
        if fmt.read_adapter(path).meta.get(fmt.KEY_DOMAIN) == domain:
            return name
    return None


def judge_settings(mf: Modelfile, args) -> dict:
    """Engine keywords from the command line, the modelfile's defaults under them: the GPU layers and threads
    as every other command reads them; the context JUDGE_CTX unless --n-ctx."""
    defaults = mf.spec.defaults
    return {
        "n_ctx": args.n_ctx or JUDGE_CTX,
        "n_gpu_layers": defaults.n_gpu_layers if args.n_gpu_layers is None else args.n_gpu_layers,
        "threads": ThreadPolicy.from_settings(args.threads, defaults.n_threads),
    }


def judge_engine(mf: Modelfile, args, model: Path | None = None) -> Engine:
    """The level judge's engine on `model` (default: the modelfile's base) with every AV of `mf` loaded:
    all-position logits, adapters fused synchronously (a sweep's numbers never depend on timing)."""
    eng = Engine(model or mf.base_path, logits_all=True, fuse="sync", verbose=args.verbose, **judge_settings(mf, args))
    try:
        for name, path in mf.av_paths.items():
            eng.load_adapter(name, path)
    except BaseException:
        eng.close()
        raise
    return eng
