"""The embedded default task: chained single-digit assignments, generated on the machine.

Each example is a short program of comma-separated assignments followed by a query:

    prompt  "k=3,q=k+4,x=7,m=q-2;m?"     answer "5"      text "k=3,q=k+4,x=7,m=q-2;m?5\\n"

The chain starts from a digit and applies `hops` operations (+, -, optionally *) with digit operands,
all modulo 10; the query asks for the last variable of the chain. Variable names are drawn from a
shuffled alphabet per example, and `num_distractors` extra assignments (a digit, or an operation on a
variable defined before them) are inserted at random places. Answering takes one sequential step per
hop, which is the kind of computation more loops of a looped model can supply. At the default
setting (2-3 hops, one distractor, + and -) lines are about 30 bytes. `min_hops=0` adds pure look-up
examples ("k=3,x=7;k?" -> "3"), the easiest level. In one CPU run of the tiny preset (H=64, 2 layers,
4 loops, batches of 32, loss on the answers only via `pack_answer_examples`), look-ups reached about
60% exact match (chance 10%) within 200-400 steps, which is what the shortcut "answer the digit of
the last literal assignment" scores with two distractors (0.634): distractors are often operations,
so the queried digit is often the last literal one. Chains of one hop or more were still at chance
after 1,100 steps with two layers; one layer, one hop and no distractors gave 0.35 at loop 1 and
0.49 at loops 2-4 after 1,000 steps. Chains need longer training than look-ups.

`answer_batch` and `teacher_forced_exact_match` score a model on the answers without decoding: the
answer is predicted exactly under greedy decoding iff every answer token is the argmax of the logits
at the position before it.
"""

from __future__ import annotations

import dataclasses
import itertools
import string
from collections.abc import Mapping, Sequence

import datasets
import jax
import jax.numpy as jnp
import numpy as np

from melt_jax.data import DataError, PackedData
from melt_jax.evaluation import answer_matches
from melt_jax.tokenizer import Tokenizer

OPERATIONS = {
    "+": lambda x, y: (x + y) % 10,
    "-": lambda x, y: (x - y) % 10,
    "*": lambda x, y: (x * y) % 10,
}
VARIABLE_NAMES = string.ascii_lowercase


