"""``slicelm export DIR --gguf FILE``: a plain (stock-architecture) model folder to GGUF for llama.cpp."""

from __future__ import annotations

import argparse
import sys

from slicelm.cli.common import quiet_libraries


def add_parser(sub: argparse._SubParsersAction) -> None:
    from slicelm.export import CONVERTER_TYPES, LLAMA_CPP_ENV, QUANTIZE_TYPES

    p = sub.add_parser(
        "export",
        help="convert a plain-layout (or dense) model folder to GGUF with llama.cpp's converter",
        description="Convert a stock-architecture model folder (slicelm slice --layout plain, or any dense Hugging "
        "Face folder) to a GGUF file with llama.cpp's own convert_hf_to_gguf.py, quantizing with llama-quantize "
        "when the type needs it.",
    )
    p.add_argument("folder", help="model folder (a --layout plain output, or a dense model)")
    p.add_argument("--gguf", required=True, help="the GGUF file to write (must not exist)")
    p.add_argument(
        "--outtype",
        default="f16",
        type=str.lower,
        choices=CONVERTER_TYPES + QUANTIZE_TYPES,
        help="f32, f16, bf16, q8_0 (the converter's own) or a llama-quantize type such as q4_k_m (default f16)",
    )
    p.add_argument(
        "--llama-cpp", help=f"llama.cpp checkout or benchmarks/llama_cpp_build.sh folder (else ${LLAMA_CPP_ENV})"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from slicelm.export import export_gguf, quantization_notes

    out = export_gguf(args.folder, args.gguf, args.outtype, args.llama_cpp)
    for note in quantization_notes(args.folder, args.outtype):
        print(f"slicelm: note: {note}", file=sys.stderr)
    print(f"slicelm: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.outtype})", file=sys.stderr)
    print(str(out))
    return 0
