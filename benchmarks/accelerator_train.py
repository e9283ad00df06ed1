"""Training throughput of LoopLM Stage I and of MELT's two distillation phases on whatever device JAX
has (CPU, GPU, TPU): compile time, step time, tokens/s, model TFLOP/s and MFU, peak device memory.

One step is the training program's own (melt_jax.train): the run config is made by
`load_train_config(None, overrides)`, the stage by `build_task(cfg, mesh, abstract=True)` (so the
teacher and the student may be presets or config.json files), the optimizer by `build_optimizer`
(AdamW, global-norm clipping), the state by `init_state` and the step by `jit_train_step`, on a mesh
of the first device only (per-chip figures). bf16 params and activations, remat=full, random tokens.
Params are random and made on the device by jitted inits: the trained model's by `init_state`
(`init_params` of the task set to None), the frozen teacher's here, with the shardings of the
task's abstract teacher. The state is donated and fed back step after step, as in training.

Stages: `looplm` (Stage I on the teacher's shapes), `phase1` (MELT phase 1: two-pass forward,
keys/values interpolated between Ouro's and MELT's; alpha traced from the step number) and `phase2`
(two-pass, KD + attention alignment), both against the frozen teacher.
Full shapes (`--full`, the default off CPU): teacher Ouro-1.4B (`OuroConfig.preset("ouro-1.4b")`),
student MELT-1.6B (`MeltConfig.from_ouro(teacher, chunk_size=512)`), batch 2 x 4,096 tokens, and
1 x 8,192 for Stage I. `--small` (the default on CPU): H=128, L=2, T=4, 2 heads of 64, I=344,
V=512, batch 2 x 256 (and 1 x 512), chunk 64. `--teacher` / `--student` name other shapes.

Cases are named STAGE-BxS-ATTENTION (e.g. looplm-2x4096-auto), one per stage and shape for each
implementation of `--attention` (the config field `attention`; default auto, blockwise and the
kernels "auto" picks from on the platform: cudnn and pallas_gpu on GPU, splash on TPU). A kernel
bound to another platform (cudnn off GPU) is a row saying it was skipped.

Model FLOPs, counted from the configs (not from XLA), per token of a sequence of S tokens:
    forward(model, head) = T * (2 * P_layers + 2 * L * S * heads * head_dim)  +  head * T * 2 * H * V
where P_layers is the number of params of the L layers (all of them: projections, norms, MELT's KV
gates), 2 * L * S * heads * head_dim the causal attention (scores and values, on average S / 2
keys per query), and 2 * H * V the head, run once per loop (the per-loop losses).
    looplm        3 * forward(ouro, head)            (forward and a backward of twice its cost)
    phase1/2      3 * forward(student, head)         the trained second pass
                  + forward(student, no head)        the two-pass forward's first pass (no gradient)
                  + forward(teacher, head)           the frozen teacher, per-loop logits for the KD
The recomputation of remat=full and elementwise work (norms, softmax, losses, the optimizer) are
not counted: the figures are model FLOPs, as MFU counts them.

Measured per case:
    compile_s           lower + compile of the step
    step_s              median of --repeats steps after one warm-up step (block_until_ready)
    tokens_per_s        batch * S / step_s
    model_tflops_per_s  model FLOPs per step / step_s / 1e12
    mfu                 model FLOP/s / --peak-tflops (default from the device kind: dense bf16 H200
                        and H100 SXM 989, TPU v5p 459, v6e 918, v5e 197; None on CPU unless given)
    peak_bytes          `device.memory_stats()["peak_bytes_in_use"]` after the case: the process's
                        peak so far (None where the backend has none)
    loss                the last step's loss (a non-finite loss makes the row an error)
A case that fails (e.g. out of memory) is a row with its error. Each row is appended to --out as one
JSON line as soon as its case ends; a markdown table is printed at the end.

    python benchmarks/accelerator_train.py [--small | --full] [--cases ...] [--attention auto,blockwise]
        [--repeats 3] [--out FILE] [--peak-tflops 989] [--teacher NAME] [--student CONFIG_JSON]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from accelerator import SMALL, peak_bytes, report, select

from melt_jax.model import MeltConfig, OuroConfig, abstract_params, config_from_json_file, model_for
from melt_jax.model.attention import AUTO_KERNELS, KERNELS, describe_attention
from melt_jax.sharding import batch_sharding, check_batch_divisible, make_mesh
from melt_jax.train.config import load_train_config
from melt_jax.train.optimizer import build_optimizer
from melt_jax.train.steps import init_state, jit_train_step, shardings_of
from melt_jax.train.tasks import build_task

STAGES = {"looplm": "looplm", "phase1": "melt_phase1", "phase2": "melt_phase2"}
# (substring of jax's device_kind, dense bf16 FLOP/s), first match wins: "TPU v5 lite" is v5e, "TPU v5" v5p.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("v6 lite", 918e12),
    ("v6e", 918e12),
    ("v5 lite", 197e12),
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("TPU v5", 459e12),
)
DTYPE = "bfloat16"
SCHEDULE_STEPS = 1000  # the run's length for the learning-rate schedule and phase 1's alpha


@dataclasses.dataclass(frozen=True)
class Case:
    stage: str  # a key of STAGES
    batch: int
    seq: int
    attention: str

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.batch}x{self.seq}-{self.attention}"


def all_cases(small: bool, attentions: list[str]) -> list[Case]:
    """Every stage at batch x S, Stage I also at half the batch and twice S; grouped by attention."""
    batch, seq = (2, 256) if small else (2, 4096)
    shapes = [("looplm", batch, seq), ("phase1", batch, seq), ("phase2", batch, seq), ("looplm", batch // 2, 2 * seq)]
    return [Case(stage, b, s, attention) for attention in attentions for stage, b, s in shapes]


def default_attentions(platform: str) -> list[str]:
    return ["auto", "blockwise", *AUTO_KERNELS.get(platform, ())]


def named_config(name: str) -> OuroConfig:
    """The config a preset name or a config.json path names, in bf16 (as build_task reads it)."""
    config = config_from_json_file(name) if Path(name).is_file() else OuroConfig.preset(name)
    return config.replace(dtype=DTYPE, param_dtype=DTYPE)


def model_files(args, folder: Path) -> tuple[str, str]:
    """(teacher, student) names for the run config: --teacher, else Ouro-1.4B's shapes (small: tiny
    ones) written as a config.json under `folder`; --student, else the MELT config made from the
    teacher (`MeltConfig.from_ouro`, chunk --chunk) written there."""
    teacher = args.teacher
    if teacher is None:
        teacher = str(folder / "teacher.json")
        Path(teacher).write_text(OuroConfig.preset("ouro-1.4b", **(SMALL if args.small else {})).to_json_string())
    student = args.student
    if student is None:
        student = str(folder / "student.json")
        Path(student).write_text(MeltConfig.from_ouro(named_config(teacher), chunk_size=args.chunk).to_json_string())
    return teacher, student


def train_config(case: Case, teacher: str, student: str, chunk: int):
    """The validated run config of a case: one device, bf16, remat=full, AdamW (the defaults)."""
    overrides = [
        f"stage={STAGES[case.stage]}",
        f"batch_size={case.batch}",
        f"data.seq_len={case.seq}",
        f"attention={case.attention}",
        f"dtype={DTYPE}",
        "remat=full",
        f"steps={SCHEDULE_STEPS}",
        "mesh.num_devices=1",
    ]
    if case.stage == "looplm":
        overrides.append(f"model={teacher}")
    else:
        overrides += [f"teacher={teacher}", f"init_from={student}", f"chunk_size={chunk}"]
    return load_train_config(None, overrides)


# --------------------------------------------------------------------------------------------------
# Model FLOPs


def layer_params(config: OuroConfig) -> int:
    """Params of the L layers (stacked "layers" or unrolled "layers_<i>"), from the shapes."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params(model_for(config))):
        if str(getattr(path[0], "key", path[0])).startswith("layers"):
            total += math.prod(leaf.shape)
    return total


