"""Self-speculative decoding (melt_jax/inference/speculative.py) against what it must equal:

- Ouro: plain greedy decoding with all loops (`generate`), in a padded batch and alone, with a stop
  token and a limit that cut rounds short;
- MELT: greedy decoding of the chunked model whose chunks are the prompt's prefill chunks and then
  each round's block, computed with one plain forward over the cache per chunk, at the rounds' boundaries.

The models are the tiny random ones of generation_fixtures.py with their residual branches scaled
down (`_agreeing`), so that the first loop's argmax often agrees with the last and rows of one batch
accept different numbers of drafted tokens per round.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from generation_fixtures import tiny_model

from melt_jax.errors import GenerationError
from melt_jax.inference import STOP_TOKEN, SamplingConfig, cli_generate, generate, generate_speculative

PROMPTS = [[11, 200, 3, 45, 6, 78, 9], [250, 8], [100, 101, 102, 103, 104], list(range(30, 43))]
MAX_NEW = 12
GREEDY = SamplingConfig(max_new_tokens=MAX_NEW)


def _agreeing(kind: str):
    """The tiny model with its residual branches (the N2 and N4 norms' scales) at 0.05 of their size:
    every loop changes the hidden state a little, so loops agree more often than at random."""
    model, params = tiny_model(kind)
    layers = dict(params["layers"])
    for name in ("attn_out_norm", "mlp_out_norm"):
        layers[name] = jax.tree.map(lambda x: 0.05 * x, layers[name])
    return model, dict(params, layers=layers)


def _rounds_per_row(token_rounds: list[int]) -> int:
    return len(set(token_rounds) - {0})


def test_ouro_equals_greedy_decoding_in_a_padded_batch():
    model, params = _agreeing("ouro")
    expected = generate(model, params, PROMPTS, GREEDY)
    result = generate_speculative(model, params, PROMPTS, GREEDY, draft_loops=1, block=4)
    assert result.tokens == expected.tokens
    assert result.stop_reasons == expected.stop_reasons

    stats, rounds = result.stats, result.token_rounds
    assert stats.accepted > 0, "the test model should accept some drafts"
    # In some round, rows recorded different numbers of tokens (per-row acceptance and end indices).
    per_round = [{r: row.count(r) for r in set(row)} for row in rounds]
    assert any(len({counts.get(r, 1) for counts in per_round}) > 1 for r in range(1, stats.rounds + 1))
    assert stats.row_rounds == sum(map(_rounds_per_row, rounds))
    assert stats.drafted == 4 * stats.row_rounds
    recorded_after_prefill = sum(len(row) - 1 for row in result.tokens)
    assert recorded_after_prefill - stats.row_rounds <= stats.accepted <= recorded_after_prefill
    assert result.timing.decode_steps == stats.rounds == max(max(row) for row in rounds)
    assert result.timing.decode_loops == stats.rounds * (4 * 1 + model.config.num_loops)


def test_ouro_alone_with_a_stop_token_and_a_limit_inside_a_round():
    model, params = _agreeing("ouro")
    prompt = PROMPTS[:1]
    plain = generate(model, params, prompt, SamplingConfig(max_new_tokens=MAX_NEW)).tokens[0]
    for sampling in (
        SamplingConfig(max_new_tokens=7),
        SamplingConfig(max_new_tokens=MAX_NEW, stop_token_ids=plain[5:6]),
    ):
        expected = generate(model, params, prompt, sampling)
        result = generate_speculative(model, params, prompt, sampling, draft_loops=2, block=3)
        assert (result.tokens, result.stop_reasons) == (expected.tokens, expected.stop_reasons)
    assert result.stop_reasons == [STOP_TOKEN] and result.tokens[0] == plain[:5]


@functools.partial(jax.jit, static_argnames="model")
def _chunk_forward(model, params, chunk, cache):
    """One chunk [1, C] through the model over the cache: (last loop's logits [1, C, V], cache)."""
    out = model.apply({"params": params}, chunk, cache=cache)
    return out.logits, out.cache


def _chunked_greedy(model, params, prompt: list[int], new: list[int], token_rounds: list[int]) -> list[int]:
    """The argmax of the last loop at the position before each new token, in the chunked forward of
    prompt + new whose chunks are the prompt's prefill chunks (config.chunk_size from position 0) and
    then, for each round, the positions before the tokens it recorded: one forward per chunk."""
    sequence = prompt + new
    size = model.config.chunk_size
    chunks = [list(range(start, min(start + size, len(prompt)))) for start in range(0, len(prompt), size)]
    for r in sorted(set(token_rounds) - {0}):
        positions = [len(prompt) + i - 1 for i, round_ in enumerate(token_rounds) if round_ == r]
        assert positions == list(range(chunks[-1][-1] + 1, chunks[-1][-1] + 1 + len(positions))), (
            "a round records consecutive tokens, starting where the previous round ended"
        )
        chunks.append(positions)
    cache = model.init_cache(1, 32)
    predicted = []
    for positions in chunks:
        logits, cache = _chunk_forward(model, params, jnp.asarray([[sequence[p] for p in positions]]), cache)
        predicted += jnp.argmax(logits[0], axis=-1).tolist()
    return predicted[len(prompt) - 1 :]


def test_melt_equals_greedy_decoding_chunked_at_the_round_boundaries():
    model, params = _agreeing("melt")
    result = generate_speculative(model, params, PROMPTS, GREEDY, draft_loops=1, block=3)
    assert result.stats.accepted > 0
    for prompt, new, rounds in zip(PROMPTS, result.tokens, result.token_rounds):
        assert len(new) == MAX_NEW
        assert _chunked_greedy(model, params, prompt, new, rounds) == new
    # Chunks of several tokens are not token-by-token decoding: the outputs differ here.
    assert result.tokens != generate(model, params, PROMPTS, GREEDY).tokens


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(sampling=SamplingConfig(temperature=0.7)), "greedy only"),
        (dict(draft_loops=3), r"draft_loops must be an integer in \[1, 2\]"),
        (dict(draft_loops=0), "draft_loops"),
        (dict(block=0), "block"),
    ],
)
def test_bad_settings_are_clear_errors(settings, message):
    model, params = tiny_model("ouro")
    with pytest.raises(GenerationError, match=message):
        generate_speculative(model, params, PROMPTS, **settings)


def test_command_line(tmp_path, capsys):
    from melt_jax.checkpoint import save_params

    model, params = tiny_model("ouro")
    save_params(tmp_path / "ouro", model.config, params)
    args = ["--checkpoint", str(tmp_path / "ouro"), "--tokenizer", "byte", "--prompt", "hello", "--max-new-tokens", "6"]
    assert cli_generate.main(args) == 0
    plain = capsys.readouterr().out
    assert cli_generate.main([*args, "--speculative", "1,2"]) == 0
    out, err = capsys.readouterr()
    assert out == plain and "drafted tokens accepted" in err
    for bad in (["--speculative", "1"], ["--speculative", "1,2", "--temperature", "0.5"], ["--speculative", "3,2"]):
        assert cli_generate.main([*args, *bad]) == 2
        assert "error:" in capsys.readouterr().err
