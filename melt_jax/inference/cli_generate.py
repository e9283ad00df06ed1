"""melt-generate: text generation from a melt_jax checkpoint (Ouro or MELT).

    melt-generate --checkpoint CKPT --tokenizer byte --prompt "3*4=" --max-new-tokens 4
    melt-generate --checkpoint CKPT --tokenizer path/to/tokenizer.json --chat --prompt "Hi" \
        --temperature 0.7 --top-p 0.9 --seed 1 --exit threshold:0.9
    melt-generate --checkpoint CKPT --tokenizer byte --prompt "3*4=" --speculative 1,4

`--speculative d,k` decodes greedily by self-speculation (melt_jax/inference/speculative.py): rounds
that draft k tokens with the first d loops and verify them with all loops; it takes no --temperature,
--exit or --exit-skip.

One prompt is streamed to stdout as it is generated; several (--prompt repeated, or --prompt-file with
one prompt per line) are generated as one padded batch and printed in order. Generation stops at the
tokenizer's eos token, at any --stop string, and with --chat at `<|im_end|>` (the prompt is wrapped in
the ChatML template of the Ouro Thinking models). Timing goes to stderr at the end. Bad input is
reported on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from melt_jax.data.tokenizer import Tokenizer, load_tokenizer
from melt_jax.errors import DataError, GenerationError, MeltJaxError
from melt_jax.inference.generation import GenerationResult, generate
from melt_jax.inference.model_loading import load_model, parse_exit_policy
from melt_jax.inference.sampling import SamplingConfig
from melt_jax.inference.speculative import SpeculativeResult, generate_speculative
from melt_jax.inference.text_settings import cut_at_stops, stop_ids_for, vocab_limit_for
from melt_jax.model.params import param_bytes

PROG = "melt-generate"
CHAT_END = "<|im_end|>"
STREAM_STEPS = 4  # decode steps between two prints when streaming


def chat_prompt(text: str) -> str:
    """`text` as one user turn of the ChatML template, followed by the assistant's turn opening."""
    return f"<|im_start|>user\n{text}{CHAT_END}\n<|im_start|>assistant\n"


