"""Data preparation and the resumable, deterministic loader.

Run: python -m pytest -q tests/test_train_data.py
"""

import json

import numpy as np
import pytest

from train.data import DataError, PackedDataset, load_split, main, prepare


def _docs(tmp_path):
    rows = [{"text": f"document number {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 5)} for i in range(200)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "extra.txt").write_text("a plain text document with digits 12345\n")
    return path


def test_prepare_trains_bpe_and_writes_shards(tmp_path):
    _docs(tmp_path)
    m = prepare([str(tmp_path / "*.jsonl"), str(tmp_path / "*.txt")], "train:300", str(tmp_path / "out"),
                val_fraction=0.1)
    assert m["dtype"] == "uint16" and m["vocab_size"] <= 300
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 201
    assert m["splits"]["val"]["documents"] > 0
    train = load_split(str(tmp_path / "out"), "train", vocab_size=512)
    assert len(train) == m["splits"]["train"]["tokens"]
    assert int(np.asarray(train).max()) < m["vocab_size"]
    # digits are tokenised one by one
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert tok.encode("12345").tokens == ["1", "2", "3", "4", "5"]


def test_prepare_with_existing_tokenizer_and_vocab_check(tmp_path):
    _docs(tmp_path)
    prepare([str(tmp_path / "docs.jsonl")], "train:300", str(tmp_path / "a"))
    m = prepare([str(tmp_path / "docs.jsonl")], str(tmp_path / "a" / "tokenizer.json"), str(tmp_path / "b"))
    assert m["tokenizer_sha256"] == json.loads((tmp_path / "a" / "manifest.json").read_text())["tokenizer_sha256"]
    with pytest.raises(DataError, match="larger than the model's vocab_size"):
        load_split(str(tmp_path / "b"), "train", vocab_size=100)


def test_refusals(tmp_path, capsys):
    with pytest.raises(DataError, match="no input files"):
        prepare([str(tmp_path / "*.jsonl")], "train:300", str(tmp_path / "o"))
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(DataError, match="hold no text"):
        prepare([str(tmp_path / "empty.txt")], "train:300", str(tmp_path / "o"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text \xff\xfe more")
    with pytest.raises(DataError, match=r"bad.txt: invalid UTF-8 at byte offset 10"):
        prepare([str(bad)], "train:300", str(tmp_path / "o"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"txt": "wrong field"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: not a JSON object with a string field 'text'"):
        prepare([str(rows)], "train:300", str(tmp_path / "o"))
    (tmp_path / "more.txt").write_text("another fine document\n")
    m = prepare([str(rows), str(bad), str(tmp_path / "more.txt")], "train:300", str(tmp_path / "o"),
                skip_bad=True, val_fraction=0.0)
    assert m["skipped_documents"] == 2
    assert main(["prepare", "--input", str(tmp_path / "none*.txt"), "--tokenizer", "train:300", "--out",
                 str(tmp_path / "x")]) == 2
    assert "no input files" in capsys.readouterr().err


def test_loader_is_deterministic_and_never_repeats_within_an_epoch():
    tokens = np.arange(10_001, dtype=np.uint16)
    ds = PackedDataset(tokens, seq_len=10, seed=3)
    assert ds.num_windows == 1000
    seen = [tuple(ds.batch(step, micro_batch=50)[:, 0]) for step in range(20)]  # 20 x 50 = one epoch
    firsts = [x for batch in seen for x in batch]
    assert len(set(firsts)) == 1000
    again = PackedDataset(tokens, seq_len=10, seed=3)
    assert np.array_equal(again.batch(7, micro_batch=50), ds.batch(7, micro_batch=50))
    assert not np.array_equal(PackedDataset(tokens, 10, seed=4).batch(7, micro_batch=50), ds.batch(7, micro_batch=50))
    w = ds.batch(0, micro_batch=1)[0]
    assert np.array_equal(w, np.arange(w[0], w[0] + 11))  # a window of seq_len + 1 consecutive tokens


def test_global_batch_is_independent_of_world_size_and_resume_continues_exactly():
    ds = PackedDataset(np.arange(5_001, dtype=np.uint16), seq_len=8, seed=0)
    one = np.concatenate([ds.batch(4, micro, 0, 1, 4, accum=2) for micro in range(2)])
    two = np.concatenate([ds.batch(4, 0, rank, 2, 4, accum=1) for rank in range(2)])
    assert np.array_equal(one, two)
    # a run that stops after step 2 and resumes at step 3 reads the same windows as an uninterrupted one
    fresh = PackedDataset(np.arange(5_001, dtype=np.uint16), seq_len=8, seed=0)
    assert np.array_equal(fresh.batch(3, micro_batch=4), ds.batch(3, micro_batch=4))
