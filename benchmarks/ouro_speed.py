"""Speed of the JAX Ouro model against the eager PyTorch reference (melt_jax/testing/torch_ouro.py), on CPU.

One small Ouro model (H=256, L=4 layers, T=4 loops, 4 heads of 64, MHA, I=688, V=1024, float32) with
the same random weights in both: they are written to a temporary Hugging Face checkpoint, which
melt_jax reads with `load_hf_checkpoint` and the reference gets as a state dict. Measured:

  forward   full forward without a cache on [B, 256] tokens, B = 1 and 4. Both sides compute every
            loop's logits ([T, B, S, V]): the reference always does, melt_jax with
            `forward(..., exit_policy=None, return_loop_logits=True)`.
  decode    prefill 32 tokens, then 128 one-token cached decode steps (teacher-forced tokens), B = 1
            and 8; only the 128 steps are timed. melt_jax: `prefill` + a Python loop of jitted
            `decode_step` over a cache of exactly 32 + 128 positions. Reference: the body of
            `OuroReference.decode` (its `_run` on one token at a time with its list of T*L growing
            KV tensors), with a timer between the prefill and the steps; like `decode`, every step
            computes all T loops' logits and returns the last loop's (mode 'last').

melt_jax is timed after a warm-up call (compilation excluded), with block_until_ready; PyTorch under
torch.inference_mode with torch.set_num_threads(number of usable cores). The two sides are run
alternately, repeat by repeat, so that background load hits both alike; medians are reported. The
outputs of the two are compared (max abs diff), so the timings are of the same computation.

Unless decode at batch 1 reaches the target (3x the reference) or --no-profile is given, a profile
of the melt_jax decode step follows: its time against the cache length S_max (the attention reads all
S_max positions of all T*L slot arrays [B, K, S_max, D], whatever the current length), and the parts
of one step at batch 1 (jit dispatch, the same token through the model without a cache, its weight
matmuls alone).

    python benchmarks/ouro_speed.py [--repeats 5] [--profile | --no-profile]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from machine_load import busy_report, cpu_times, machine_line, usable_cores

from melt_jax.convert import load_hf_checkpoint
from melt_jax.inference import decode_step, forward, prefill
from melt_jax.model import ExitPolicy, OuroModel, init_cache
from melt_jax.testing.hf_checkpoints import random_ouro_state_dict, tiny_hf_config, write_hf_checkpoint
from melt_jax.testing.torch_ouro import OuroReference

HF_CONFIG = tiny_hf_config(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=64,
    total_ut_steps=4,
    max_position_embeddings=4096,
    rope_theta=10_000.0,
)
FORWARD_LEN = 256
FORWARD_BATCHES = (1, 4)
N_PREFILL = 32
N_DECODE = 128
DECODE_BATCHES = (1, 8)
TARGET_DECODE_RATIO = 3.0
POLICY = ExitPolicy.last()


def median_ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def tokens_for(batch: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, HF_CONFIG["vocab_size"], (batch, length), dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# The two implementations, one timed call each


class Jax:
    def __init__(self, checkpoint: Path):
        config, params = load_hf_checkpoint(checkpoint, dtype="float32")
        self.config = config
        self.model = OuroModel(config)
        self.params = jax.device_put(params)

    def forward(self, tokens: np.ndarray) -> tuple[float, np.ndarray]:
        """Seconds of one forward, and the step logits [T, B, S, V]."""
        tokens = jnp.asarray(tokens, jnp.int32)
        jax.block_until_ready(tokens)
        start = time.perf_counter()
        out = forward(self.model, self.params, tokens, exit_policy=None, return_loop_logits=True)
        out.loop_logits.block_until_ready()
        return time.perf_counter() - start, out.loop_logits

    def decode(self, tokens: np.ndarray, max_length: int | None = None, n_decode: int = N_DECODE):
        """Prefill tokens[:, :N_PREFILL], then feed tokens[:, N_PREFILL + i] for i < n_decode.
        Returns (seconds of the prefill, seconds of the decode steps, logits [B, 1 + n_decode, V])."""
        batch = tokens.shape[0]
        max_length = max_length or N_PREFILL + n_decode
        cache = init_cache(self.config, batch, max_length)
        prompt = jnp.asarray(tokens[:, :N_PREFILL], jnp.int32)
        steps = [jnp.asarray(tokens[:, N_PREFILL + i], jnp.int32) for i in range(n_decode)]
        jax.block_until_ready((cache, prompt, steps))
        start = time.perf_counter()
        logits, cache = prefill(self.model, self.params, prompt, cache, POLICY)
        logits.block_until_ready()
        prefilled = time.perf_counter()
        outputs = [logits[:, -1]]
        for token in steps:
            logits, cache = decode_step(self.model, self.params, token, cache, POLICY)
            outputs.append(logits)
        logits.block_until_ready()
        done = time.perf_counter()
        return prefilled - start, done - prefilled, outputs


class Torch:
    def __init__(self, state_dict: dict[str, np.ndarray]):
        self.ref = OuroReference(
            HF_CONFIG, {k: torch.from_numpy(v) for k, v in state_dict.items()}, dtype=torch.float32
        )

    def forward(self, tokens: np.ndarray) -> tuple[float, torch.Tensor]:
        ids = torch.from_numpy(tokens)
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.ref._run(ids)  # what OuroReference.forward runs, without the numpy copies
            seconds = time.perf_counter() - start
        return seconds, out["step_logits"]

    def decode(self, tokens: np.ndarray, n_decode: int = N_DECODE):
        """The body of OuroReference.decode(tokens[:, :N_PREFILL + n_decode + 1], N_PREFILL,
        mode='last'), with a timer between the prefill and the one-token steps."""
        ref = self.ref
        ids = torch.from_numpy(tokens)
        with torch.inference_mode():
            cache: list = [None] * (ref.T * ref.L)
            start = time.perf_counter()
            out = ref._run(ids[:, :N_PREFILL], 0, cache)
            chunks = [out["step_logits"][ref.T - 1][:, -1:]]  # mode 'last' of decode()'s _select
            prefilled = time.perf_counter()
            for pos in range(N_PREFILL, N_PREFILL + n_decode):
                out = ref._run(ids[:, pos : pos + 1], pos, cache)
                chunks.append(out["step_logits"][ref.T - 1])
            done = time.perf_counter()
        return prefilled - start, done - prefilled, torch.cat(chunks, dim=1)


# --------------------------------------------------------------------------------------------------
# Benchmarks


def bench_forward(jx: Jax, pt: Torch, repeats: int) -> list[dict]:
    rows = []
    for batch in FORWARD_BATCHES:
        tokens = tokens_for(batch, FORWARD_LEN, seed=batch)
        _, jax_logits = jx.forward(tokens)  # compile + warm-up
        _, torch_logits = pt.forward(tokens)
        diff = float(np.max(np.abs(np.asarray(jax_logits) - torch_logits.numpy())))
        jax_s, torch_s = [], []
        for _ in range(repeats):
            jax_s.append(jx.forward(tokens)[0])
            torch_s.append(pt.forward(tokens)[0])
        n = batch * FORWARD_LEN
        rows.append(
            dict(
                what=f"forward S={FORWARD_LEN}",
                batch=batch,
                jax_ms=median_ms(jax_s),
                torch_ms=median_ms(torch_s),
                jax_tps=n / statistics.median(jax_s),
                torch_tps=n / statistics.median(torch_s),
                diff=diff,
            )
        )
    return rows


def bench_decode(jx: Jax, pt: Torch, repeats: int) -> list[dict]:
    rows = []
    for batch in DECODE_BATCHES:
        tokens = tokens_for(batch, N_PREFILL + N_DECODE + 1, seed=100 + batch)
        _, _, jax_out = jx.decode(tokens)  # compile + warm-up
        _, _, torch_out = pt.decode(tokens)
        jax_logits = np.stack([np.asarray(x) for x in jax_out], axis=1)  # [B, 1 + N_DECODE, V]
        diff = float(np.max(np.abs(jax_logits - torch_out.numpy())))
        if batch == DECODE_BATCHES[0]:  # the timing loop is OuroReference.decode itself
            whole = pt.ref.decode(tokens, N_PREFILL, mode="last")
            assert np.array_equal(whole, torch_out.numpy()), "timing loop differs from OuroReference.decode"
        jax_s, torch_s, jax_pre, torch_pre = [], [], [], []
        for _ in range(repeats):
            pre, steps, _ = jx.decode(tokens)
            jax_s.append(steps)
            jax_pre.append(pre)
            pre, steps, _ = pt.decode(tokens)
            torch_s.append(steps)
            torch_pre.append(pre)
        n = batch * N_DECODE
        rows.append(
            dict(
                what=f"decode {N_DECODE} steps after {N_PREFILL}",
                batch=batch,
                jax_ms=median_ms(jax_s) / N_DECODE,
                torch_ms=median_ms(torch_s) / N_DECODE,
                jax_tps=n / statistics.median(jax_s),
                torch_tps=n / statistics.median(torch_s),
                diff=diff,
                jax_prefill_ms=median_ms(jax_pre),
                torch_prefill_ms=median_ms(torch_pre),
            )
        )
    return rows


def print_table(rows: list[dict]) -> None:
    print("| benchmark | batch | JAX tokens/s | PyTorch tokens/s | JAX/PyTorch | JAX ms | PyTorch ms | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        unit = " /step" if r["what"].startswith("decode") else ""
        print(
            f"| {r['what']} | {r['batch']} | {r['jax_tps']:,.0f} | {r['torch_tps']:,.0f} | "
            f"{r['jax_tps'] / r['torch_tps']:.2f}x | {r['jax_ms']:.2f}{unit} | {r['torch_ms']:.2f}{unit} | "
            f"{r['diff']:.1e} |"
        )
    print()
    print(
        "Times are medians; 'ms /step' is the time of one decode step (all B rows). Prefill of "
        f"{N_PREFILL} tokens (not in the decode figures): "
        + ", ".join(
            f"B={r['batch']}: JAX {r['jax_prefill_ms']:.1f} ms, PyTorch {r['torch_prefill_ms']:.1f} ms"
            for r in rows
            if "jax_prefill_ms" in r
        )
        + "."
    )


# --------------------------------------------------------------------------------------------------
# Profile of the melt_jax decode step


def time_round_robin(fns: dict, calls: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each fn: `repeats` rounds, each calling every fn `calls` times in
    turn (then blocking), so that background load hits all of them alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile + warm-up
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                out = fn()
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(s) for name, s in samples.items()}


def step_at(model, params, cache, position: int):
    """A closure running one decode_step on `cache` at positions `position` .. `position` + 15 (the
    end index is reset every 16 calls; the work of a step does not depend on the position)."""
    batch = cache.end_index.shape[0]
    token = jnp.ones((batch,), jnp.int32)
    state = {"cache": cache, "calls": 0}

    def one_step():
        if state["calls"] % 16 == 0:
            state["cache"] = state["cache"].replace(end_index=jnp.full((batch,), position, jnp.int32))
        state["calls"] += 1
        logits, state["cache"] = decode_step(model, params, token, state["cache"], POLICY)
        return logits

    return one_step


def weight_matmuls_fn(config):
    """Only the weight matmuls of one token through T loops of L layers (q, k, v, o, gate, up, down),
    with the same scans over loops and stacked layer parameters as OuroModel; plus the LM head."""

    def run(params, x):  # x [B, H]
        def layer(x, w):
            attn, mlp = w["attn"], w["mlp"]
            q = jnp.einsum("BH,HND->BND", x, attn["q_proj"]["kernel"])
            k = jnp.einsum("BH,HKD->BKD", x, attn["k_proj"]["kernel"])
            v = jnp.einsum("BH,HKD->BKD", x, attn["v_proj"]["kernel"])
            x = x + jnp.einsum("BND,NDH->BH", q + k + v, attn["o_proj"]["kernel"])
            up = jax.nn.silu(x @ mlp["gate_proj"]["kernel"]) * (x @ mlp["up_proj"]["kernel"])
            return x + up @ mlp["down_proj"]["kernel"], None

        def loop(x, _):
            x, _ = jax.lax.scan(layer, x, params["layers"])
            return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6), None

        x, _ = jax.lax.scan(loop, x, None, length=config.num_loops)
        return x @ params["lm_head"]["kernel"]

    return jax.jit(run)


def profile_decode(jx: Jax, repeats: int) -> None:
    config, model, params = jx.config, jx.model, jx.params
    print("\n## Profile of the melt_jax decode step\n")

    # 1. Step time against the cache length: attention reads the whole S_max of all T*L slot arrays.
    print("Decode step time (median ms per step, at positions 64..79) against the cache length S_max:\n")
    print("| batch | S_max | ms per step |")
    print("|---:|---:|---:|")
    library_ms = {}
    for batch in DECODE_BATCHES:
        for s_max in (160, 640, 2560):
            times = time_round_robin(
                {"library": step_at(model, params, init_cache(config, batch, s_max), 64)},
                calls=5 if batch * s_max > 5000 else 20,
                repeats=3,
            )
            library_ms[batch, s_max] = 1e3 * times["library"]
            print(f"| {batch} | {s_max} | {1e3 * times['library']:.2f} |")
    for batch in DECODE_BATCHES:
        slope = 1e3 * (library_ms[batch, 2560] - library_ms[batch, 160]) / (2560 - 160)
        print(
            f"\nbatch {batch}: library step time grows by {slope:.2f} us per cache position "
            f"({slope / batch:.2f} us per position and row).",
            end="",
        )
    print()

    # 2. Where the time of one step at batch 1, S_max = 160 goes.
    batch, s_max = 1, N_PREFILL + N_DECODE

    @functools.partial(jax.jit, donate_argnums=(2,))
    def no_op(params, token, cache):  # decode_step's arguments, no work
        return token, cache.advance(1)

    noop_state = {"cache": init_cache(config, batch, s_max)}
    token = jnp.ones((batch,), jnp.int32)

    def dispatch_only():
        out, noop_state["cache"] = no_op(params, token, noop_state["cache"])
        return out

    one_token = jnp.ones((batch, 1), jnp.int32)
    matmuls = weight_matmuls_fn(config)
    x = jnp.ones((batch, config.hidden_size))
    times = time_round_robin(
        {
            "decode_step": step_at(model, params, init_cache(config, batch, s_max), 64),
            "forward of the same token without a cache (same layers; no cache write, attends to itself only)": lambda: (
                forward(model, params, one_token, exit_policy=POLICY).logits
            ),
            "its weight matmuls alone (q, k, v, o, gate, up, down x T*L, LM head; same scans)": lambda: matmuls(
                params, x
            ),
            "jit dispatch of decode_step's arguments, no work": dispatch_only,
        },
        calls=20,
        repeats=repeats,
    )
    print(
        f"\nParts of one decode step at batch {batch}, S_max = {s_max}, positions 64..79 (median ms per call; "
        f"measured round-robin):\n"
    )
    print("| part | ms |")
    print("|---|---:|")
    for name, seconds in times.items():
        print(f"| {name} | {1e3 * seconds:.3f} |")


# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--profile", action="store_true", help="always run the decode-step profile")
    group.add_argument("--no-profile", action="store_true", help="never run the decode-step profile")
    args = parser.parse_args()

    times_at_start = cpu_times()
    torch.set_num_threads(usable_cores())
    print("## Ouro speed: melt_jax (jit) vs PyTorch reference (eager), CPU\n")
    print(
        f"{machine_line()}; jax {jax.__version__} ({jax.default_backend()}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )

    state_dict = random_ouro_state_dict(HF_CONFIG, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        write_hf_checkpoint(folder, HF_CONFIG, state_dict)
        jx = Jax(Path(folder))
    pt = Torch(state_dict)
    c = jx.config
    n_params = sum(int(np.prod(v.shape)) for v in state_dict.values())
    print(
        f"config: hidden_size={c.hidden_size}, num_hidden_layers={c.num_hidden_layers}, "
        f"total_ut_steps={c.total_ut_steps}, num_attention_heads={c.num_attention_heads}, "
        f"num_key_value_heads={c.num_key_value_heads}, head_dim={c.head_dim}, "
        f"intermediate_size={c.intermediate_size}, vocab_size={c.vocab_size}, rope_theta={c.rope_theta}, "
        f"tie_word_embeddings={c.tie_word_embeddings}, dtype={c.dtype}; {n_params / 1e6:.2f}M parameters"
    )
    print(
        f"decode: JAX cache max_length = {N_PREFILL + N_DECODE} (prefill + steps); exit policy: last loop; "
        f"{args.repeats} timed repeats, medians\n"
    )

    rows = bench_forward(jx, pt, args.repeats) + bench_decode(jx, pt, args.repeats)
    print_table(rows)
    decode_b1 = next(r for r in rows if r["what"].startswith("decode") and r["batch"] == 1)
    ratio = decode_b1["jax_tps"] / decode_b1["torch_tps"]
    verdict = "meets" if ratio >= TARGET_DECODE_RATIO else "misses"
    print(f"\nTarget: decode at batch 1 >= {TARGET_DECODE_RATIO:.0f}x the eager reference: {ratio:.2f}x, {verdict} it.")

    if args.profile or (ratio < TARGET_DECODE_RATIO and not args.no_profile):
        profile_decode(jx, args.repeats)
    print(f"\n{busy_report(times_at_start)}")


if __name__ == "__main__":
    main()
