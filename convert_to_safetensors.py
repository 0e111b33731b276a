"""Write model.safetensors next to a checkpoint folder's pytorch_model.bin.

Before torch 2.6, torch.load can run code from a crafted file even with weights_only=True (CVE-2025-32434), so
transformers refuses pickled checkpoints there; the released MOSS-TTS-Nano ships one. This repository reads a
single zip-format pytorch_model.bin there with safe_checkpoint.py (no unpickling), so converting is optional; a
safetensors file loads faster and needs no pickle parsing at all. It runs on any torch (before 2.6 through the same
reader):

    python convert_to_safetensors.py ./MOSS-TTS-Nano ./MOSS-Audio-Tokenizer-Nano

The .bin stays; loaders prefer model.safetensors when both exist. Exit codes: 0 success, 1 environment failure,
2 invalid input.
"""

from __future__ import annotations

# Run as `python convert_to_safetensors.py`: execute this file as a package module instead (repo_imports.py).
if __name__ == "__main__" and not __package__:
    __import__("repo_imports").run_script(__file__)

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import save_file

from .atomic_files import write_atomic
from .cli_common import Parser, run_cli
from .torch_compat import load_pickled_weights


def convert_directory(directory: Path) -> Optional[Path]:
    """Convert ``directory/pytorch_model.bin`` to ``directory/model.safetensors`` (atomically); return its path.

    Returns None for a folder that holds model.safetensors and no .bin (nothing to convert).

    Raises:
        ValueError: when the folder has neither a single-file pytorch_model.bin nor model.safetensors.
        UnsafeCheckpointError (a ValueError): on torch < 2.6, a .bin that is not a plain zip-format state dict.
    """
    source, target = directory / "pytorch_model.bin", directory / "model.safetensors"
    if not source.is_file() and target.is_file():
        return None
    if not source.is_file():
        sharded = (directory / "pytorch_model.bin.index.json").is_file()
        raise ValueError(f"'{directory}' has no pytorch_model.bin"
                         + (" (sharded .bin checkpoints are not supported)" if sharded else ""))
    state = load_pickled_weights(str(source), map_location="cpu")
    # Why clone: tied weights share storage in a .bin, which safetensors refuses; each key gets its own copy.
    tensors = {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}
    return write_atomic(target, lambda temporary: save_file(tensors, temporary, metadata={"format": "pt"}))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("directories", nargs="+", type=Path, help="checkpoint folders holding pytorch_model.bin")
        parser.add_argument("--verbose", action="store_true", help="print the traceback of a failure")
        for directory in parser.parse_args(argv).directories:
            written = convert_directory(directory)
            print(f"wrote {written}" if written else f"{directory} already holds model.safetensors only: nothing to do")
        return 0

    return run_cli(body, verbose="--verbose" in argv)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
