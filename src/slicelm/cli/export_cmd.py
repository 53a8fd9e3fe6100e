"""``slicelm export DIR [--gguf FILE]``: a plain (stock-architecture) model folder for llama.cpp and vLLM.

With ``--gguf`` it converts the folder to GGUF; with or without it, it prints (on stderr, one line
each) the widths llama.cpp cannot quantize as asked and the command that serves the folder with vLLM's
OpenAI-compatible server.
"""

from __future__ import annotations

import argparse
import sys

from slicelm.cli.common import quiet_libraries


def add_parser(sub: argparse._SubParsersAction) -> None:
    # imported when the parser is built, not when this module is: the module itself stays free of torch
    from slicelm.export import CONVERTER_TYPES, LLAMA_CPP_ENV, QUANTIZE_TYPES

    p = sub.add_parser(
        "export",
        help="convert a plain-layout (or dense) folder to GGUF with llama.cpp's converter; say how vLLM serves it",
        description="Convert a stock-architecture model folder (slicelm slice --layout plain, or any dense Hugging "
        "Face folder) to a GGUF file with llama.cpp's own convert_hf_to_gguf.py, quantizing with llama-quantize "
        "when the type needs it, and print the vLLM command line that serves the folder. Without --gguf only the "
        "folder is checked and the vLLM command printed; nothing is written.",
    )
    p.add_argument("folder", help="model folder (a --layout plain output, or a dense model)")
    p.add_argument("--gguf", help="the GGUF file to write (must not exist); without it nothing is written")
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
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.export import export_gguf, quantization_notes, vllm_command

    if args.gguf is None:  # vllm_command checks the folder first
        print(f"slicelm: serve it with vLLM: {vllm_command(args.folder)}", file=sys.stderr)
        return 0
    out = export_gguf(args.folder, args.gguf, args.outtype, args.llama_cpp)
    for note in quantization_notes(args.folder, args.outtype):
        print(f"slicelm: note: {note}", file=sys.stderr)
    print(f"slicelm: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.outtype})", file=sys.stderr)
    print(f"slicelm: serve the folder with vLLM: {vllm_command(args.folder)}", file=sys.stderr)
    print(str(out))
    return 0
