"""``codebook-features convert``: a checkpoint of the authors' package (their released models)
into this library's format, so that index, search, browse, steer and eval run on it."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import CodebookError


def convert(src: str | os.PathLike, out: str | os.PathLike, base: Any = None,
            tokenizer: str | None = None) -> Path:
    """Write ``out``: the codebooks (``save_codebooks``) and the checkpoint's finetuned base
    model (``save_pretrained``, with a tokenizer where one can be loaded) in one folder, which
    ``CodebookModel.from_pretrained(out)`` opens with no other argument.

    ``src``: their ``save_pretrained`` folder or hub id; ``base``: the base architecture (a
    model, config or hub name; default for their released models: the one they used);
    ``tokenizer``: where to take the tokenizer from (default: the base name, when it is one).
    Nothing is written unless the whole conversion succeeds (it is staged beside ``out``; a
    killed conversion's staging folder is removed by the next); a finished ``out`` is refused.
    """
    from . import authors
    from .fetch import local_folder
    from .model import CONFIG_NAME, CodebookModel

    out = Path(out)
    if (out / CONFIG_NAME).is_file():
        raise CodebookError(f"{out}: already holds converted codebooks; delete it or choose "
                            "another output folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CodebookError(f"{out}: exists and is not an empty folder; choose another output")
    folder = local_folder(src, "checkpoint")
    if not authors.is_authors_folder(folder):
        raise CodebookError(f"{src}: not a checkpoint of the authors' package (no config.json "
                            "with codebook_at); this library's own folders need no conversion")
    model = CodebookModel.from_pretrained(src, base_model=base)
    tok = _tokenizer(tokenizer or (base if isinstance(base, str) else
                                   authors.RELEASED_BASES.get(str(src))))
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*.tmp"):  # left by a killed conversion
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.base_model.save_pretrained(staging)
        if tok is not None:
            tok.save_pretrained(staging)
        model.save_codebooks(staging, base_model_name=".")  # its config is written last
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _tokenizer(name: Any) -> Any:
    if not isinstance(name, str):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"warning: no tokenizer saved ({name!r}: {first}); pass --tokenizer to the "
              "commands that read text")
        return None


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="the authors' save_pretrained folder or hub id "
                               "(e.g. taufeeque/TinyStories-1Layer-21M-Codebook)")
    p.add_argument("out", help="output folder (new or empty)")
    p.add_argument("--base", help="base model (hub name or folder) giving the architecture; "
                                  "default for their released models: the one they used")
    p.add_argument("--tokenizer", help="tokenizer to save beside the model (default: --base)")


def run(args: argparse.Namespace) -> int:
    out = convert(args.src, args.out, base=args.base, tokenizer=args.tokenizer)
    print(f"wrote {out}: codebooks and the finetuned base model; open it with "
          f"CodebookModel.from_pretrained({str(out)!r})")
    return 0
