"""Build a code index: the codes a :class:`CodebookModel` chooses on every token of a corpus.

Layout of an index folder (one shard per ``shard_tokens`` tokens, whole documents only)::

    meta.json                        model base_info, sites, codebook fingerprint (sha256 of
                                     the codebook weights), tokenizer, settings, shards done
    shard-00000.tokens.parquet       doc, pos, token_id, token, start, end, pred_id (one row
                                     per token; pred_id: the model's top-1 prediction of the
                                     next token there, the argmax of its logits with the
                                     codebooks on; absent in indexes built before it was
                                     recorded, ``meta["predictions"]`` says which)
    shard-00000.codes.parquet        doc, pos, site, grp, slot, code, score (one row per code)
    shard-00000.docs.parquet         doc, text
    shard-00000.grid.npy             int32 (tokens, slots): every token's codes, row = token
                                     in (doc, pos) order, columns = (site, grp, slot)
    shard-00000.counts.npy           int64 (sum over sites of groups * num_codes): how many
                                     tokens each (site, grp, code) fires on

The grid and the counts are what the browser's interactive queries read: the codes at a token
are one row of a memory-mapped array, and a regex's hits are a ``bincount`` over the rows of
the matching tokens; nothing is loaded into memory whole.

The code table is "exploded" (one row per token, site, group and slot): every query is a
plain filter or GROUP BY on flat integer columns (no list unnesting), and each shard is sorted
by ``(site, grp, code, doc, pos)`` so Parquet row-group statistics let DuckDB skip everything
but the rows of the code asked for. ``site`` is the site's index in ``meta["sites"]``.

Documents longer than the model's context are indexed whole, in consecutive windows of
``max_length`` tokens, each run as its own sequence (positions count on through the
document).

Shard files are written under a temporary name and renamed; ``meta.json`` is rewritten
atomically after each shard and lists the shards completed with each file's size and SHA-256,
so only listed shards are read, and a rerun skips them (a shard without a meta entry is
written again). Opening an index checks every shard file's size and structure, and its
checksum when the index is small enough (:data:`VERIFY_BYTES`); a rerun of
:func:`build_index` checks every checksum and rebuilds the damaged shards.

One module a part: :mod:`.layout` (the folder's format and the shard checks),
:mod:`.fingerprints` (which model built it), :mod:`.texts` (the corpus in batches and windows)
and :mod:`.build` (:func:`build_index`); every name is importable from here.
"""

from __future__ import annotations

from .build import _run_batch, _Shard, _write_npy, _write_parquet, build_index  # noqa: F401
from .fingerprints import (
    _LAYER_HASHES,  # noqa: F401
    _other_weights,  # noqa: F401
    check_layer,
    check_model,
    codebook_fingerprint,
    layer_fingerprint,
    site_fingerprints,
    site_infos,
)
from .layout import (
    ARRAYS,
    FORMAT,
    FORMAT_VERSION,
    KINDS,
    META_NAME,
    VERIFY_BYTES,
    count_offsets,
    file_check,
    grid_columns,
    shard_damage,
    shard_file,
)
from .texts import _text_batches, encode_long, token_windows  # noqa: F401

__all__ = [
    "ARRAYS",
    "FORMAT",
    "FORMAT_VERSION",
    "KINDS",
    "META_NAME",
    "VERIFY_BYTES",
    "build_index",
    "check_layer",
    "check_model",
    "codebook_fingerprint",
    "count_offsets",
    "encode_long",
    "file_check",
    "grid_columns",
    "layer_fingerprint",
    "shard_damage",
    "shard_file",
    "site_fingerprints",
    "site_infos",
    "token_windows",
]
