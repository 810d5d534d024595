"""avgguf's Python API: what the CLI does, as calls (docs/python-api.md).

    import avgguf

    avgguf.convert("runs/medical/base", "runs/medical/aligned", "medical.gguf", name="medical")
    with avgguf.open("base.gguf", avs=["medical.gguf"]) as model:   # or a modelfile[:profile]
        model.set(medical=0.8)
        print(model.chat("I have a cough. What should I do?", max_tokens=64))
        for piece in model.stream("And for a fever?"):
            print(piece, end="")
    avgguf.bake_to("modelfiles/demo.yaml:expert-medical", "expert.gguf", format="gguf")

The runtime half imports llama-cpp-python only; `convert` needs the `convert` extra (torch).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Model", "open", "convert", "bake_to"]


class Model:
    """One base GGUF loaded once with its AVs; coefficients change live (no reload, no stale K/V)."""

    def __init__(
        self,
        target: str | Path,
        avs: Sequence[str | Path] | None = None,
        *,
        n_ctx: int | None = None,
        n_gpu_layers: int | None = None,
        threads: int | None = None,
        verbose: bool = False,
    ):
        """`target`: a modelfile (`demo.yaml` or `demo.yaml:PROFILE`), a base `.gguf` or `builtin:NAME`;
        `avs`: adapter paths for a bare base GGUF (named as `avgguf profiles` shows: `Model.avs`)."""
        from avgguf.config.modelfile import open_target
        from avgguf.runtime.session import Runtime

        self.modelfile, self.profile = open_target(str(target), [f"{p}=0" for p in avs or []])
        self.coefficients: dict[str, float] = self.modelfile.coefficients(self.profile)
        self._rt = Runtime(self.modelfile, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, threads=threads, verbose=verbose, merge="off")

    @property
    def avs(self) -> list[str]:
        """The AV names, in the modelfile's order."""
        return list(self.modelfile.av_paths)

    def set(self, coefficients: Mapping[str, float] | None = None, /, **named: float) -> dict[str, float]:
        """Set AV coefficients (unnamed AVs keep theirs); each in [-2, 2]. Returns all of them."""
        merged = {**self.coefficients, **(coefficients or {}), **named}
        self.coefficients = self.modelfile.coefficients(None, merged, source="set")
        return dict(self.coefficients)

    def use_profile(self, name: str | None) -> dict[str, float]:
        """The coefficients of a profile of the modelfile (None: all AVs at 0 or the default profile)."""
        self.coefficients = self.modelfile.coefficients(name)
        return dict(self.coefficients)

    def chat(self, message: str | list[dict[str, str]], **sampling: Any) -> str:
        """The answer to a user message (or an OpenAI-style message list) under the current coefficients.
        `sampling`: max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, seed, stop; decode="pad"."""
        return "".join(self.stream(message, **sampling))

    def stream(self, message: str | list[dict[str, str]], *, decode: str = "weights", **sampling: Any) -> Iterator[str]:
        """The answer's text pieces as they are generated."""
        from avgguf.runtime.session import GenerationRequest

        messages = [{"role": "user", "content": message}] if isinstance(message, str) else list(message)
        req = GenerationRequest(messages=messages, **sampling)
        yield from self._rt.stream_chat_text(req, self.coefficients, decode=decode)

    def complete(self, prompt: str, **sampling: Any) -> str:
        """A plain-text continuation of `prompt` (no chat template)."""
        from avgguf.runtime.session import GenerationRequest

        out = self._rt.complete(GenerationRequest(prompt=prompt, **sampling), self.coefficients)
        return out["choices"][0]["text"]

    def close(self) -> None:
        self._rt.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *_) -> None:
        self.close()


def open(target: str | Path, avs: Sequence[str | Path] | None = None, **kwargs: Any) -> Model:  # noqa: A001
    """Model(target, avs, ...): load a modelfile, or a base GGUF with adapters."""
    return Model(target, avs, **kwargs)


def convert(
    base: str | Path,
    aligned: str | Path,
    out: str | Path,
    *,
    name: str,
    rank: int = 16,
    dtype: str = "f16",
    force: bool = False,
    **kwargs: Any,
) -> dict:
    """The AV aligned − base (two Hugging Face checkpoints or two GGUFs) as a GGUF LoRA adapter at `out`,
    rank `rank`; returns the conversion report. Needs the `convert` extra (torch)."""
    from avgguf.converters.convert import convert_pair
    from avgguf.converters.lowrank import RankPolicy
    from avgguf.converters.sources import open_source

    report = convert_pair(
        open_source(base, "base"),
        open_source(aligned, "aligned"),
        out,
        name=name,
        policy=RankPolicy(rank=rank),
        dtype=dtype,
        force=force,
        **kwargs,
    )
    return report.to_dict()


def bake_to(
    target: str,
    out: str | Path,
    *,
    format: str = "gguf",
    coefficients: Mapping[str, float] | None = None,  # noqa: A002
    force: bool = False,
    **kwargs: Any,
) -> dict:
    """`avgguf bake`: a profile (`modelfile:profile`) or coefficients baked to `format` (gguf, adapter, ollama,
    peft) at `out`. (Not `bake`: the name of the avgguf.export.bake module.)"""
    from avgguf.export.bake import bake as bake_profile
    from avgguf.config.modelfile import open_target

    mf, profile = open_target(target)
    coefs = mf.coefficients(profile, dict(coefficients or {}), source="coefficients")
    return bake_profile(mf, profile, coefs, out, format, force=force, **kwargs)