@dataclasses.dataclass(frozen=True)
class SyntheticTaskConfig:
    """Settings of the chained-assignment task.

    num_examples     number of examples
    min_hops         fewest operations in the queried chain (0: the query names a digit assignment)
    max_hops         most operations in the queried chain (inclusive)
    num_distractors  assignments per example that the answer does not depend on
    ops              operations to draw from, a subset of ("+", "-", "*"), applied modulo 10
    seed             seed of the generator (use different seeds for train and eval)
    """

    num_examples: int = 10_000
    min_hops: int = 2
    max_hops: int = 3
    num_distractors: int = 1
    ops: tuple[str, ...] = ("+", "-")
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "ops", tuple(self.ops))
        for name, minimum in (
            ("num_examples", 1),
            ("min_hops", 0),
            ("max_hops", 0),
            ("num_distractors", 0),
            ("seed", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise DataError(f"SyntheticTaskConfig.{name} must be an integer >= {minimum}, got {value!r}")
        if self.max_hops < self.min_hops:
            raise DataError(f"SyntheticTaskConfig.max_hops {self.max_hops} is below min_hops {self.min_hops}")
        num_variables = self.max_hops + 1 + self.num_distractors
        if num_variables > len(VARIABLE_NAMES):
            raise DataError(
                f"SyntheticTaskConfig needs max_hops + 1 + num_distractors = {num_variables} variables, "
                f"more than the {len(VARIABLE_NAMES)} letters"
            )
        unknown = [op for op in self.ops if op not in OPERATIONS]
        if not self.ops or unknown or len(set(self.ops)) != len(self.ops):
            raise DataError(
                f"SyntheticTaskConfig.ops must be distinct operations from {list(OPERATIONS)}, got {self.ops!r}"
            )


# --------------------------------------------------------------------------------------------------
# Generation


def _defined_variable(statement: str) -> str:
    return statement.split("=", 1)[0]


def generate_example(rng: np.random.Generator, config: SyntheticTaskConfig) -> tuple[str, str, int]:
    """One example drawn with `rng`: (prompt, answer, hops)."""
    hops = int(rng.integers(config.min_hops, config.max_hops + 1))
    letters = rng.permutation(len(VARIABLE_NAMES))[: hops + 1 + config.num_distractors]
    names = [VARIABLE_NAMES[i] for i in letters]
    chain, distractors = names[: hops + 1], names[hops + 1 :]

    value = int(rng.integers(10))
    statements = [f"{chain[0]}={value}"]
    for previous, name in itertools.pairwise(chain):
        op = config.ops[int(rng.integers(len(config.ops)))]
        operand = int(rng.integers(10))
        value = OPERATIONS[op](value, operand)
        statements.append(f"{name}={previous}{op}{operand}")

    for name in distractors:
        position = int(rng.integers(len(statements) + 1))
        defined = [_defined_variable(s) for s in statements[:position]]
        if defined and rng.random() < 0.5:  # an operation on a variable defined before it
            source = defined[int(rng.integers(len(defined)))]
            op = config.ops[int(rng.integers(len(config.ops)))]
            statements.insert(position, f"{name}={source}{op}{int(rng.integers(10))}")
        else:
            statements.insert(position, f"{name}={int(rng.integers(10))}")

    prompt = ",".join(statements) + f";{chain[-1]}?"
    return prompt, str(value), hops


def synthetic_reasoning_dataset(config: SyntheticTaskConfig = SyntheticTaskConfig()) -> datasets.Dataset:
    """`config.num_examples` examples with columns `prompt` (ends right before the answer), `answer`,
    `text` (prompt + answer + newline) and `hops`; the same for the same config."""
    rng = np.random.default_rng(config.seed)
    prompts, answers, hops = [], [], []
    for _ in range(config.num_examples):
        prompt, answer, n = generate_example(rng, config)
        prompts.append(prompt)
        answers.append(answer)
        hops.append(n)
    texts = [p + a + "\n" for p, a in zip(prompts, answers)]
    return datasets.Dataset.from_dict({"prompt": prompts, "answer": answers, "text": texts, "hops": hops})


# --------------------------------------------------------------------------------------------------
# Scoring


def exact_match_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of predictions equal to their answer after stripping surrounding whitespace."""
    if len(predictions) != len(answers):
        raise DataError(f"exact_match_accuracy got {len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise DataError("exact_match_accuracy got no answers")
    hits = sum(p.strip() == a.strip() for p, a in zip(predictions, answers))
    return hits / len(answers)


def answer_batch(
    tokenizer: Tokenizer, prompts: Sequence[str], answers: Sequence[str], seq_len: int
) -> dict[str, np.ndarray]:
    """Prompt + answer token rows for teacher-forced scoring.

    tokens          int32 [B, S]    ids of prompt then answer (tokenized separately), right-padded
                                    with the tokenizer's pad id
    answer_mask     float32 [B, S]  1 exactly at the answer tokens
    prompt_lengths  int32 [B]       number of prompt tokens (the first answer position)
    """
    if len(prompts) != len(answers):
        raise DataError(f"answer_batch got {len(prompts)} prompts for {len(answers)} answers")
    if not prompts:
        raise DataError("answer_batch got no examples")
    tokens = np.full((len(prompts), seq_len), tokenizer.pad_id, np.int32)  # [B, S]
    answer_mask = np.zeros((len(prompts), seq_len), np.float32)  # [B, S]
    prompt_lengths = np.zeros(len(prompts), np.int32)  # [B]
    for b, (prompt, answer) in enumerate(zip(prompts, answers)):
        prompt_ids, answer_ids = tokenizer.encode(prompt), tokenizer.encode(answer)
        if not prompt_ids:
            raise DataError(f"example {b} has an empty prompt; the first answer token needs a token before it")
        if not answer_ids:
            raise DataError(f"example {b} has an empty answer {answer!r}")
        length = len(prompt_ids) + len(answer_ids)
        if length > seq_len:
            raise DataError(f"example {b} has {length} prompt + answer tokens, more than seq_len {seq_len}: {prompt!r}")
        tokens[b, :length] = prompt_ids + answer_ids
        answer_mask[b, len(prompt_ids) : length] = 1.0
        prompt_lengths[b] = len(prompt_ids)
    return {"tokens": tokens, "answer_mask": answer_mask, "prompt_lengths": prompt_lengths}


def pack_answer_examples(tokenizer: Tokenizer, prompts: Sequence[str], answers: Sequence[str], seq_len: int) -> PackedData:
    """Training rows with the loss on the answers only: whole examples (prompt, answer, newline, eos)
    packed back to back into rows of `seq_len` tokens, none split across rows; loss_mask is 1 at the
    answer tokens and the newline after them, segment_ids number the examples of a row from 1."""
    rows: list[tuple[list[int], list[float], list[int]]] = []
    tokens: list[int] = []
    mask: list[float] = []
    segments: list[int] = []
    for b, (prompt, answer) in enumerate(zip(prompts, answers)):
        prompt_ids, answer_ids = tokenizer.encode(prompt), tokenizer.encode(answer + "\n")
        example = prompt_ids + answer_ids + [tokenizer.eos_id]
        if not prompt_ids:
            raise DataError(f"example {b} has an empty prompt; the first answer token needs a token before it")
        if len(example) > seq_len:
            raise DataError(f"example {b} has {len(example)} tokens, more than seq_len {seq_len}: {prompt!r}")
        if len(tokens) + len(example) > seq_len:
            rows.append((tokens, mask, segments))
            tokens, mask, segments = [], [], []
        segment = (segments[-1] if segments else 0) + 1
        tokens += example
        mask += [0.0] * len(prompt_ids) + [1.0] * len(answer_ids) + [0.0]
        segments += [segment] * len(example)
    if tokens:
        rows.append((tokens, mask, segments))

    def padded(values: list[list], fill, dtype) -> np.ndarray:
        return np.array([row + [fill] * (seq_len - len(row)) for row in values], dtype)  # [N, S]

    return PackedData(
        tokens=padded([r[0] for r in rows], tokenizer.pad_id, np.int32),
        loss_mask=padded([r[1] for r in rows], 0.0, np.float32),
        segment_ids=padded([r[2] for r in rows], 0, np.int32),
    )


def teacher_forced_exact_match(logits: jax.Array, batch: Mapping[str, jax.Array | np.ndarray]) -> jax.Array:
    """Per example, 1.0 if argmax(logits[b, s-1]) == tokens[b, s] at every s where answer_mask is 1,
    else 0.0: float32 [B]. logits [B, S, V]; batch as made by `answer_batch`."""
    tokens = jnp.asarray(batch["tokens"])  # [B, S]
    mask = jnp.asarray(batch["answer_mask"])  # [B, S]
    if logits.ndim != 3 or logits.shape[:2] != tokens.shape:
        raise DataError(
            f"logits of shape {logits.shape} do not match tokens of shape {tokens.shape} (expected [B, S, V])"
        )
    return answer_matches(logits, tokens, mask).astype(jnp.float32)
