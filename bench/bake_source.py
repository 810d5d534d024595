"""A profile baked from the fine-tune itself (`avgguf bake --source NAME=BASE,ALIGNED`): the merge starts from
the full-precision base checkpoint (the base GGUF's 4-bit rounding is not compounded), vs the same delta added
to the GGUF's weights, vs the adapter; and whether the base's own 4-bit type can hold it. Speed relative to
the base GGUF and fidelity against the full-precision aligned model
(base checkpoint + λ·(aligned − base), float32), next to the adapter paths.

    python bench/bake_source.py --source medical=runs/medical/base,runs/medical/aligned [--repeats 5]
        [--convert /path/to/llama.cpp/convert_hf_to_gguf.py]

--convert: the stock path side by side (the profile is the aligned model itself): llama.cpp's converter on
the aligned checkpoint (f32), then llama.cpp's quantizer to q8_0 (the converter needs `pip install
sentencepiece` even for BPE tokenizers).

The checkpoints are the demo AV's own DPO run (recipes/: `runs/` is not shipped); the modelfile is
modelfiles/demo.yaml and the profile that AV at 1. "KL kept" and "margin kept" as in bench/bake_speed.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bake_speed import (  # bench/bake_speed.py: a script's own folder is importable
    domain_items,
    eval_tokens,
    log_probs,
    margins,
    mean_kl,
    open_engine,
    quantize,
    speeds,
)

from avgguf.export.bake import Bake, baked_gguf, open_sources, write_merged_f32
from avgguf.config.modelfile import load_modelfile

ROOT = Path(__file__).resolve().parent.parent


class FromGGUF(Bake):
    """The full delta added to the base GGUF's de-quantized weights (what --source did before it started from
    the base checkpoint)."""

    @property
    def full_base(self):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, help="NAME=BASE,ALIGNED (as for avgguf bake)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--convert", help="llama.cpp's convert_hf_to_gguf.py, for the stock row")
    args = ap.parse_args()
    mf = load_modelfile(ROOT / "modelfiles" / "demo.yaml")
    sources = open_sources([args.source], mf)
    name = next(iter(sources))
    coefs = {n: (1.0 if n == name else 0.0) for n in mf.av_paths}
    avs = {name: mf.av_paths[name]}
    with tempfile.TemporaryDirectory(prefix="avgguf-bake-source-") as tmp:
        work = Path(tmp)
        paths = {"base": (mf.base_path, {}, {}), "live adapter": (mf.base_path, avs, {name: 1.0})}
        seconds = {}
        for label, kind, srcs, type_ in (
            ("bake from the adapter", Bake, None, None),
            ("bake --source, added to the GGUF's 4-bit weights", FromGGUF, sources, None),
            ("bake --source (from the base checkpoint)", Bake, sources, None),
            ("bake --source --type q4_1", Bake, sources, "q4_1"),
        ):
            out = work / f"{len(paths)}.gguf"
            t0 = time.perf_counter()
            report = baked_gguf(kind(mf, "expert", coefs, srcs), out, type_)
            label += f" [{report['type']}]"
            seconds[label] = time.perf_counter() - t0
            paths[label] = (out, {}, {})
        if args.convert:
            label = "stock: convert_hf_to_gguf (aligned, f32) + quantize [q8_0]"
            t0 = time.perf_counter()
            f32 = work / "stock-f32.gguf"
            subprocess.run(
                [sys.executable, args.convert, sources[name][1].path, "--outtype", "f32", "--outfile", str(f32)],
                check=True,
                capture_output=True,
            )
            paths[label] = (quantize(f32, work / "stock-q8_0.gguf", "MOSTLY_Q8_0"), {}, {})
            seconds[label] = time.perf_counter() - t0
            f32.unlink()
        fp = write_merged_f32(Bake(mf, "expert", coefs, sources), work / "fp.gguf")
        engines = {label: open_engine(*spec, "off") for label, spec in paths.items()}
        measured = speeds(engines, args.tokens, args.repeats)
        for eng in engines.values():
            eng.close()
        ref_eng = open_engine(fp, {}, {}, "off", logits_all=True)
        items = domain_items({name})
        texts = eval_tokens(ref_eng)
        ref = [log_probs(ref_eng, t) for t in texts]
        m_fp = margins(ref_eng, items)
        ref_eng.close()
        rows = []
        for label, spec in paths.items():
            eng = open_engine(*spec, "off", logits_all=True)
            rows.append((label, mean_kl(ref, eng, texts), margins(eng, items)))
            eng.close()
    kl_base, m_base = rows[0][1], rows[0][2]
    print(
        f"SmolLM2-135M Q4_1 + {name} at 1 ({args.tokens} tokens greedy, median of {args.repeats}, alternating); "
        f"reference: the full-precision aligned model\n"
    )
    print("| path | gen tok/s | vs base | bake s | KL kept | margin kept |")
    print("|---|---|---|---|---|---|")
    base_tps = measured["base"][0]
    for label, kl, m in rows:
        secs = f"{seconds[label]:.1f}" if label in seconds else ""
        print(
            f"| {label} | {measured[label][0]:.1f} | {measured[label][0] / base_tps:.2f} | {secs} | "
            f"{1 - kl / kl_base:.3f} | {(m - m_base) / (m_fp - m_base):.3f} |"
        )


if __name__ == "__main__":
    main()
