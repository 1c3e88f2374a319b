"""`codebook-features index` and `search` on saved codebooks and a generated corpus."""

from __future__ import annotations

import json

from tiny_models import story_workload

from codebook_features.analysis import CodeIndex
from codebook_features.cli import main
from codebook_features.model import CodebookModel


def test_index_then_search(tmp_path, capsys):
    corpus, _, base = story_workload(tmp_path, num_stories=40, seed=3, positions=256)
    model = CodebookModel(base, placements=["attn_heads"], num_codes=32, k=2)
    model.save_codebooks(tmp_path / "cb", base_model_name=str(tmp_path / "model"))

    assert main(["index", str(tmp_path / "cb"), "--files", str(corpus), "--out",
                 str(tmp_path / "idx"), "--shard-tokens", "500"]) == 0
    capsys.readouterr()
    index = CodeIndex.open(tmp_path / "idx")
    assert index.num_docs == 40
    assert index.meta["codebooks"] == str((tmp_path / "cb").resolve())  # for `browse`
    index.close()

    assert main(["search", str(tmp_path / "idx"), "--site", "layers.0.attn_heads",
                 "--regex", r"\bonce\b", "-n", "3"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and rows[0]["precision"] >= rows[-1]["precision"]
    code = rows[0]["code"]
    assert main(["search", str(tmp_path / "idx"), "--site", "layers.0.attn_heads",
                 "--code", str(code), "--group", str(rows[0]["group"])]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["count"] == rows[0]["fired"] and out["contexts"]
    assert main(["search", str(tmp_path / "idx"), "--site", "layers.0.attn_heads",
                 "--topics", "0.3"]) == 0
    capsys.readouterr()
    # bad input: one line, exit 2
    assert main(["search", str(tmp_path / "idx"), "--site", "layers.9.mlp_out",
                 "--code", "1"]) == 2
    assert main(["search", str(tmp_path / "idx"), "--site", "layers.0.attn_heads",
                 "--regex", "(unclosed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err)
