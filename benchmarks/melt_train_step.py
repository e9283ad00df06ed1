"""One real training step of the training program (melt_jax.train): LoopLM Stage I on Ouro against
MELT distillation with the two-pass and with the sequential chunked forward, at the same size, with
the same weights and tokens. Per step: compile time, step time, training tokens/s, FLOPs, achieved
FLOP/s and the fraction of the machine's measured matmul peak.

    python benchmarks/melt_train_step.py [--seq 1024] [--chunk 128] [--repeats 3] [--phase 2]

Default size: H=256, L=4, T=4, 4 heads of 64 (MHA), I=688, V=1024, S=1024, C=128, batch 1, float32.

What one step is (`train_step` of train/steps.py, jitted without a mesh): the
objective's loss and gradient (jax.value_and_grad with its metrics), the gradient's global norm,
then the optimizer update of `build_optimizer` (global-norm clipping, AdamW with the LoopLM and gate
groups) and `optax.apply_updates`. Params and optimizer state are donated and fed back, step after
step, as in training. The objectives are those of `melt_jax.train.objectives`:

  LoopLM Stage I (Ouro)   looplm_loss: per token sum_t p_t CE_t - beta H(p), beta 0.1
  MELT phase 2            phase2_loss: all-loop KD from the frozen Ouro teacher (the same weights)
                          + 0.1 * attention alignment, with Distillation(forward="two_pass") and
                          with forward="sequential"; the teacher's forward (no gradient) is part of
                          the step. --phase 1: phase1_loss at alpha 1 (alpha traced from the step
                          number as in training, so the Ouro/MELT interpolation is computed).

Measured:
  compile (s)   wall time of jax.jit(step).lower(...) + .compile()
  step (s)      median over --repeats steps, after one warm-up step (block_until_ready)
  tokens/s      batch * S / step: the training tokens one step consumes
  XLA GFLOP     `compiled.cost_analysis()["flops"]` of the whole step. XLA's cost analysis counts
                the body of each while loop once, whatever its trip count; the models scan over
                loops, layers and chunks, so this undercounts by a large factor.
  matmul GFLOP  the dot FLOPs of the optimised HLO (`compiled.as_text()`), each loop body multiplied
                by its known_trip_count (2 * output elements * contracted size per dot): the
                matrix work the step executes, recomputation included. Elementwise work is left out.
  GFLOP/s       matmul GFLOP / step time
  % of peak     GFLOP/s over the machine's matmul peak, measured in the same run (before and after
                the steps; the better one): a jitted float32 jnp.dot of two N x N matrices
                (N = --peak-n, 2048), best of several repeats, 2 N^3 FLOPs each.

The machine's load during the run is reported at the end (benchmarks/machine_load.py): on a shared
machine, timings carry the noise of other work.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from machine_load import busy_report, cpu_times, machine_line

from melt_jax.model import MeltModel, OuroConfig, OuroModel, init_params, melt_from_ouro
from melt_jax.train.objectives import (
    Distillation,
    linear_alpha,
    looplm_loss,
    phase1_loss,
    phase2_loss,
)
from melt_jax.train.optimizer import OptimizerConfig, build_optimizer
from melt_jax.train.steps import NOT_TRIGGERED, TrainState, train_step

BETA = 0.1  # looplm: weight of the exit entropy (TrainConfig.beta)
ALIGN_BETA = 0.1  # phase 2: weight of the attention alignment (TrainConfig.align_beta)
PHASE1_STEPS = 100  # phase 1: the step timed is the last one, alpha = 1
TOTAL_STEPS = 1000  # length of the optimizer's learning-rate schedule


# --------------------------------------------------------------------------------------------------
# FLOPs and the machine's peak


def cost_analysis_flops(compiled) -> float | None:
    """The "flops" of XLA's cost analysis of a compiled function (a dict, or a list of dicts, one per
    module, depending on the jax version), or None when the backend gives none."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(analysis, dict):
        analysis = [analysis]
    flops = [a.get("flops") for a in analysis or [] if isinstance(a, dict) and a.get("flops") is not None]
    return float(sum(flops)) if flops else None


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([a-z0-9]+)\[([0-9,]*)\]\S*\s+([\w\-]+)\((.*)$")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")


