"""Weight-only int8 decoding (melt_jax.inference.quantization) against bf16 and float32: per-loop
logit agreement, decode speed on CPU, and the bytes a decode step reads.

Variants of one float32 model:
  float32     the model as trained
  bf16        weights and activations in bfloat16 (`--dtype bfloat16`)
  int8+bf16   int8 weights rounded from the bf16 ones, activations in bf16 (`--dtype bfloat16 --int8`)
  int8+f32    int8 weights rounded from the float32 ones, activations in float32 (`--int8`)

Agreement, per loop, of a candidate's logits with a reference's on the same teacher-forced tokens:
top-1 agreement (the share of positions where both argmaxes are equal) and KL(reference || candidate)
in nats, averaged over positions. Compared: bf16 against float32 (what bf16 alone changes), int8+bf16
against bf16, int8+f32 against float32.
  (a) trained: the pipeline's teacher (Ouro) and student (MELT) checkpoints (`melt-train pipeline
      output_dir=DIR`, then --pipeline DIR), on N_EXAMPLES held-out examples of the pipeline's task
      (synthetic, 'test' split), every real token's prediction; with each variant's per-loop answer
      exact match. MELT is scored in chunks of its chunk_size, as it prefills (evaluation.loop_logits).
  (b) random: OuroConfig.preset("ouro-1.4b") with num_hidden_layers = --layers (H=2048, I=5632, 16
      heads, V=49152, T=4, untied LM head), its random initialisation (init_params, seed 0), on
      RANDOM_BATCH x RANDOM_LENGTH random tokens.

Speed: the random model (b), greedy decoding of N_NEW tokens after an N_PROMPT-token prompt at batch
1 with `generation.generate` (compiled and warmed up first), the variants alternately, --repeats
times, median decode tokens/s (GenerationTiming.decode_tokens_per_s).

Bytes: the param tree's bytes; the compiled decode step's argument bytes (params as stored, cache,
token) and temporary bytes (`decode_step.lower(...).compile().memory_analysis()`); weights read per
token = the layers' params x T loops + the LM head (+ one embedding row per token, left out).

TPU (compile only, libtpu from the `tpu` extra, no TPU needed): the decode step of the whole
Ouro-1.4B (24 layers, bf16 activations) compiled for one chip of --topology (default v6e:1x1) with bf16
and with int8 weights: argument and temporary bytes. Temporaries that do not grow with int8 mean that
the TPU compiler fuses the dequantization into the matmuls (no float copy of a weight is written), so
a step reads the int8 bytes, T times per token.

    python benchmarks/int8_decode.py --pipeline runs/pipeline [--layers 2] [--repeats 3] [--topology v6e:1x1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_capacity import on_device  # noqa: E402
from machine_load import busy_report, cpu_times, machine_line  # noqa: E402

from melt_jax.aot import topology_devices  # noqa: E402
from melt_jax.data import (
    ByteTokenizer,  # noqa: E402
    answer_batch,  # noqa: E402
    load_text_dataset,  # noqa: E402
)
from melt_jax.errors import ConfigError  # noqa: E402
from melt_jax.inference import (  # noqa: E402
    SamplingConfig,  # noqa: E402
    decode_step,  # noqa: E402
    generate,  # noqa: E402
    load_model,  # noqa: E402
    loop_answer_matches,
    loop_logits,
)
from melt_jax.inference.quantization import int8_model, quantize_int8  # noqa: E402
from melt_jax.model import (  # noqa: E402
    OuroConfig,  # noqa: E402
    OuroModel,  # noqa: E402
    abstract_params,
    init_params,
    model_for,  # noqa: E402
    param_bytes,
)

VARIANTS = ("float32", "bf16", "int8+bf16", "int8+f32")
COMPARISONS = (("bf16", "float32"), ("int8+bf16", "bf16"), ("int8+f32", "float32"))
N_EXAMPLES = 256
SEQ_LEN = 64
RANDOM_BATCH, RANDOM_LENGTH = 2, 64
N_PROMPT, N_NEW = 16, 32

_loop_logits = jax.jit(loop_logits, static_argnums=(0,))
_loop_answer_matches = jax.jit(loop_answer_matches, static_argnums=(0,))


def bf16_pair(model, params):
    """The model with bfloat16 weights and activations."""
    config = model.config.replace(dtype="bfloat16", param_dtype="bfloat16")
    return model_for(config), jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)


def variants_of(model, params) -> dict:
    """name -> (model, params) of the four variants of a float32 pair in the unrolled layout."""
    bf16 = bf16_pair(model, params)
    return {
        "float32": (model, params),
        "bf16": bf16,
        "int8+bf16": quantize_int8(*bf16),
        "int8+f32": quantize_int8(model, params),
    }


def checkpoint_variants(path: Path) -> dict:
    """The four variants of a checkpoint, loaded as melt-generate loads them."""
    return {
        "float32": load_model(path, "float32"),
        "bf16": load_model(path, "bfloat16"),
        "int8+bf16": load_model(path, "bfloat16", int8=True),
        "int8+f32": load_model(path, "float32", int8=True),
    }


# --------------------------------------------------------------------------------------------------
# Agreement


def agreement(candidate: jax.Array, reference: jax.Array, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 agreement [T], mean KL(reference || candidate) [T]) of loop logits [T, B, S, V] over the
    positions where mask [B, S] is set."""
    candidate, reference = candidate.astype(jnp.float32), reference.astype(jnp.float32)
    same = np.asarray(jnp.argmax(candidate, -1) == jnp.argmax(reference, -1))  # [T, B, S]
    log_p, log_q = jax.nn.log_softmax(reference, -1), jax.nn.log_softmax(candidate, -1)
    kl = np.asarray(jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1))  # [T, B, S]
    weights = mask / mask.sum()
    return (same * weights).sum(axis=(1, 2)), (kl * weights).sum(axis=(1, 2))


