"""A corpus tokenized once into ArrayRecord shards and read by index with grain: the shards hold the
documents, rows pack as pack_documents packs them, batches split over processes, training on it resumes
exactly after a SIGKILL, two processes train as one, and bad input leaves nothing
behind (tiny sizes throughout)."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from processes import kill_after_checkpoint

from melt_jax.checkpoint import load_params
from melt_jax.data import ByteTokenizer, load_text_dataset, load_tokenizer, pack_documents, tokenize_dataset
from melt_jax.data.loader import GrainBatches
from melt_jax.data.tokenized import tokenize_to_shards
from melt_jax.data.tokenized_corpus import MANIFEST, PackedRows, TokenizedCorpus
from melt_jax.errors import DataError
from melt_jax.model import OuroConfig
from melt_jax.train.checkpointing import RunCheckpoints
from melt_jax.train.cli import main as train_main
from melt_jax.train.config import load_train_config
from melt_jax.train.trainer import run_stage

SEQ, BATCH = 32, 8
MODEL = OuroConfig.preset("tiny", vocab_size=258, hidden_size=32, intermediate_size=64, total_ut_steps=2)
TEXTS = ["", "héllo wörld", "a" * 70, "the quick brown fox", "x"]  # an empty one, multi-byte, longer than a row


def _write_corpus(folder, files=2, records=60):
    """`files` jsonl files of `records` records each, with a `text` and an `id` field."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for f in range(files):
        with open(folder / f"part{f}.jsonl", "w") as out:
            for i in range(records):
                words = " ".join(f"w{int(n)}" for n in rng.integers(0, 50, size=int(rng.integers(1, 30))))
                text = TEXTS[i] if f == 0 and i < len(TEXTS) else words
                out.write(json.dumps({"text": text, "id": i}) + "\n")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(text folder, tokenized folder, report): two jsonl files tokenized by two workers into shards of
    about 1 KB of text."""
    root = tmp_path_factory.mktemp("tokenized")
    text = _write_corpus(root / "text")
    report = tokenize_to_shards(str(text), root / "tokens", workers=2, piece_bytes=1024)
    return text, root / "tokens", report


@pytest.fixture(scope="module")
def model_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "config.json"
    path.write_text(MODEL.to_json_string())
    return str(path)


def stage_fields(out, source, model_json, *extra, mesh=("mesh.data=1", "mesh.num_devices=1")):
    return [
        "stage=looplm",
        f"output_dir={out}",
        f"model={model_json}",
        f"data.source={source}",
        f"data.seq_len={SEQ}",
        f"batch_size={BATCH}",
        "eval_batches=1",
        "progress=false",
        "log_every=1",
        "optimizer.learning_rate=3e-3",
        *mesh,
        *extra,
    ]


def assert_same_params(a, b, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------------
# Shards and rows


def test_shards_hold_the_documents_as_the_tokenizer_gives_them(corpus):
    text, tokens, report = corpus
    expected = tokenize_dataset(load_text_dataset(str(text)), ByteTokenizer())  # eos after each, "" skipped
    manifest = json.loads((tokens / MANIFEST).read_text())
    assert report.num_shards == len(manifest["shards"]) > 2  # several pieces per file, written by 2 workers
    assert manifest["tokenizer"]["fingerprint"] == "byte" and manifest["tokenizer"]["eos_id"] == 256
    assert manifest["num_documents"] == len(expected) == 2 * 60 - 1
    assert manifest["num_tokens"] == report.num_tokens == sum(map(len, expected))
    assert sum(s["tokens"] for s in manifest["shards"]) == report.num_tokens
    assert report.tokens_per_second > 0
    assert not [p.name for p in tokens.iterdir() if p.name.endswith(".lengths.npy")]

    corpus_docs = TokenizedCorpus(tokens).documents(0, manifest["num_documents"])
    assert len(corpus_docs) == len(expected)
    for i, (got, want) in enumerate(zip(corpus_docs, expected)):
        np.testing.assert_array_equal(got, want, err_msg=f"document {i}")
    assert ByteTokenizer().decode(corpus_docs[0]) == TEXTS[1]


def test_rows_pack_as_pack_documents(corpus):
    _, tokens, _ = corpus
    docs = TokenizedCorpus(tokens).documents(0, TokenizedCorpus(tokens).num_documents)
    for seq_len in (SEQ, 7):  # 7: most documents span several rows
        packed = pack_documents(docs, seq_len, pad_id=257)
        rows = PackedRows(TokenizedCorpus(tokens), seq_len, pad_id=257)
        assert len(rows) == packed.num_rows
        built = rows.rows(0, len(rows))
        for name, array in packed.as_dict().items():
            np.testing.assert_array_equal(built[name], array, err_msg=f"{name}, seq_len {seq_len}")
        tail = PackedRows(TokenizedCorpus(tokens), seq_len, 257, start=len(rows) - 3).rows(0, 3)
        np.testing.assert_array_equal(tail["tokens"], packed.tokens[-3:])


def test_batches_split_over_processes_cover_epochs_and_restore_from_a_checkpoint(corpus, tmp_path):
    _, tokens, _ = corpus
    rows = PackedRows(TokenizedCorpus(tokens), SEQ, 257)
    one = GrainBatches(rows, BATCH, seed=5)
    global_batches = [next(one) for _ in range(2 * len(rows) // BATCH + 1)]  # past two epochs
    halves = [GrainBatches(rows, BATCH, seed=5, process_index=p, process_count=2) for p in range(2)]
    for step, batch in enumerate(global_batches):
        parts = [next(h) for h in halves]
        for name in batch:
            np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), batch[name], err_msg=str(step))
    # Each epoch visits every row once, in its own order.
    epoch_rows = len(rows) // BATCH * BATCH
    stream = np.concatenate([b["tokens"] for b in global_batches])
    first, second = stream[: len(rows)], stream[len(rows) : 2 * len(rows)]
    assert len(np.unique(first, axis=0)) == len(np.unique(rows.rows(0, len(rows))["tokens"], axis=0))
    assert not np.array_equal(first[:epoch_rows], second[:epoch_rows])

    # The position saved with a checkpoint, restored into a fresh loader.
    loader = GrainBatches(rows, BATCH, seed=5)
    for _ in range(3):
        next(loader)
    state = {"x": jnp.zeros(2)}
    saver = RunCheckpoints(tmp_path / "ckpt", async_save=False, data_iterator=loader.checkpoint_item)
    saver.save(3, state, {"data": loader.state()})
    saver.close()
    expected = [next(loader) for _ in range(2)]
    fresh = GrainBatches(rows, BATCH, seed=5)
    reader = RunCheckpoints(tmp_path / "ckpt", data_iterator=fresh.checkpoint_item)
    _, meta = reader.restore(3, state)
    reader.close()
    fresh.restore(meta["data"])
    assert fresh.step == 3
    for got, want in zip([next(fresh) for _ in range(2)], expected):
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
    with pytest.raises(DataError, match="'seed' is 5 in the checkpoint but 6"):
        GrainBatches(rows, BATCH, seed=6).restore(meta["data"])


# --------------------------------------------------------------------------------------------------
# Training on a tokenized corpus


def test_killed_run_on_a_tokenized_corpus_resumes_exactly(corpus, tmp_path, model_json):
    """SIGKILL a process saving asynchronously after every step; the resumed run equals an
    uninterrupted one: same batches (digest), same params (the constant schedule makes params after N
    steps independent of the total). The grain position is an item of the checkpoint."""
    _, tokens, _ = corpus
    out = tmp_path / "killed"
    base = ["optimizer.schedule=constant", "checkpoint_every=1", "keep_checkpoints=3"]
    fields = stage_fields(out, tokens, model_json, *base)
    proc = kill_after_checkpoint(fields, out / "checkpoints", step=4)
    assert proc.returncode == -signal.SIGKILL
    latest = RunCheckpoints(out / "checkpoints").latest_step()
    position = json.loads((out / "checkpoints" / str(latest) / "data" / "process_0-of-1.json").read_text())
    assert position["next_index"] == latest
    total = f"steps={latest + 2}"
    resumed = run_stage(load_train_config(None, [*fields, total]), accept_changes=True, log=lambda _: None)
    whole = run_stage(
        load_train_config(None, stage_fields(tmp_path / "whole", tokens, model_json, *base, total)), log=lambda _: None
    )
    assert resumed.steps == whole.steps == latest + 2
    assert resumed.batch_digest == whole.batch_digest
    assert_same_params(load_params(resumed.model_dir)[1], load_params(whole.model_dir)[1])
    assert whole.evaluation["num_tokens"] > 0  # on held-out rows: the corpus's last ones


def test_two_processes_on_a_tokenized_corpus_equal_one(corpus, tmp_path, model_json):
    _, tokens, _ = corpus
    from test_training import _free_port

    port = _free_port()
    # Gradients reduced across processes round differently from one process's reduction; Adam turns
    # such noise at near-zero gradient entries into lr-sized steps unless eps is large enough.
    fields = ["steps=3", "eval_batches=0", "optimizer.eps=1e-3"]
    mesh = ["mesh.data=2", "mesh.num_devices=2"]  # two processes of one device each, or one of two
    two = stage_fields(tmp_path / "two", tokens, model_json, *fields, mesh=mesh)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "melt_jax.train", "stage", *two]
            + ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    one = run_stage(load_train_config(None, stage_fields(tmp_path / "one", tokens, model_json, *fields, mesh=mesh)))
    assert_same_params(load_params(tmp_path / "two" / "model")[1], load_params(one.model_dir)[1], atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Bad input


def _word_level_tokenizer(path):
    vocab = {"[UNK]": 0, "<|endoftext|>": 1, "hello": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def test_bad_input_is_named_and_leaves_no_output(corpus, tmp_path, model_json, capsys):
    text, tokens, _ = corpus
    out = tmp_path / "out"
    with pytest.raises(DataError, match="data file or folder not found"):
        tokenize_to_shards(str(tmp_path / "missing.jsonl"), out)
    with pytest.raises(DataError, match=r"byte \d+ of .*part0.jsonl has no text field 'body'; its fields are"):
        tokenize_to_shards(str(text), out, text_field="body", workers=2, piece_bytes=1024)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"text field 'text' of byte 17 of .*a.jsonl is a int"):
        tokenize_to_shards(str(bad), out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no temporary folders

    # The command line: exit status 2, the message, and no output folder.
    assert train_main(["tokenize", str(text), str(out), "--text-field", "body"]) == 2
    assert "has no text field 'body'" in capsys.readouterr().err
    assert not out.exists()
    assert train_main(["tokenize", str(text), str(out), "--workers", "1"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    assert train_main(["tokenize", str(text), str(out)]) == 2  # exists already
    assert "already exists" in capsys.readouterr().err

    # A run whose tokenizer is not the corpus's.
    tokenizer = _word_level_tokenizer(tmp_path / "tokenizer.json")
    assert load_tokenizer(tokenizer).vocab_size == 3
    fields = stage_fields(tmp_path / "run", tokens, model_json, "steps=1", f"data.tokenizer={tokenizer}")
    cfg = load_train_config(None, fields)
    with pytest.raises(DataError, match="was made with tokenizer 'byte'.*the run's tokenizer is"):
        run_stage(cfg, log=lambda _: None)
