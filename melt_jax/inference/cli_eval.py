"""melt-eval: per-loop loss of a melt_jax checkpoint on a dataset, with perplexity on text, and per-loop
answer loss and teacher-forced answer accuracy where the dataset has prompt/answer columns (the synthetic
task does): the metrics of the training program's held-out evaluation, defined once in
melt_jax.inference.evaluation. Loops are numbered from 0 (the first pass) to T-1, as --exit loop:N.

    melt-eval --checkpoint CKPT --tokenizer byte --data synthetic:512 --split validation
    melt-eval --checkpoint runs/pipeline/melt_phase2/model --tokenizer byte --data synthetic:512 --isolate-documents
    melt-eval --checkpoint CKPT --tokenizer byte --data synthetic:512 --form assignments --hops 2 --distractors 1
    melt-eval --checkpoint CKPT --tokenizer tokenizer.json --data notes.txt --seq-len 512 --json

--data takes what the training program reads (melt_jax.data.pipeline.load_text_dataset): "synthetic[:N]" or a
local .txt / .json / .jsonl / .parquet file or folder; --form, --hops, --distractors, --ops and --modulus set the
synthetic task (default: melt_jax.data.synthetic's defaults, the training pipeline's task). Loss: documents
are tokenized with eos and packed into rows of --seq-len tokens as in training (melt_jax.data.pipeline), every
token's prediction scored except the first of each document; with --isolate-documents each token attends
only within its document (as the pipeline's models were trained), else to every earlier token of its row.
Accuracy: each prompt + answer is one row, and an example counts as correct when every answer token is
the argmax at the position before it, i.e. when greedy decoding after the prompt reproduces the answer
(melt_jax.inference.evaluation.answer_accuracy). MELT is evaluated in chunks of --chunk-size (default its
config's chunk size). On a dataset with prompt/answer columns the loss over all tokens ("loss") is
shown without perplexity: its prompts are random digits that no model predicts, and a model trained on
the answers (data.loss=answer) is not trained on them; the answer loss ("answers", tokens_scored
"answer") is what melt-train's held-out evaluation reports for the synthetic task. Errors:
`melt-eval: error: ...` on stderr, exit 2 for bad input, 1 for a failure at run time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from melt_jax.data.pipeline import load_text_dataset, pack_documents, tokenize_dataset
from melt_jax.data.synthetic import answer_batch
from melt_jax.errors import DataError, MeltJaxError, exit_status
from melt_jax.inference.evaluation import evaluate_dataset
from melt_jax.inference.model_loading import add_loading_arguments, checkpoint_tokenizer, load_model
from melt_jax.model.exit import ExitPolicy

PROG = "melt-eval"


def fixed_size_batches(arrays: Mapping[str, np.ndarray], batch_size: int, max_batches: int | None) -> Iterator[dict]:
    """Batches of `batch_size` rows of `arrays` (each [N, ...]); the last one is filled up with copies
    of row 0 that `row_mask` and a zero loss mask leave out, so that every batch has one shape."""
    num_rows = len(next(iter(arrays.values())))
    for count, start in enumerate(range(0, num_rows, batch_size)):
        if max_batches is not None and count >= max_batches:
            return
        rows = np.arange(start, start + batch_size)
        real = rows < num_rows
        batch = {name: array[np.where(real, rows, 0)] for name, array in arrays.items()}
        for name in ("loss_mask", "answer_mask"):
            if name in batch:
                batch[name] = batch[name] * real[:, None]
        yield dict(batch, row_mask=real)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_loading_arguments(p)
    p.add_argument("--data", required=True, help="'synthetic[:N]' or a local .txt/.json/.jsonl/.parquet file or folder")
    p.add_argument("--split", default="validation", help="split name (selects the synthetic task's seed)")
    p.add_argument(
        "--form",
        default=None,
        help="synthetic task: 'chain' (3+4=*2=, the default), 'expression' (3+4*2=) or 'assignments' (k=3,q=k+4;q?)",
    )
    p.add_argument("--hops", type=int, default=None, help="synthetic task: operations per example")
    p.add_argument("--distractors", type=int, default=None, help="synthetic task (assignments): unrelated assignments")
    p.add_argument("--ops", default=None, help="synthetic task: operations to draw from, e.g. '+-*'")
    p.add_argument("--modulus", type=int, default=None, help="synthetic task: digits below it, operations modulo it")
    p.add_argument(
        "--isolate-documents",
        action="store_true",
        help="loss on packed text: each token attends only within its document (for models trained with "
        "data.isolate_documents=true, such as the pipeline's)",
    )
    p.add_argument("--text-field", default="text")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches of each kind")
    p.add_argument(
        "--exit", default="last", help="last | loop:N (0-based; step:N also read) | threshold:X | weighted | default"
    )
    p.add_argument("--chunk-size", type=int, default=None, help="MELT's evaluation chunk (default: config.chunk_size)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    return p


def _check_sizes(args: argparse.Namespace) -> None:
    for name in ("seq_len", "batch_size", "max_batches", "chunk_size"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "seq_len" else 1):
            raise DataError(f"--{name.replace('_', '-')} must be >= {2 if name == 'seq_len' else 1}, got {value}")


def _task(args: argparse.Namespace) -> dict:
    """The synthetic task fields set by --form / --hops / --distractors / --ops / --modulus."""
    task = {}
    if args.form is not None:
        task.update(form=args.form)
    if args.hops is not None:
        task.update(min_hops=args.hops, max_hops=args.hops)
    if args.distractors is not None:
        task.update(num_distractors=args.distractors)
    if args.ops is not None:
        task.update(ops=tuple(args.ops))
    if args.modulus is not None:
        task.update(modulus=args.modulus)
    if task and not args.data.startswith("synthetic"):
        raise DataError(
            "--form / --hops / --distractors / --ops / --modulus apply to the synthetic task, "
            f"not to --data {args.data}"
        )
    return task


def evaluate(args: argparse.Namespace) -> dict:
    """The results dict: 'loss' (evaluation.evaluate_dataset on packed text) and, for datasets with
    prompt/answer columns, 'answers' (the same on answer rows, loss over the answer tokens)."""
    _check_sizes(args)
    tokenizer = checkpoint_tokenizer(args.checkpoint, args.tokenizer)
    model, params = load_model(args.checkpoint, args.dtype, attention=args.attention)
    policy = ExitPolicy.parse(args.exit, model.config)
    dataset = load_text_dataset(args.data, split=args.split, text_field=args.text_field, synthetic_task=_task(args))
    packed = pack_documents(tokenize_dataset(dataset, tokenizer, args.text_field), args.seq_len, tokenizer.pad_id)
    if packed.num_rows == 0:
        raise DataError(f"data source {args.data!r} has no text to evaluate")
    arrays = {"tokens": packed.tokens, "loss_mask": packed.loss_mask}
    if args.isolate_documents:
        arrays["segment_ids"] = packed.segment_ids
    batches = fixed_size_batches(arrays, args.batch_size, args.max_batches)
    results = {"loss": evaluate_dataset(model, params, batches, policy, args.chunk_size, "all")}
    if {"prompt", "answer"} <= set(dataset.column_names):
        for key in ("perplexity", "perplexity_per_loop"):
            results["loss"].pop(key)
        rows = answer_batch(tokenizer, dataset["prompt"], dataset["answer"], args.seq_len)
        arrays = {"tokens": rows["tokens"], "loss_mask": rows["answer_mask"], "answer_mask": rows["answer_mask"]}
        batches = fixed_size_batches(arrays, args.batch_size, args.max_batches)
        results["answers"] = evaluate_dataset(model, params, batches, policy, args.chunk_size, "answer")
    return results


def report(results: dict) -> str:
    """A plain-text table of the results, loops numbered from 0."""
    loss = results["loss"]
    if "answers" not in results:
        lines = ["loop  loss     perplexity   (all tokens)"]
        for t, (value, ppl) in enumerate(zip(loss["loss_per_loop"], loss["perplexity_per_loop"])):
            lines.append(f"{t:<5} {value:<8.4f} {ppl:.3f}")
        lines.append(f"exit  {loss['loss']:<8.4f} {loss['perplexity']:.3f}   ({loss['num_tokens']:.0f} tokens)")
        return "\n".join(lines)
    answers = results["answers"]
    lines = ["loop  answer loss  answer accuracy"]
    for t, (value, acc) in enumerate(zip(answers["loss_per_loop"], answers["accuracy_per_loop"])):
        lines.append(f"{t:<5} {value:<12.4f} {acc:.4f}")
    lines.append(
        f"exit  {answers['loss']:<12.4f} {answers['accuracy']:.4f}   ({answers['num_tokens']:.0f} answer tokens, "
        f"{answers['num_examples']} examples)"
    )
    per_loop = " ".join(f"{x:.4f}" for x in loss["loss_per_loop"])
    lines.append(f"loss over all tokens, prompts included, per loop: {per_loop} ({loss['num_tokens']:.0f} tokens)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = evaluate(args)
    except (MeltJaxError, OSError) as e:
        return exit_status(PROG, e)
    print(json.dumps(results, indent=2) if args.json else report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