def hlo_computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """The instruction lines of each computation of an HLO module's text, by name, and the name of
    the ENTRY computation."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line.startswith(" "):
            current = header.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            computations[current].append(line)
    return computations, entry


def _dot_flops(line: str, inst: re.Match, shapes: dict[str, list[int]]) -> float:
    """2 * (output elements) * (contracted size) of the dot instruction `line`."""
    lhs = re.findall(r"%([\w.\-]+)", inst.group(5))[0]
    contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", line).group(1)
    size = np.prod([shapes[lhs][int(d)] for d in contracting.split(",") if d])
    return 2.0 * np.prod(shapes[inst.group(1)]) * size


class _DotFlopCounter:
    """Dot FLOPs of the computations of one HLO module, each computed once (memoised), counting the
    while loops whose trip count is not known."""

    def __init__(self, computations: dict[str, list[str]]):
        self.computations = computations
        self.unknown_loops = 0
        self.memo: dict[str, float] = {}

    def flops_of(self, name: str) -> float:
        """Dot FLOPs of computation `name` and of what it calls."""
        if name in self.memo:
            return self.memo[name]
        self.memo[name] = 0.0  # guards against cycles
        shapes: dict[str, list[int]] = {}
        total = 0.0
        for line in self.computations.get(name, []):
            total = self._add_line(total, line, shapes)
        self.memo[name] = total
        return total

    def _add_line(self, total: float, line: str, shapes: dict[str, list[int]]) -> float:
        """`total` plus the FLOPs of one instruction: its own dot, the computations it calls (a while
        body times its trip count) and the largest of a conditional's branches."""
        inst = _INSTRUCTION.match(line)
        if inst:
            shapes[inst.group(1)] = [int(d) for d in inst.group(3).split(",") if d]
            if inst.group(4) == "dot":
                total += _dot_flops(line, inst, shapes)
        times = self._times(line)
        branches = [self.flops_of(c) for c in re.findall(r"%?([\w.\-]+)", ",".join(_BRANCHES.findall(line)))]
        for attribute, called in _CALLED.findall(line):
            if attribute in ("true_computation", "false_computation"):
                branches.append(self.flops_of(called))
            else:
                total += times * self.flops_of(called)
        return total + max(branches, default=0.0)  # a conditional runs one branch: count the largest

    def _times(self, line: str) -> int:
        """How many times the instruction runs what it calls: a while loop's known trip count, else 1
        (an unknown trip count is counted in unknown_loops)."""
        if not re.search(r"\swhile\(", line):
            return 1
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
        if trip:
            return int(trip.group(1))
        self.unknown_loops += 1
        return 1


def executed_dot_flops(hlo_text: str) -> tuple[float, int]:
    """Dot FLOPs of an optimised HLO module (`compiled.as_text()`), following fusions and calls, each
    while body counted known_trip_count times. Returns (FLOPs, number of while loops whose trip count
    is not known: their bodies are counted once)."""
    computations, entry = hlo_computations(hlo_text)
    counter = _DotFlopCounter(computations)
    return counter.flops_of(entry), counter.unknown_loops


