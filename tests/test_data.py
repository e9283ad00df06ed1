"""Tests of the data pipeline: tokenizers, loading, packing, batches of rows in memory, the synthetic task."""

import dataclasses
import json
import re
from collections import Counter

import datasets
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers

from melt_jax.data import (
    ByteTokenizer,
    HFTokenizer,
    PackedData,
    load_tokenizer,
    pack_documents,
    synthetic,
)
from melt_jax.data import pipeline as data_lib
from melt_jax.data.loader import GrainBatches
from melt_jax.data.pipeline import DataError
from melt_jax.errors import TrainingError
from melt_jax.inference import evaluation
from melt_jax.train.checkpointing import RunCheckpoints

# --------------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer_round_trip_and_ids():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓ 😀\nend"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.encode("A\u00e9") == [65, 0xC3, 0xA9]
    assert tok.decode(ids) == text
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258)
    assert tok.token_to_id("<|endoftext|>") == 256 and tok.token_to_id("<|pad|>") == 257


def test_byte_tokenizer_specials_and_invalid_bytes():
    tok = ByteTokenizer()
    ids = tok.encode("ab") + [tok.eos_id] + tok.encode("c") + [tok.pad_id]
    assert tok.decode(ids) == "abc"
    assert tok.decode(ids, skip_special_tokens=False) == "ab<|endoftext|>c<|pad|>"
    assert tok.decode([0xFF, 65]) == "\ufffdA"
    with pytest.raises(DataError, match="token id 258"):
        tok.decode([65, 258])
    with pytest.raises(DataError, match="<\\|im_end\\|>"):
        tok.token_to_id("<|im_end|>")


def _write_word_level_tokenizer(path, padding=False):
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "foo": 3, ".": 4, "<|endoftext|>": 5, "<|pad|>": 6}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>", "<|pad|>"])
    if padding:
        tok.enable_padding(pad_id=6, pad_token="<|pad|>", length=16)
    tok.save(str(path))
    return path


def test_hf_tokenizer_loads_and_round_trips(tmp_path):
    path = _write_word_level_tokenizer(tmp_path / "tokenizer.json")
    for spec in (str(path), str(tmp_path)):  # the file or its folder
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        assert tok.encode("hello world foo.") == [1, 2, 3, 4]
        assert tok.encode("hello bar") == [1, 0]
        assert tok.decode([1, 2, 3]) == "hello world foo"
        assert tok.decode([1, 5, 2]) == "hello world"  # special dropped
        assert tok.encode_batch(["world", "foo hello"]) == [[2], [3, 1]]
        assert tok.eos_id == 5
        assert tok.pad_id == 5  # no padding in the file: pad is eos
        assert tok.vocab_size == 7
        assert tok.token_to_id("<|pad|>") == 6


def test_hf_tokenizer_pad_and_eos_options(tmp_path):
    path = _write_word_level_tokenizer(tmp_path / "tokenizer.json", padding=True)
    tok = load_tokenizer(str(path))
    assert tok.pad_id == 6  # from the file's padding section
    assert tok.encode("hello") == [1]  # the file's padding is switched off for encode
    assert HFTokenizer(path, eos_token="<|pad|>", pad_token="foo").eos_id == 6
    assert HFTokenizer(path, pad_token="foo").pad_id == 3
    with pytest.raises(DataError, match=r"eos_token '<\|im_end\|>' is not in the vocabulary"):
        load_tokenizer(str(path), eos_token="<|im_end|>")
    with pytest.raises(DataError, match="pad_token 'nope'"):
        HFTokenizer(path, pad_token="nope")


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="tokenizer not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(DataError, match="has no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="cannot read tokenizer file .*bad.json"):
        load_tokenizer(str(bad))
    with pytest.raises(DataError, match="tokenizer file not found"):
        HFTokenizer(tmp_path / "nothing.json")
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


# --------------------------------------------------------------------------------------------------
# Packing