def forward_flops(config: OuroConfig, seq: int, head: bool = True) -> int:
    """Model FLOPs per token of one forward over S = `seq` tokens (the module docstring's formula)."""
    c = config
    attention = 2 * c.num_hidden_layers * seq * c.num_attention_heads * c.head_dim
    per_loop = 2 * layer_params(c) + attention + (2 * c.hidden_size * c.vocab_size if head else 0)
    return c.total_ut_steps * per_loop


def step_flops_per_token(stage: str, teacher: OuroConfig, student: OuroConfig, seq: int) -> int:
    """Model FLOPs per training token of one step of `stage` (the module docstring's counts)."""
    if stage == "looplm":
        return 3 * forward_flops(teacher, seq)
    return 3 * forward_flops(student, seq) + forward_flops(student, seq, head=False) + forward_flops(teacher, seq)


# --------------------------------------------------------------------------------------------------
# One case


def skip_reason(attention: str, platform: str) -> str | None:
    """Why `attention` cannot run on `platform` (a kernel bound to another platform), else None."""
    needs = KERNELS.get(attention)
    if needs is not None and needs.platform not in (None, platform):
        return f"skipped: {attention} runs only on {needs.platform}, this device is {platform}"
    return None


def random_teacher(teacher_name: str, abstract: dict) -> dict:
    """Random teacher params made on the device by a jitted init, with the shardings, shapes and
    dtypes of the task's abstract teacher params."""
    model = model_for(named_config(teacher_name))
    init = jax.jit(
        lambda rng: model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"], out_shardings=shardings_of(abstract)
    )
    params = init(jax.random.key(1))
    same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, params, abstract)
    if not all(jax.tree.leaves(same)):
        raise ValueError(f"the teacher {teacher_name} made here differs from the task's teacher")
    return params