def matmul_peak(n: int, repeats: int = 7) -> float:
    """FLOP/s of the best of `repeats` jitted float32 [n, n] @ [n, n] products (2 n^3 FLOPs each)."""
    a = jax.random.normal(jax.random.key(10), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(11), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


# --------------------------------------------------------------------------------------------------
# The training step


def device_copy(tree):
    """Fresh device arrays (the step donates its params; MELT's params share Ouro's arrays)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def time_step(loss_fn, host_params, teacher_params, batch, step_number, repeats: int) -> dict:
    """Compile one training step, then time it: see the module docstring for what is measured."""
    params = device_copy(host_params)
    optimizer = build_optimizer(OptimizerConfig(), params, TOTAL_STEPS)
    state = TrainState(
        step=jnp.array(step_number, copy=True),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(0),
        decay_start=jnp.array(NOT_TRIGGERED, jnp.int32),
    )
    step = jax.jit(functools.partial(train_step, loss_fn, optimizer), donate_argnums=0)

    start = time.perf_counter()
    compiled = step.lower(state, teacher_params, batch).compile()
    compile_s = time.perf_counter() - start
    xla_flops = cost_analysis_flops(compiled)
    dot_flops, unknown_loops = executed_dot_flops(compiled.as_text())

    state, metrics = compiled(state, teacher_params, batch)  # warm-up
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = compiled(state, teacher_params, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise RuntimeError(f"the loss is {loss}")
    return {
        "compile_s": compile_s,
        "step_s": statistics.median(times),
        "times": times,
        "xla_flops": xla_flops,
        "dot_flops": dot_flops,
        "unknown_loops": unknown_loops,
        "loss": loss,
    }


def time_optimizer_update(host_params, repeats: int) -> float:
    """Median seconds of the optimizer update alone (clip + AdamW + apply_updates) on these params."""
    params = device_copy(host_params)
    optimizer = build_optimizer(OptimizerConfig(), params, TOTAL_STEPS)
    grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)

    @jax.jit
    def update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    state = (params, optimizer.init(params))
    state = jax.block_until_ready(update(*state, grads))
    times = []
    for _ in range(max(repeats, 5)):
        start = time.perf_counter()
        state = jax.block_until_ready(update(*state, grads))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024, help="sequence length S")
    parser.add_argument("--chunk", type=int, default=128, help="MELT training chunk size C")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per objective (median)")
    parser.add_argument("--phase", type=int, choices=(1, 2), default=2, help="MELT phase timed (1: at alpha 1)")
    parser.add_argument("--peak-n", type=int, default=2048, help="matrix size of the matmul peak")
    args = parser.parse_args()

    times_at_start = cpu_times()
    print("## One training step: LoopLM Stage I (Ouro) vs MELT distillation (two-pass, sequential)\n")
    print(
        f"{machine_line()}; jax {jax.__version__} ({jax.default_backend()}, "
        f"{len(jax.devices())} device(s)); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )

    peak_before = matmul_peak(args.peak_n)

    ouro_config = OuroConfig.preset(
        "tiny",
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        vocab_size=1024,
        total_ut_steps=4,
        max_position_embeddings=4096,
    )
    ouro = OuroModel(ouro_config)
    ouro_params = jax.device_get(init_params(ouro, jax.random.key(0)))
    melt_config, melt_params = melt_from_ouro(ouro_config, ouro_params, chunk_size=args.chunk)
    melt = MeltModel(melt_config)
    teacher_params = device_copy(ouro_params)
    tokens = jax.random.randint(jax.random.key(1), (1, args.seq), 0, ouro_config.vocab_size, jnp.int32)
    batch = {"tokens": tokens, "loss_mask": jnp.ones(tokens.shape, jnp.float32)}
    n_tokens = int(tokens.size)
    n_ouro = sum(x.size for x in jax.tree.leaves(ouro_params))
    n_melt = sum(x.size for x in jax.tree.leaves(melt_params))
    print(
        f"config: H={ouro_config.hidden_size}, L={ouro_config.num_hidden_layers}, T={ouro_config.total_ut_steps}, "
        f"{ouro_config.num_attention_heads} heads of {ouro_config.head_dim} ({ouro_config.num_key_value_heads} kv), "
        f"I={ouro_config.intermediate_size}, V={ouro_config.vocab_size}, S={args.seq}, C={args.chunk}, batch 1, "
        f"float32; {n_ouro / 1e6:.2f}M params (Ouro), {n_melt / 1e6:.2f}M (MELT: + gates); "
        f"optimizer: build_optimizer(OptimizerConfig()) (clip 1.0, AdamW); median of {args.repeats} steps\n"
    )

    def looplm(p, t, batch, step):
        return looplm_loss(ouro, p, batch, BETA)

    def distillation(forward):
        setup = Distillation(melt, ouro, forward)
        if args.phase == 1:
            return lambda p, t, batch, step: phase1_loss(setup, p, t, batch, linear_alpha(step, PHASE1_STEPS))
        return lambda p, t, batch, step: phase2_loss(setup, p, t, batch, ALIGN_BETA)

    melt_name = f"MELT phase {args.phase}" + (" (alpha 1)" if args.phase == 1 else "")
    steps = {
        "LoopLM Stage I (Ouro)": (looplm, ouro_params, None),
        f"{melt_name}, two-pass": (distillation("two_pass"), melt_params, teacher_params),
        f"{melt_name}, sequential": (distillation("sequential"), melt_params, teacher_params),
    }
    step_number = jnp.asarray(PHASE1_STEPS - 1, jnp.int32)
    results = {}
    for name, (loss_fn, params, teacher) in steps.items():
        results[name] = time_step(loss_fn, params, teacher, batch, step_number, args.repeats)
        r = results[name]
        print(
            f"  {name}: compile {r['compile_s']:.1f} s, steps {', '.join(f'{t:.3f}' for t in r['times'])} s, "
            f"loss {r['loss']:.4f}",
            flush=True,
        )
    optimizer_s = time_optimizer_update(melt_params, args.repeats)
    peak_after = matmul_peak(args.peak_n)
    peak = max(peak_before, peak_after)

    base = results["LoopLM Stage I (Ouro)"]
    print(
        f"\nmatmul peak: float32 [{args.peak_n}, {args.peak_n}] @ [{args.peak_n}, {args.peak_n}], best of 7: "
        f"{peak_before / 1e9:.1f} GFLOP/s before the steps, {peak_after / 1e9:.1f} after; "
        f"peak = {peak / 1e9:.1f} GFLOP/s\n"
    )
    print(
        f"H={ouro_config.hidden_size}, L={ouro_config.num_hidden_layers}, T={ouro_config.total_ut_steps}, "
        f"S={args.seq}, C={args.chunk}, batch 1, float32, {jax.default_backend()}, median of {args.repeats}\n"
    )
    print(
        "| step | compile (s) | step (s) | tokens/s | XLA GFLOP | matmul GFLOP | GFLOP/s | % of peak "
        "| time vs Ouro | matmul FLOPs vs Ouro |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        xla = "n/a" if r["xla_flops"] is None else f"{r['xla_flops'] / 1e9:.1f}"
        rate = r["dot_flops"] / r["step_s"]
        print(
            f"| {name} | {r['compile_s']:.1f} | {r['step_s']:.3f} | {n_tokens / r['step_s']:,.0f} | {xla} | "
            f"{r['dot_flops'] / 1e9:.1f} | {rate / 1e9:.1f} | {100 * rate / peak:.0f}% | "
            f"{r['step_s'] / base['step_s']:.2f}x | {r['dot_flops'] / base['dot_flops']:.2f}x |"
        )
    print()
    if any(r["xla_flops"] is None for r in results.values()):
        print("XLA's cost_analysis() gave no FLOPs on this backend (n/a).")
    unknown = {name: r["unknown_loops"] for name, r in results.items() if r["unknown_loops"]}
    if unknown:
        print(f"while loops without a known trip count (counted once in matmul GFLOP): {json.dumps(unknown)}")
    print(
        f"XLA GFLOP counts each while-loop body once; matmul GFLOP multiplies by the loops' trip counts. "
        f"The optimizer update alone (clip + AdamW + apply, {n_melt / 1e6:.2f}M params) takes "
        f"{1e3 * optimizer_s:.1f} ms ({100 * optimizer_s / base['step_s']:.1f}% of Ouro's step)."
    )
    print(f"\n{busy_report(times_at_start)}")


if __name__ == "__main__":
    main()