def test_pack_documents_boundaries_masks_pad_and_split():
    # Documents (each ending with its eos, here 9): lengths 3, 2, 6; seq_len 4; the third document is
    # split over rows 1 and 2; the last row is padded with 0.
    docs = [[1, 2, 9], [3, 9], [4, 5, 6, 7, 8, 9]]
    packed = pack_documents(docs, seq_len=4, pad_id=0)
    np.testing.assert_array_equal(packed.tokens, [[1, 2, 9, 3], [9, 4, 5, 6], [7, 8, 9, 0]])
    np.testing.assert_array_equal(
        packed.loss_mask,
        [
            [0, 1, 1, 0],  # col 0; then 2 and 9 of doc 0; 3 starts doc 1 after an eos: not predicted
            [0, 0, 1, 1],  # col 0 (end of doc 1); 4 starts doc 2; 5, 6 predicted
            [0, 1, 1, 0],  # col 0 (doc 2 continued from the row before); 8, 9 predicted; pad
        ],
    )
    np.testing.assert_array_equal(packed.segment_ids, [[1, 1, 1, 2], [1, 2, 2, 2], [1, 1, 1, 0]])
    assert packed.tokens.dtype == np.int32 and packed.segment_ids.dtype == np.int32
    assert packed.loss_mask.dtype == np.float32
    assert (packed.num_rows, packed.seq_len) == (3, 4)