def random_batch(fields: tuple[str, ...], batch: int, seq: int, vocab: int, mesh) -> dict:
    tokens = np.random.default_rng(0).integers(0, vocab, (batch, seq), dtype=np.int32)
    values = {"tokens": tokens, "loss_mask": np.ones((batch, seq), np.float32)}
    values["segment_ids"] = np.zeros((batch, seq), np.int32)
    return {name: jax.device_put(values[name], batch_sharding(mesh)) for name in fields}


def time_case(case: Case, teacher: str, student: str, chunk: int, repeats: int) -> dict:
    """Build the stage, compile its step, run one warm-up step and `repeats` timed ones."""
    cfg = train_config(case, teacher, student, chunk)
    mesh = make_mesh(cfg.mesh)
    check_batch_divisible(cfg.batch_size, mesh)
    task = build_task(cfg, mesh, abstract=True)
    # The trained model is initialised on the device by init_state; the teacher here.
    teacher_params = None if task.teacher_params is None else random_teacher(teacher, task.teacher_params)
    task = dataclasses.replace(task, init_params=None, teacher_params=teacher_params)
    optimizer = build_optimizer(cfg.optimizer, abstract_params(task.model), cfg.steps, task.trainable)
    state = init_state(task, cfg, mesh, optimizer)
    teacher_shardings = None if teacher_params is None else shardings_of(teacher_params)
    step = jit_train_step(task, optimizer, shardings_of(state), teacher_shardings, mesh, cfg.steps, cfg.decay_steps)
    batch = random_batch(task.batch_fields, case.batch, case.seq, task.config.vocab_size, mesh)

    start = time.perf_counter()
    with jax.set_mesh(mesh):  # the models' activation sharding and attention choices follow the mesh
        compiled = step.lower(state, teacher_params, batch).compile()
    compile_s = time.perf_counter() - start
    print(f"  compiled in {compile_s:.1f} s", flush=True)

    state, metrics = jax.block_until_ready(compiled(state, teacher_params, batch))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(compiled(state, teacher_params, batch))
        times.append(time.perf_counter() - start)
    return dict(compile_s=compile_s, step_s=statistics.median(times), times=times, loss=float(metrics["loss"]))