def agreement_rows(name: str, variants: dict, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    """Markdown rows: per comparison, per-loop top-1 agreement and KL."""
    logits = {v: _loop_logits(*variants[v], jnp.asarray(tokens)) for v in VARIANTS}
    rows = []
    for candidate, reference in COMPARISONS:
        top1, kl = agreement(logits[candidate], logits[reference], mask)
        rows.append(
            f"| {name} | {candidate} vs {reference} | {' '.join(f'{x:.3f}' for x in top1)} | "
            f"{' '.join(f'{x:.1e}' for x in kl)} |"
        )
    return rows


def trained_section(pipeline: Path) -> None:
    checkpoints = {
        "teacher (Ouro)": pipeline / "looplm" / "model",
        "student (MELT)": pipeline / "melt_phase2" / "model",
    }
    for path in checkpoints.values():
        if not path.is_dir():
            raise SystemExit(f"no checkpoint {path}: run `melt-train pipeline output_dir={pipeline}` first")
    dataset = load_text_dataset(f"synthetic:{N_EXAMPLES}", split="test")
    rows = answer_batch(ByteTokenizer(), dataset["prompt"], dataset["answer"], SEQ_LEN)
    tokens = rows["tokens"]
    lengths = (rows["answer_mask"] > 0).cumsum(1).argmax(1) + 1  # one past the last answer token
    mask = np.arange(SEQ_LEN)[None, :] < (lengths[:, None] - 1)  # positions that predict a real token
    print(f"### (a) trained: the pipeline's models, {N_EXAMPLES} held-out examples ({int(mask.sum())} predictions)\n")
    print("| model | comparison | top-1 agreement per loop | KL per loop (nats) |")
    print("|---|---|---|---|")
    accuracy = {}
    for name, path in checkpoints.items():
        variants = checkpoint_variants(path)
        for row in agreement_rows(name, variants, tokens, mask):
            print(row)
        for v in VARIANTS:
            matches = _loop_answer_matches(*variants[v], jnp.asarray(tokens), jnp.asarray(rows["answer_mask"]))
            accuracy[name, v] = np.asarray(matches).mean(axis=1)
    print("\n| model | " + " | ".join(f"{v} answer accuracy per loop" for v in VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for name in checkpoints:
        cells = [" ".join(f"{x:.3f}" for x in accuracy[name, v]) for v in VARIANTS]
        print(f"| {name} | " + " | ".join(cells) + " |")


# --------------------------------------------------------------------------------------------------
# Random 1.4B-shaped model: agreement, bytes, speed


def random_model(layers: int):
    config = OuroConfig.preset(
        "ouro-1.4b", num_hidden_layers=layers, scan_layers=False, dtype="float32", param_dtype="float32"
    )
    model = OuroModel(config)
    return model, init_params(model, jax.random.key(0))


def decode_step_bytes(model, params, cache_length: int) -> tuple[int, int]:
    """(argument bytes, temporary bytes) of the compiled one-token decode step at batch 1."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    cache = jax.eval_shape(lambda: model.init_cache(1, cache_length))
    token = jax.ShapeDtypeStruct((1,), jnp.int32)
    memory = decode_step.lower(model, abstract, token, cache).compile().memory_analysis()
    return memory.argument_size_in_bytes, memory.temp_size_in_bytes


def weights_read_per_token(model, params) -> tuple[int, int]:
    """(bytes of the L layers' params, read once per loop; bytes read per token: that x T + LM head)."""
    layers = sum(param_bytes(value) for key, value in params.items() if key.startswith("layers_"))
    head = param_bytes(params["lm_head"] if "lm_head" in params else params["embedder"])
    return layers, layers * model.config.num_loops + head


def speed(variants: dict, repeats: int) -> dict:
    """name -> median decode tokens/s (batch 1, greedy)."""
    prompt = np.random.default_rng(1).integers(0, 1000, (1, N_PROMPT)).tolist()
    sampling = SamplingConfig(max_new_tokens=N_NEW)
    runs = {name: (lambda m=m, p=p: generate(m, p, prompt, sampling).timing) for name, (m, p) in variants.items()}
    for run in runs.values():
        run()  # compile and warm up
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            timing = run()
            seconds[name].append(timing.decode_s / timing.decode_tokens)
    return {name: 1 / statistics.median(s) for name, s in seconds.items()}


def random_section(layers: int, repeats: int) -> None:
    model, params = random_model(layers)
    variants = variants_of(model, params)
    c = model.config
    tokens = np.random.default_rng(2).integers(0, c.vocab_size, (RANDOM_BATCH, RANDOM_LENGTH))
    mask = np.ones(tokens.shape, bool)
    print(
        f"\n### (b) random: ouro-1.4b shapes with {layers} layers (H={c.hidden_size}, I={c.intermediate_size}, "
        f"V={c.vocab_size}, T={c.num_loops}), {RANDOM_BATCH} x {RANDOM_LENGTH} random tokens\n"
    )
    print("| model | comparison | top-1 agreement per loop | KL per loop (nats) |")
    print("|---|---|---|---|")
    for row in agreement_rows("random", variants, tokens, mask):
        print(row)

    tps = speed(variants, repeats)
    print(f"\nDecode, batch 1, greedy, {N_NEW} new tokens after {N_PROMPT}; median of {repeats}; MiB = 2^20 bytes\n")
    print(
        "| variant | params MiB | decode step arguments MiB | decode step temporaries MiB | "
        "weights read per loop MiB | per token MiB | tokens/s | vs float32 | vs bf16 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    mib = lambda n: f"{n / 2**20:,.1f}"  # noqa: E731
    for name, (m, p) in variants.items():
        arguments, temporaries = decode_step_bytes(m, p, N_PROMPT + N_NEW)
        per_loop, per_token = weights_read_per_token(m, p)
        print(
            f"| {name} | {mib(param_bytes(p))} | {mib(arguments)} | {mib(temporaries)} | {mib(per_loop)} | "
            f"{mib(per_token)} | {tps[name]:.2f} | {tps[name] / tps['float32']:.2f}x | {tps[name] / tps['bf16']:.2f}x |"
        )


def tpu_section(topology: str) -> None:
    try:
        device = topology_devices(topology)[0]
    except ConfigError as e:
        print(f"\n(TPU compile skipped: {e})")
        return
    config = OuroConfig.preset("ouro-1.4b", scan_layers=False)
    c = config
    print(f"\n### Ouro-1.4B decode step compiled for one {topology} chip (batch 1, cache 64; bf16 activations)\n")
    print("| weights | params GiB | arguments GiB | temporaries MiB | weights read per token GiB |")
    print("|---|---:|---:|---:|---:|")
    for name, model in (("bf16", OuroModel(config)), ("int8", int8_model(OuroModel(config)))):
        params = on_device(abstract_params(model), device)
        cache = on_device(jax.eval_shape(lambda model=model: model.init_cache(1, 64)), device)
        token = on_device(jax.ShapeDtypeStruct((1,), jnp.int32), device)
        memory = decode_step.lower(model, params, token, cache).compile().memory_analysis()
        _, per_token = weights_read_per_token(model, params)
        print(
            f"| {name} | {param_bytes(params) / 2**30:.2f} | {memory.argument_size_in_bytes / 2**30:.2f} | "
            f"{memory.temp_size_in_bytes / 2**20:.1f} | {per_token / 2**30:.2f} |"
        )
    matrix = c.hidden_size * c.intermediate_size * 2
    layers = c.num_layers
    print(f"\n(one bf16 MLP matrix is {matrix / 2**20:.1f} MiB; the {layers} layers hold {7 * layers} matrices)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", type=Path, default=Path("runs/pipeline"), help="melt-train pipeline output_dir")
    parser.add_argument("--layers", type=int, default=2, help="layers of the 1.4B-shaped random model")
    parser.add_argument("--repeats", type=int, default=3, help="timed decode runs per variant (median)")
    parser.add_argument("--topology", default="v6e:1x1", help="TPU topology of the compile-only section")
    args = parser.parse_args()
    times_at_start = cpu_times()
    print("## int8 weights for decoding: agreement with bf16 / float32, CPU speed, bytes\n")
    print(f"{machine_line()}; jax {jax.__version__}\n")
    trained_section(args.pipeline)
    random_section(args.layers, args.repeats)
    tpu_section(args.topology)
    print(f"\n{busy_report(times_at_start)}")


if __name__ == "__main__":
    main()