class TextStream:
    """Turns the growing decoded text of one row into pieces safe to print: nothing that a later token
    may still change (a partial UTF-8 character at the end) or that may be the start of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) - 1 for s in self.stops), default=0)
        self.printed = 0

    def update(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(new text to print, whether a stop string was reached) for the decoded text so far."""
        text, stopped = cut_at_stops(text, self.stops)
        if not (final or stopped):
            text = text.rstrip("\ufffd")
            text = text[: max(len(text) - self.hold, self.printed)]
        piece, self.printed = text[self.printed :], max(len(text), self.printed)
        return piece, stopped


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="melt_jax checkpoint directory (Ouro or MELT)")
    p.add_argument("--tokenizer", required=True, help="'byte', or a tokenizer.json file or its folder")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-file", type=Path, help="file with one prompt per line (blank lines skipped)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the ChatML template, stop at <|im_end|>")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of every prompt's draws (a prompt samples the same alone or in a batch)",
    )
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--exit", default="last", help="last | loop:N (0-based; step:N also read) | threshold:X | weighted | default"
    )
    p.add_argument(
        "--exit-skip",
        action="store_true",
        help="decode steps stop computing loops after each token's exit loop (--exit loop:N or threshold:X)",
    )
    p.add_argument(
        "--speculative",
        default=None,
        metavar="D,K",
        help="greedy self-speculative decoding: draft K tokens per round with the first D loops, verify with all",
    )
    p.add_argument("--prefill-chunk", type=int, default=None, help="prefill chunk (MELT default: config.chunk_size)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="cast the weights")
    p.add_argument(
        "--int8",
        action="store_true",
        help="int8 matmul weights with per-channel scales (weight-only; activations in --dtype, or as saved)",
    )
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        try:
            lines = args.prompt_file.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise GenerationError(f"cannot read --prompt-file: {e}") from None
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise GenerationError("no prompt given: use --prompt TEXT or --prompt-file FILE")
    return prompts


def stop_token_ids(tokenizer: Tokenizer, stops: Sequence[str], chat: bool) -> tuple[int, ...]:
    """The eos id, `<|im_end|>` with --chat, and the stop strings that are one token."""
    ids = stop_ids_for(tokenizer, stops)
    if chat:
        try:
            ids.add(tokenizer.token_to_id(CHAT_END))
        except DataError:
            raise GenerationError(f"--chat needs a tokenizer with the {CHAT_END} token") from None
    return tuple(sorted(ids))


def parse_speculative(text: str) -> tuple[int, int]:
    """(draft loops d, block k) from "d,k"; GenerationError otherwise (the ranges are checked by
    generate_speculative)."""
    try:
        d, k = (int(part) for part in text.split(","))
    except ValueError:
        raise GenerationError(f"--speculative takes D,K (draft loops, tokens per round), got {text!r}") from None
    return d, k


def timing_line(result: GenerationResult) -> str:
    t = result.timing
    new_tokens = sum(len(row) for row in result.tokens)
    if isinstance(result, SpeculativeResult):
        s = result.stats
        steps = (
            f"{s.rounds} rounds, {s.accepted}/{s.drafted} drafted tokens accepted ({s.acceptance_rate:.2f}), "
            f"{t.loops_per_step:.2f} loops per round"
        )
    else:
        steps = f"{t.loops_per_step:.2f} loops per decode step"
    return (
        f"{new_tokens} new tokens for {len(result.tokens)} prompt(s); decode {t.decode_tokens_per_s:.1f} tokens/s "
        f"({t.decode_tokens} tokens in {t.decode_s:.3f} s); prefill {t.prompt_tokens} tokens in {t.prefill_s:.3f} s; "
        f"compile {t.compile_s:.1f} s; {steps}; stop: {', '.join(result.stop_reasons)}"
    )


def check_speculative_args(args: argparse.Namespace) -> None:
    """GenerationError for the options --speculative does not take (it is greedy, all loops verify)."""
    if args.temperature != 0:
        raise GenerationError(f"--speculative is greedy only: --temperature must be 0, got {args.temperature}")
    if args.exit != "last" or args.exit_skip:
        raise GenerationError(
            "--speculative verifies with all loops and the last loop's logits: no --exit or --exit-skip"
        )


def run(args: argparse.Namespace) -> None:
    speculative = None
    if args.speculative is not None:
        check_speculative_args(args)
        speculative = parse_speculative(args.speculative)
    texts = read_prompts(args)
    tokenizer = load_tokenizer(args.tokenizer)
    model, params = load_model(args.checkpoint, args.dtype, int8=args.int8)
    if args.int8:
        print(f"int8 weights: params {param_bytes(params) / 2**20:,.2f} MiB", file=sys.stderr)
    if args.chat:
        texts = [chat_prompt(text) for text in texts]
    stops = list(args.stop) + ([CHAT_END] if args.chat else [])
    sampling = SamplingConfig(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        stop_token_ids=stop_token_ids(tokenizer, stops, args.chat),
        seed=args.seed,
        vocab_limit=vocab_limit_for(tokenizer, model.config),
    )
    streams = [TextStream(stops) for _ in texts]
    decode = lambda row: tokenizer.decode(row, skip_special_tokens=False)  # noqa: E731
    watch = len(texts) == 1 or bool(stops)  # stream, or check stop strings, between decode segments

    def on_segment(rows: list[list[int]]) -> list[bool]:
        reached = []
        for stream, row in zip(streams, rows):
            piece, stopped = stream.update(decode(row))
            if len(texts) == 1:
                sys.stdout.write(piece)
                sys.stdout.flush()
            reached.append(stopped)
        return reached

    prompts = [tokenizer.encode(text) for text in texts]
    segments = dict(
        chunk_size=args.prefill_chunk,
        segment_steps=STREAM_STEPS if watch else None,
        on_segment=on_segment if watch else None,
    )
    if speculative is None:
        exit_policy = parse_exit_policy(args.exit, model.config, skip_loops=args.exit_skip)
        result = generate(model, params, prompts, sampling, exit_policy=exit_policy, **segments)
    else:
        d, k = speculative
        result = generate_speculative(model, params, prompts, sampling, draft_loops=d, block=k, **segments)
    for i, (stream, row) in enumerate(zip(streams, result.tokens)):
        piece, _ = stream.update(decode(row), final=True)
        if len(texts) == 1:
            sys.stdout.write(piece + "\n")
        else:
            sys.stdout.write(f"=== {i} ===\n{cut_at_stops(decode(row), stops)[0]}\n")
    sys.stdout.flush()
    print(timing_line(result), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except MeltJaxError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