def measure(case: Case, args, device, models: dict) -> dict:
    teacher_config, student_config = models["configs"]
    row = dict(case=case.name, stage=STAGES[case.stage], attention=case.attention, batch=case.batch, seq=case.seq)
    row.update(device=device.device_kind, attention_used=describe_attention(case.attention, device.platform))
    per_token = step_flops_per_token(case.stage, teacher_config, student_config, case.seq)
    row.update(model_flops_per_token=per_token, model_flops_per_step=per_token * case.batch * case.seq)
    start = time.perf_counter()
    if reason := skip_reason(case.attention, device.platform):
        row.update(error=reason)
    else:
        try:
            row.update(time_case(case, models["teacher"], models["student"], args.chunk, args.repeats), error=None)
            row["tokens_per_s"] = case.batch * case.seq / row["step_s"]
            row["model_tflops_per_s"] = row["model_flops_per_step"] / row["step_s"] / 1e12
            row["mfu"] = row["model_tflops_per_s"] * 1e12 / args.peak_flops if args.peak_flops else None
            if not math.isfinite(row["loss"]):
                row["error"] = f"the loss is {row['loss']}"
        except Exception as e:  # out of memory and other failures are rows, not crashes
            row.update(error=f"{type(e).__name__}: {str(e)[:500]}")
    row["wall_s"] = time.perf_counter() - start
    row["peak_bytes"] = peak_bytes(device)
    return row


# --------------------------------------------------------------------------------------------------


def default_peak_flops(device) -> float | None:
    kind = device.device_kind.lower()
    return next((value for key, value in PEAK_FLOPS if key.lower() in kind), None)


def table(rows: list[dict]) -> str:
    lines = [
        "| case | compile s | step s | tokens/s | model TFLOP/s | MFU | peak GB | loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "step_s" not in r:
            lines.append(f"| {r['case']} | {(r['error'] or '')[:160]} | | | | | | |")
            continue
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        peak = "-" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 1e9:.2f}"
        loss = f"{r['loss']:.4f}" + (f" ({r['error']})" if r["error"] else "")
        lines.append(
            f"| {r['case']} | {r['compile_s']:.1f} | {r['step_s']:.4f} | {r['tokens_per_s']:,.0f} | "
            f"{r['model_tflops_per_s']:.2f} | {mfu} | {peak} | {loss} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", default=None, help="tiny shapes (default on CPU)")
    size.add_argument("--full", dest="small", action="store_false", help="the real shapes (default off CPU)")
    parser.add_argument("--cases", help="comma-separated case names, e.g. looplm-2x4096-auto (default: all)")
    parser.add_argument(
        "--attention",
        help="comma-separated implementations (default: auto, blockwise, the platform's kernels)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="append one JSON line per case to this file")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, TFLOP/s (for MFU)")
    parser.add_argument("--chunk", type=int, help="MELT's chunk_size (default 512; small 64)")
    parser.add_argument("--teacher", help="the teacher's (and Stage I's) preset or config.json (default Ouro-1.4B)")
    parser.add_argument("--student", help="the MELT student's config.json (default: MeltConfig.from_ouro(teacher))")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = jax.devices()[0]
    if args.small is None:
        args.small = device.platform == "cpu"
    args.chunk = args.chunk or (64 if args.small else 512)
    args.peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else default_peak_flops(device)
    attentions = args.attention.split(",") if args.attention else default_attentions(device.platform)
    cases = select(all_cases(args.small, [a.strip() for a in attentions if a.strip()]), args.cases)
    with tempfile.TemporaryDirectory() as folder:
        teacher, student = model_files(args, Path(folder))
        configs = (named_config(teacher), config_from_json_file(student, dtype=DTYPE, param_dtype=DTYPE))
        models = dict(teacher=teacher, student=student, configs=configs)
        print(f"device {device.device_kind} ({device.platform}), jax {jax.__version__}, peak FLOP/s {args.peak_flops}")
        print(
            f"{'small' if args.small else 'full'} shapes, teacher {Path(teacher).name}, student "
            f"{Path(student).name}, MELT chunk {args.chunk}, repeats {args.repeats}, {len(cases)} cases",
            flush=True,
        )
        rows = []
        for case in cases:
            print(f"{case.name} ...", flush=True)
            rows.append(report(measure(case, args, device, models), args.out))
    print()
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