def test_pack_documents_row_aligned_document_and_long_document():
    packed = pack_documents([np.array([1, 2, 3, 9]), [], (5, 9)], seq_len=4, pad_id=7)
    np.testing.assert_array_equal(packed.tokens, [[1, 2, 3, 9], [5, 9, 7, 7]])
    np.testing.assert_array_equal(packed.loss_mask, [[0, 1, 1, 1], [0, 1, 0, 0]])
    np.testing.assert_array_equal(packed.segment_ids, [[1, 1, 1, 1], [1, 1, 0, 0]])

    long = pack_documents([list(range(1, 11))], seq_len=3, pad_id=0)  # 10 tokens over 4 rows
    np.testing.assert_array_equal(long.tokens, [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 0, 0]])
    np.testing.assert_array_equal(long.loss_mask, [[0, 1, 1], [0, 1, 1], [0, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(long.segment_ids, [[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 0, 0]])


def test_pack_documents_bad_input():
    with pytest.raises(DataError, match="seq_len must be an integer >= 2"):
        pack_documents([[1, 2]], seq_len=1, pad_id=0)
    with pytest.raises(DataError, match="pad_id"):
        pack_documents([[1, 2]], seq_len=4, pad_id=-1)
    with pytest.raises(DataError, match="document 1 has a negative token id -3"):
        pack_documents([[1, 2], [4, -3]], seq_len=4, pad_id=0)
    with pytest.raises(DataError, match="document 0 must be a 1-d"):
        pack_documents([[[1, 2]]], seq_len=4, pad_id=0)
    assert pack_documents([], seq_len=4, pad_id=0).tokens.shape == (0, 4)


def test_tokenize_dataset_appends_eos_and_skips_empty():
    tok = ByteTokenizer()
    ds = datasets.Dataset.from_dict({"text": ["ab", "", "é"]})
    docs = data_lib.tokenize_dataset(ds, tok, "text")
    assert [d.tolist() for d in docs] == [[97, 98, 256], [0xC3, 0xA9, 256]]
    assert all(d.dtype == np.int32 for d in docs)
    with pytest.raises(DataError, match="no text field 'content'"):
        data_lib.tokenize_dataset(ds, tok, "content")
    with pytest.raises(DataError, match="row 1 of text field 'text' is a int"):
        data_lib.tokenize_dataset([{"text": "a"}, {"text": 3}], tok, "text")


# --------------------------------------------------------------------------------------------------
# Batches of rows in memory (the grain loader in the order of per-epoch permutations)


def _rows(n=10):
    return {"x": np.arange(n, dtype=np.int32), "y": np.arange(n, dtype=np.int32)[:, None] * 10 + np.arange(3)}


def _batches(data, global_batch_size, **kwargs):
    return GrainBatches(data, global_batch_size, order="permutation", **kwargs)


def test_batches_follow_the_specified_order_and_are_deterministic():
    data = _rows(10)
    it = _batches(data, global_batch_size=4, seed=3)
    batches = [next(it)["x"] for _ in range(6)]
    # 2 full batches per epoch (2 rows left out each epoch); epoch e uses default_rng((seed, e)).
    for k, batch in enumerate(batches):
        epoch, j = divmod(k, 2)
        perm = np.random.default_rng((3, epoch)).permutation(10)
        np.testing.assert_array_equal(batch, perm[4 * j : 4 * j + 4])
    again = _batches(data, global_batch_size=4, seed=3)
    for batch in batches:
        b = next(again)
        np.testing.assert_array_equal(b["x"], batch)
        np.testing.assert_array_equal(b["y"], batch[:, None] * 10 + np.arange(3))
        assert b["x"].dtype == np.int32 and b["y"].dtype == data["y"].dtype
    other = [next(_batches(data, global_batch_size=4, seed=4))["x"] for _ in range(1)]
    assert not np.array_equal(other[0], batches[0])


def test_batches_roll_over_epochs():
    data = _rows(10)
    it = _batches(data, global_batch_size=4, seed=0)  # drop_remainder: 2 batches per epoch
    epochs = []
    for e in range(3):
        assert it.step == 2 * e
        rows = np.concatenate([next(it)["x"], next(it)["x"]])
        assert len(set(rows.tolist())) == 8  # no row twice within an epoch
        epochs.append(rows)
    assert not np.array_equal(epochs[0], epochs[1])  # each epoch reshuffles

    # Without drop_remainder the epochs form one stream: batch 2 ends epoch 0 and begins epoch 1.
    it = _batches(data, global_batch_size=4, seed=0, drop_remainder=False)
    p0, p1 = (np.random.default_rng((0, e)).permutation(10) for e in range(2))
    batches = [next(it)["x"] for _ in range(5)]  # 20 rows = exactly two epochs
    np.testing.assert_array_equal(batches[2], np.concatenate([p0[8:], p1[:2]]))
    assert Counter(np.concatenate(batches).tolist()) == {i: 2 for i in range(10)}

    # Without shuffling, rows come in order.
    it = _batches(data, global_batch_size=5, shuffle=False)
    assert [next(it)["x"].tolist() for _ in range(3)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(process_count):
    data = _rows(20)
    single = _batches(data, global_batch_size=8, seed=1)
    procs = [
        _batches(data, global_batch_size=8, seed=1, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]
    for _ in range(7):  # crosses epoch boundaries (2 batches per epoch)
        expected = next(single)
        parts = [next(it) for it in procs]
        assert all(part["x"].shape == (8 // process_count,) for part in parts)
        for name in ("x", "y"):
            np.testing.assert_array_equal(np.concatenate([part[name] for part in parts]), expected[name])


def test_resume_yields_the_remaining_batches_of_the_uninterrupted_run(tmp_path):
    tokens = np.arange(13 * 5, dtype=np.int32).reshape(13, 5)
    packed = PackedData(tokens, np.ones_like(tokens, np.float32), np.ones_like(tokens))
    full = _batches(packed, global_batch_size=4, seed=7)
    uninterrupted = [next(full)["tokens"] for _ in range(12)]

    # The position is saved as the checkpoint's grain item, the settings in its meta.
    first = _batches(packed, global_batch_size=4, seed=7)
    seen = [next(first)["tokens"] for _ in range(5)]
    state = {"x": jnp.zeros(2)}
    saver = RunCheckpoints(tmp_path / "ckpt", async_save=False, data_iterator=first.checkpoint_item)
    saver.save(5, state, {"data": first.state()})
    saver.close()
    resumed = _batches(packed, global_batch_size=4, seed=7)
    reader = RunCheckpoints(tmp_path / "ckpt", data_iterator=resumed.checkpoint_item)
    _, meta = reader.restore(5, state)
    reader.close()
    resumed.restore(json.loads(json.dumps(meta["data"])))
    assert resumed.step == 5 and meta["data"]["seed"] == 7
    rest = [next(resumed)["tokens"] for _ in range(7)]
    for got, want in zip(seen + rest, uninterrupted):
        np.testing.assert_array_equal(got, want)
    assert Counter(np.concatenate(seen + rest).ravel().tolist()) == Counter(
        np.concatenate(uninterrupted).ravel().tolist()
    )

    # The position counts global batches, the same on every process: a run saved by one process
    # resumes on two, and one saved by two (its files renamed so) resumes on one.
    halves = [_batches(packed, global_batch_size=4, seed=7, process_index=p, process_count=2) for p in range(2)]
    for it in halves:
        it.checkpoint_item.set_state(first.checkpoint_item.get_state())
    np.testing.assert_array_equal(np.concatenate([next(it)["tokens"] for it in halves]), uninterrupted[5])
    folder = tmp_path / "ckpt" / "5" / "data"
    saved = (folder / "process_0-of-1.json").read_text()
    (folder / "process_0-of-1.json").unlink()
    for p in range(2):
        (folder / f"process_{p}-of-2.json").write_text(saved)
    one = _batches(packed, global_batch_size=4, seed=7)
    reader = RunCheckpoints(tmp_path / "ckpt", data_iterator=one.checkpoint_item)
    reader.restore(5, state)
    np.testing.assert_array_equal(next(one)["tokens"], uninterrupted[5])
    (folder / "process_1-of-2.json").write_text(saved.replace("5", "6"))
    with pytest.raises(TrainingError, match=r"different data positions in \['process_0-of-2.json', 'process_1-of-2"):
        reader.restore(5, state)
    reader.close()


def test_batch_settings_errors():
    data = _rows(10)
    with pytest.raises(DataError, match="global_batch_size 6 is not divisible by process_count 4"):
        _batches(data, global_batch_size=6, process_count=4)
    with pytest.raises(DataError, match="process_index 2 must be < process_count 2"):
        _batches(data, global_batch_size=4, process_index=2, process_count=2)
    with pytest.raises(DataError, match="global_batch_size 12 exceeds the 10 rows"):
        _batches(data, global_batch_size=12)
    with pytest.raises(DataError, match="leading dimension"):
        _batches({"a": np.zeros(3), "b": np.zeros(4)}, global_batch_size=1)
    with pytest.raises(DataError, match="seed must be an integer >= 0"):
        _batches(data, global_batch_size=2, seed=-1)
    with pytest.raises(DataError, match="unknown batch order 'random'"):
        GrainBatches(data, 2, order="random")
    with pytest.raises(DataError, match="drop_remainder needs order='permutation'"):
        GrainBatches(data, 2, order="index_shuffle", drop_remainder=True)
    it = _batches(data, global_batch_size=2, seed=1)
    with pytest.raises(DataError, match="'seed' is 2 in the checkpoint but 1 in this run"):
        it.restore(dict(it.state(), seed=2))
    with pytest.raises(DataError, match="'order' is 'index_shuffle' in the checkpoint but 'permutation'"):
        it.restore(dict(it.state(), order="index_shuffle"))
    assert next(_batches(data, global_batch_size=12, drop_remainder=False))["x"].shape == (12,)


# --------------------------------------------------------------------------------------------------
# Loading text sources


def test_load_local_txt_jsonl_parquet(tmp_path):
    cache = str(tmp_path / "cache")
    txt = tmp_path / "corpus.txt"
    txt.write_text("first line\n\nsecond line\n")
    ds = data_lib.load_text_dataset(str(txt), cache_dir=cache)
    assert [t for t in ds["text"] if t] == ["first line", "second line"]

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"content": c, "id": i}) for i, c in enumerate(["alpha", "béta"])) + "\n")
    ds = data_lib.load_text_dataset(str(jsonl), text_field="content", cache_dir=cache)
    assert ds["content"] == ["alpha", "béta"]

    folder = tmp_path / "parquet"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": ["p0", "p1"]}).to_parquet(str(folder / "a.parquet"))
    datasets.Dataset.from_dict({"text": ["p2"]}).to_parquet(str(folder / "b.parquet"))
    ds = data_lib.load_text_dataset(str(folder), split="validation", cache_dir=cache)
    assert ds["text"] == ["p0", "p1", "p2"]

    packed = data_lib.build_train_data(str(jsonl), ByteTokenizer(), seq_len=8, text_field="content", cache_dir=cache)
    stream = list(b"alpha") + [256] + list("béta".encode()) + [256]  # 6 + 6 tokens
    np.testing.assert_array_equal(packed.tokens.ravel(), stream + [257] * 4)


def test_load_errors_name_the_problem(tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match="not found: .*missing.jsonl"):
        data_lib.load_text_dataset(str(tmp_path / "missing.jsonl"))
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match=r"no text field 'text'; its columns are \['content'\]"):
        data_lib.load_text_dataset(str(jsonl), cache_dir=cache)
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match="'text' .* is not a string column"):
        data_lib.load_text_dataset(str(numbers), cache_dir=cache)
    csv = tmp_path / "table.csv"
    csv.write_text("text\nx\n")
    with pytest.raises(DataError, match="unknown data file extension '.csv'"):
        data_lib.load_text_dataset(str(csv))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no"):
        data_lib.load_text_dataset(str(empty))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("x\n")
    (mixed / "b.jsonl").write_text(json.dumps({"text": "y"}) + "\n")
    with pytest.raises(DataError, match="mixes file kinds"):
        data_lib.load_text_dataset(str(mixed))
    with pytest.raises(DataError, match="'synthetic:N' with N a positive integer"):
        data_lib.load_text_dataset("synthetic:zero")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        data_lib.load_text_dataset("synthetic:3", split="dev")


def test_hub_names_go_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        if name == "owner/offline":
            raise ConnectionError("no network")
        return datasets.Dataset.from_dict({"text": ["hub doc"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = data_lib.load_text_dataset("owner/corpus", split="test")
    assert ds["text"] == ["hub doc"]
    assert calls[0][0] == "owner/corpus" and calls[0][1]["split"] == "test"
    with pytest.raises(DataError, match="cannot load dataset 'owner/offline' .*no network"):
        data_lib.load_text_dataset("owner/offline")


def test_synthetic_source():
    train = data_lib.load_text_dataset("synthetic:50")
    assert len(train) == 50 and train.column_names[:3] == ["prompt", "answer", "text"]
    assert train["text"] == data_lib.load_text_dataset("synthetic:50")["text"]
    validation = data_lib.load_text_dataset("synthetic:50", split="validation")
    assert train["prompt"] != validation["prompt"]  # another seed (the default task has only 100 prompts)
    chains = dict(form="assignments", min_hops=2, max_hops=3, num_distractors=1, ops=("+", "-"))
    train = data_lib.load_text_dataset("synthetic:50", synthetic_task=chains)
    validation = data_lib.load_text_dataset("synthetic:50", split="validation", synthetic_task=chains)
    assert all("?" in p for p in train["prompt"])
    assert len(set(train["prompt"]) & set(validation["prompt"])) < 5


# --------------------------------------------------------------------------------------------------
# Synthetic task


def _solve(prompt):
    """Independent evaluation of a prompt: (value of the queried variable, hops to reach it, names)."""
    match = re.fullmatch(r"(.+);([a-z])\?", prompt)
    assert match, prompt
    values, depth, names = {}, {}, []
    for statement in match.group(1).split(","):
        const = re.fullmatch(r"([a-z])=(\d)", statement)
        op = re.fullmatch(r"([a-z])=([a-z])([+\-*])(\d)", statement)
        if const:
            name, value, d = const.group(1), int(const.group(2)), 0
        else:
            assert op, statement
            name, source, sign, k = op.group(1), op.group(2), op.group(3), int(op.group(4))
            assert source in values, f"{source} used before it is defined in {prompt}"
            x = values[source]
            value = {"+": x + k, "-": x - k, "*": x * k}[sign] % 10
            d = depth[source] + 1
        names.append(name)
        values[name], depth[name] = value, d
    query = match.group(2)
    return values[query], depth[query], names


ASSIGNMENTS = dict(form="assignments", min_hops=2, max_hops=3, num_distractors=1, ops=("+", "-"), modulus=10)


def test_synthetic_dataset_is_deterministic_and_correct():
    config = synthetic.SyntheticTaskConfig(num_examples=300, seed=5, **ASSIGNMENTS)
    ds = synthetic.synthetic_reasoning_dataset(config)
    assert ds.to_dict() == synthetic.synthetic_reasoning_dataset(config).to_dict()
    other = synthetic.synthetic_reasoning_dataset(
        synthetic.SyntheticTaskConfig(num_examples=300, seed=6, **ASSIGNMENTS)
    )
    assert len(set(ds["prompt"]) & set(other["prompt"])) < 15
    lengths = []
    for prompt, answer, text, hops in zip(ds["prompt"], ds["answer"], ds["text"], ds["hops"]):
        value, depth, names = _solve(prompt)
        assert answer == str(value)
        assert depth == hops and 2 <= hops <= 3
        assert len(names) == len(set(names)) == hops + 1 + config.num_distractors
        assert text == prompt + answer + "\n"
        lengths.append(len(text))
    assert max(lengths) <= 34 and 24 <= np.mean(lengths) <= 32
    assert set(Counter(ds["hops"])) == {2, 3}
    assert len(set(ds["answer"])) == 10
    ops = Counter(c for p in ds["prompt"] for c in p if c in "+-*")
    assert set(ops) == {"+", "-"}


def test_synthetic_config_options_and_errors():
    config = synthetic.SyntheticTaskConfig(
        form="assignments", num_examples=40, min_hops=5, max_hops=5, num_distractors=3, ops=["*"], modulus=10, seed=1
    )
    assert config.ops == ("*",)
    ds = synthetic.synthetic_reasoning_dataset(config)
    for prompt, answer in zip(ds["prompt"], ds["answer"]):
        value, depth, names = _solve(prompt)
        assert (str(value), depth, len(names)) == (answer, 5, 9)
        assert "+" not in prompt and "-" not in prompt
    with pytest.raises(DataError, match="max_hops 1 is below min_hops 2"):
        synthetic.SyntheticTaskConfig(min_hops=2, max_hops=1)
    with pytest.raises(DataError, match="ops must be distinct operations"):
        synthetic.SyntheticTaskConfig(ops=("/",))
    with pytest.raises(DataError, match="27 variables"):
        synthetic.SyntheticTaskConfig(form="assignments", max_hops=20, num_distractors=6)
    with pytest.raises(DataError, match="the expression form has no distractors"):
        synthetic.SyntheticTaskConfig(form="expression", num_distractors=1)
    with pytest.raises(DataError, match="form must be one of"):
        synthetic.SyntheticTaskConfig(form="story")
    with pytest.raises(DataError, match="num_examples must be an integer >= 1"):
        synthetic.SyntheticTaskConfig(num_examples=0)


PROMPT_PATTERNS = {"expression": r"\d([+\-*]\d)*=", "chain": r"\d([+\-*]\d=)+"}


def _evaluate(prompt, modulus=10, form="expression"):
    """Independent evaluation of an expression prompt "d(op d)*=" or a chain prompt "d(op d=)+", each
    operation applied to the value so far: (value modulo `modulus`, operations)."""
    assert re.fullmatch(PROMPT_PATTERNS[form], prompt), prompt
    value, operations = int(prompt[0]), 0
    for sign, digit in re.findall(r"([+\-*])(\d)", prompt):
        value = {"+": value + int(digit), "-": value - int(digit), "*": value * int(digit)}[sign] % modulus
        operations += 1
    return value, operations


def test_synthetic_chain_form_is_the_default():
    """The default: one or two + or * modulo 5, each operation ending with '=' ("3+4=*2=" -> 4)."""
    default = synthetic.synthetic_reasoning_dataset(synthetic.SyntheticTaskConfig(num_examples=3000))
    assert all(re.fullmatch(r"\d[+*]\d=([+*]\d=)?", p) for p in default["prompt"])
    assert set(default["hops"]) == {1, 2} and set(default["answer"]) == set("01234")
    assert 0.45 < np.mean(np.array(default["hops"]) == 2) < 0.55  # hops drawn uniformly
    assert len(set(default["prompt"])) > 500  # most of the 50 + 500 lines appear
    for prompt, answer, text, hops in zip(default["prompt"], default["answer"], default["text"], default["hops"]):
        assert _evaluate(prompt, modulus=5, form="chain") == (int(answer), hops), prompt
        assert text == prompt + answer + "\n"
    assert "3+4=*2=" in default["prompt"] and default["answer"][default["prompt"].index("3+4=*2=")] == "4"

    config = synthetic.SyntheticTaskConfig(form="chain", num_examples=300, max_hops=4, ops="+-*", modulus=10, seed=3)
    ds = synthetic.synthetic_reasoning_dataset(config)
    assert ds.to_dict() == synthetic.synthetic_reasoning_dataset(config).to_dict()
    for prompt, answer, hops in zip(ds["prompt"], ds["answer"], ds["hops"]):
        assert _evaluate(prompt, modulus=10, form="chain") == (int(answer), hops), prompt
    assert set(ds["hops"]) == {1, 2, 3, 4} and len(set(ds["answer"])) == 10
    # The same draws as the expression form, written with an '=' after each operation.
    expression = synthetic.synthetic_reasoning_dataset(dataclasses.replace(config, form="expression"))
    assert [p.replace("=", "") for p in ds["prompt"]] == [p.replace("=", "") for p in expression["prompt"]]
    assert ds["answer"] == expression["answer"]
    with pytest.raises(DataError, match="min_hops must be >= 1 in the chain form"):
        synthetic.SyntheticTaskConfig(min_hops=0)
    with pytest.raises(DataError, match="the chain form has no distractors"):
        synthetic.SyntheticTaskConfig(num_distractors=1)


def test_synthetic_expression_form():
    one_operation = synthetic.SyntheticTaskConfig(form="expression", num_examples=2000, max_hops=1, modulus=10)
    default = synthetic.synthetic_reasoning_dataset(one_operation)
    assert all(re.fullmatch(r"\d[+*]\d=", p) for p in default["prompt"])  # one + or *
    assert set(default["hops"]) == {1} and len(set(default["answer"])) == 10
    assert len(set(default["prompt"])) > 195  # nearly all of the 200 sums and products appear
    for prompt, answer in zip(default["prompt"], default["answer"]):
        assert str(_evaluate(prompt)[0]) == answer, prompt

    config = synthetic.SyntheticTaskConfig(
        form="expression", num_examples=300, min_hops=0, max_hops=4, ops="+-*", modulus=10, seed=3
    )
    ds = synthetic.synthetic_reasoning_dataset(config)
    assert ds.to_dict() == synthetic.synthetic_reasoning_dataset(config).to_dict()
    for prompt, answer, text, hops in zip(ds["prompt"], ds["answer"], ds["text"], ds["hops"]):
        value, operations = _evaluate(prompt)
        assert (str(value), operations) == (answer, hops), prompt
        assert text == prompt + answer + "\n"
    assert set(ds["hops"]) == {0, 1, 2, 3, 4}
    assert set(c for p in ds["prompt"] for c in p if c in "+-*") == {"+", "-", "*"}

    mod5 = synthetic.synthetic_reasoning_dataset(
        synthetic.SyntheticTaskConfig(
            form="expression", num_examples=2000, min_hops=2, max_hops=2, ops="+-*", modulus=5, seed=4
        )
    )
    digits = {c for p in mod5["prompt"] for c in p if c.isdigit()}
    assert digits == {"0", "1", "2", "3", "4"} and set(mod5["answer"]) == digits
    assert len(set(mod5["prompt"])) > 850  # ~935 expected of the 5 * 3 * 5 * 3 * 5 = 1,125 expressions
    for prompt, answer in zip(mod5["prompt"], mod5["answer"]):
        assert str(_evaluate(prompt, modulus=5)[0]) == answer, prompt
    for bad in (1, 11):
        with pytest.raises(DataError, match="modulus must be"):
            synthetic.SyntheticTaskConfig(modulus=bad)


def test_exact_match_accuracy():
    assert synthetic.exact_match_accuracy(["1", " 2\n", "3"], ["1", "2", "4"]) == pytest.approx(2 / 3)
    with pytest.raises(DataError, match="2 predictions for 3 answers"):
        synthetic.exact_match_accuracy(["1", "2"], ["1", "2", "3"])


def _one_hot_next_token_logits(tokens, vocab_size):
    """Logits [B, S, V] whose argmax at s is tokens[:, s+1] (the last position points at token 0)."""
    following = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)  # [B, S]
    return np.eye(vocab_size, dtype=np.float32)[following]


def test_answer_batch_and_teacher_forced_exact_match():
    tok = ByteTokenizer()
    batch = synthetic.answer_batch(tok, ["a=1;a?", "b=2,c=b+1;c?"], ["1", "37"], seq_len=16)
    expected_first = list(b"a=1;a?1") + [257] * 9
    np.testing.assert_array_equal(batch["tokens"][0], expected_first)
    np.testing.assert_array_equal(batch["answer_mask"][0], [0] * 6 + [1] + [0] * 9)
    np.testing.assert_array_equal(batch["answer_mask"][1], [0] * 12 + [1, 1] + [0] * 2)
    np.testing.assert_array_equal(batch["prompt_lengths"], [6, 12])
    assert batch["tokens"].dtype == np.int32 and batch["answer_mask"].dtype == np.float32

    logits = _one_hot_next_token_logits(batch["tokens"], tok.vocab_size)
    np.testing.assert_array_equal(evaluation.teacher_forced_exact_match(logits, batch), [1.0, 1.0])

    # Wrong predictions outside the answer do not count ...
    wrong_prompt = logits.copy()
    wrong_prompt[:, 2] = np.eye(tok.vocab_size)[ord("x")]
    np.testing.assert_array_equal(evaluation.teacher_forced_exact_match(wrong_prompt, batch), [1.0, 1.0])
    # ... one wrong answer token (the second '7' of example 1, predicted at position 12) does.
    wrong_answer = logits.copy()
    wrong_answer[1, 12] = np.eye(tok.vocab_size)[ord("8")]
    np.testing.assert_array_equal(evaluation.teacher_forced_exact_match(wrong_answer, batch), [1.0, 0.0])
    # The first answer token is predicted from the last prompt position.
    wrong_first = logits.copy()
    wrong_first[0, 5] = np.eye(tok.vocab_size)[ord("2")]
    np.testing.assert_array_equal(evaluation.teacher_forced_exact_match(wrong_first, batch), [0.0, 1.0])


def test_pack_answer_examples_and_zero_hops():
    config = synthetic.SyntheticTaskConfig(
        form="assignments", num_examples=20, min_hops=0, max_hops=0, num_distractors=2
    )
    ds = synthetic.synthetic_reasoning_dataset(config)
    for prompt, answer in zip(ds["prompt"], ds["answer"]):
        value, depth, names = _solve(prompt)
        assert (str(value), depth, len(names)) == (answer, 0, 3)
    tok = ByteTokenizer()
    prompts, answers = ["a=1;a?", "b=2;b?", "b=2,c=b+1;c?"], ["1", "2", "37"]
    packed = synthetic.pack_answer_examples(tok, prompts, answers, seq_len=18)
    # Row 0: two whole examples of 9 tokens (prompt, answer, newline, eos); row 1: the third (16 tokens).
    np.testing.assert_array_equal(
        packed.tokens[0], tok.encode("a=1;a?1\n") + [tok.eos_id] + tok.encode("b=2;b?2\n") + [tok.eos_id]
    )
    np.testing.assert_array_equal(packed.loss_mask[0], ([0] * 6 + [1, 1, 0]) * 2)
    np.testing.assert_array_equal(packed.segment_ids[0], [1] * 9 + [2] * 9)
    np.testing.assert_array_equal(packed.loss_mask[1], [0] * 12 + [1, 1, 1, 0] + [0] * 2)
    np.testing.assert_array_equal(packed.segment_ids[1], [1] * 16 + [0] * 2)
    np.testing.assert_array_equal(packed.tokens[1, 16:], [tok.pad_id] * 2)
    assert next(GrainBatches(packed, 2, order="permutation"))["loss_mask"].sum() == 7
    with pytest.raises(DataError, match="example 2 has 16 tokens, more than seq_len 12"):
        synthetic.pack_answer_examples(tok, prompts, answers, seq_len=12)


def test_answer_batch_errors():
    tok = ByteTokenizer()
    with pytest.raises(DataError, match="example 1 has 9 prompt \\+ answer tokens, more than seq_len 8"):
        synthetic.answer_batch(tok, ["a=1;a?", "b=22;bb?"], ["1", "2"], seq_len=8)
    with pytest.raises(DataError, match="example 0 has an empty answer"):
        synthetic.answer_batch(tok, ["a=1;a?"], [""], seq_len=8)
    with pytest.raises(DataError, match="1 prompts for 2 answers"):
        synthetic.answer_batch(tok, ["a=1;a?"], ["1", "2"], seq_len=8)
    batch = synthetic.answer_batch(tok, ["a=1;a?"], ["1"], seq_len=8)
    with pytest.raises(DataError, match="do not match tokens"):
        evaluation.teacher_forced_exact_match(np.zeros((1, 7, 258), np.float32), batch)
