"""melt-generate: text generation from a melt_jax checkpoint (Ouro or MELT).

    melt-generate --checkpoint CKPT --tokenizer byte --prompt "3*4=" --max-new-tokens 4
    melt-generate --checkpoint CKPT --tokenizer path/to/tokenizer.json --chat --prompt "Hi" \
        --temperature 0.7 --top-p 0.9 --seed 1 --exit threshold:0.9
    melt-generate --checkpoint CKPT --tokenizer byte --prompt "3*4=" --speculative 1,4

`--speculative d,k` decodes greedily by self-speculation (melt_jax/inference/speculative.py): rounds
that draft k tokens with the first d loops and verify them with all loops; it takes no --temperature,
--exit or --exit-skip.

Without --tokenizer, the checkpoint's own tokenizer.json is used (melt-convert import copies it from
the Hugging Face folder).

One prompt is streamed to stdout as it is generated; several (--prompt repeated, or --prompt-file with
one prompt per line) are generated as one padded batch and printed in order. Generation stops at the
tokenizer's eos token, at any --stop string, and with --chat at `<|im_end|>` (the prompt is wrapped in
the ChatML template of the Ouro Thinking models). Timing goes to stderr at the end. Bad input is
reported on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from melt_jax.errors import GenerationError, MeltJaxError, exit_status
from melt_jax.inference.generation import GenerationResult
from melt_jax.inference.model_loading import add_loading_arguments
from melt_jax.inference.sampling import SamplingConfig
from melt_jax.inference.speculative import SpeculativeResult
from melt_jax.inference.text_generation import TextGenerator
from melt_jax.model.exit import ExitPolicy
from melt_jax.model.params import param_bytes

PROG = "melt-generate"
STREAM_STEPS = 4  # decode steps between two prints when streaming


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_loading_arguments(p)
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
    generator = TextGenerator.load(
        args.checkpoint, args.tokenizer, args.dtype, int8=args.int8, attention=args.attention
    )
    if args.int8:
        print(f"int8 weights: params {param_bytes(generator.params) / 2**20:,.2f} MiB", file=sys.stderr)
    sampling = SamplingConfig(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    config = generator.model.config
    generator = dataclasses.replace(
        generator,
        sampling=sampling,
        stops=tuple(args.stop),
        chat=args.chat,
        exit_policy=ExitPolicy.last() if speculative else ExitPolicy.parse(args.exit, config, args.exit_skip),
        prefill_chunk=args.prefill_chunk,
        speculative=speculative,
        segment_steps=STREAM_STEPS,
    )
    single = len(texts) == 1
    run = generator.start(texts, stream=single)
    for pieces in run:
        if single:
            sys.stdout.write(pieces[0])
            sys.stdout.flush()
    result = run.result()
    if single:
        sys.stdout.write("\n")
    else:
        for i, text in enumerate(result.texts):
            sys.stdout.write(f"=== {i} ===\n{text}\n")
    sys.stdout.flush()
    print(timing_line(result.generation), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (MeltJaxError, OSError) as e:
        return exit_status(PROG, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
