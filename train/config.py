"""Run configs of the training program: frozen dataclasses read from JSON or YAML files, with
command-line overrides `section.field=value`.

A stage is one of:
  looplm       LoopLM Stage I from scratch (or from `init_from`): sum_t p_t CE_t - beta H(p)
  exit_gate    LoopLM Stage II: only the exit gate trains (needs `init_from`, an Ouro checkpoint)
  melt_phase1  MELT phase 1 from the frozen `teacher`: alpha rises 0 -> 1, all-loop KD
  melt_phase2  MELT phase 2: KD + align_beta * attention alignment (needs `init_from`, the phase-1 MELT)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from pathlib import Path
from typing import Any

from melt_jax.data.synthetic import SyntheticTaskConfig
from melt_jax.errors import ConfigError, DataError, MeltJaxError
from melt_jax.model.attention import DEFAULT_BLOCK, check_implementation
from melt_jax.model.chunking import check_chunk_size, num_chunks
from melt_jax.model.config import GATES, REMAT_POLICIES
from melt_jax.sharding import MeshConfig
from melt_jax.train.optimizer import OptimizerConfig

STAGES = ("looplm", "exit_gate", "melt_phase1", "melt_phase2")


class RunConfigError(MeltJaxError, ValueError):
    """A bad run config: names the field and what is wrong with it."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data: `source` is "synthetic", a local file or folder (.txt/.json/.jsonl/.parquet),
    a tokenized folder (made by `melt-train tokenize`, read from disk with grain), or a hub dataset
    name; `tokenizer` is "byte" or a tokenizer.json path (for a tokenized folder, the one it was made
    with). Sequences of seq_len tokens are packed from the documents."""

    source: str = "synthetic"
    tokenizer: str = "byte"
    text_field: str = "text"
    seq_len: int = 64
    num_examples: int = 20_000  # synthetic corpus size
    eval_examples: int = 256  # held-out synthetic examples for the accuracy metric
    # The synthetic task (melt_jax.data.synthetic.SyntheticTaskConfig; the defaults are its defaults):
    form: str = SyntheticTaskConfig.form  # "chain" ("3+4=*2="), "expression" ("3+4*2=") or "assignments"
    min_hops: int = SyntheticTaskConfig.min_hops  # fewest operations per example
    max_hops: int = SyntheticTaskConfig.max_hops  # most operations per example
    distractors: int = SyntheticTaskConfig.num_distractors  # assignments form: unrelated assignments
    ops: str = "".join(SyntheticTaskConfig.ops)  # operations to draw from, e.g. "+-*"
    modulus: int = SyntheticTaskConfig.modulus  # digits 0..modulus-1, operations modulo it (2..10)
    loss: str = "answer"  # synthetic task: "answer" (loss on the answers only) or "all" (every token)
    shuffle: bool = True
    # Packed rows: true, a token attends only to tokens of its own document (the rows' segment ids,
    # in training and held-out loss); false, to every earlier token of the row, across documents.
    isolate_documents: bool = False

    def synthetic_task(self, num_examples: int, seed: int) -> SyntheticTaskConfig:
        """The synthetic task these fields describe, with `num_examples` examples drawn from `seed`."""
        return SyntheticTaskConfig(
            form=self.form,
            num_examples=num_examples,
            min_hops=self.min_hops,
            max_hops=self.max_hops,
            num_distractors=self.distractors,
            ops=tuple(self.ops),
            modulus=self.modulus,
            seed=seed,
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    stage: str = "looplm"
    output_dir: str = "runs/default"
    model: str = "tiny"  # looplm from scratch: a preset name or a config.json path
    vocab_size: int = 0  # looplm from scratch: > 0 replaces the model's vocab_size (e.g. 258 for bytes)
    num_layers: int = 0  # looplm from scratch: > 0 replaces the model's num_hidden_layers
    intermediate_size: int = 0  # looplm from scratch: > 0 replaces the model's MLP width
    num_heads: int = 0  # looplm from scratch: > 0 replaces the model's query and key/value heads (MHA)
    init_from: str | None = None  # a melt_jax checkpoint directory to start from
    teacher: str | None = None  # MELT phases: the frozen LoopLM teacher's checkpoint directory
    steps: int = 100
    batch_size: int = 16  # global batch, in sequences
    seed: int = 0
    dtype: str = "float32"  # params and activations of the trained model
    # How the models compute attention (OuroConfig.attention): "auto", "xla" (dense), "blockwise",
    # "splash" (TPU kernel) or "cudnn" (GPU kernel).
    attention: str = "auto"
    beta: float = 0.1  # looplm: weight of the exit entropy
    align_beta: float = 0.1  # melt_phase2: weight of the attention alignment
    chunk_size: int = 16  # MELT: the student config's chunk_size (divides data.seq_len)
    forward: str = "two_pass"  # MELT: "two_pass" or "sequential"
    gate_bias_init: float = -4.0  # MELT gates created from an Ouro teacher
    gate: str = "elementwise"  # MELT's KV cache update for a student created from the teacher (MeltConfig.gate)
    remat: str = "none"  # what the trained model's backward pass recomputes (melt_jax.model.remat)
    interpolate: bool = True  # melt_phase1: alpha rises from 0 to 1; false: alpha = 1 from the first step
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    # > 0: the stage ends at the first evaluation whose held-out accuracy (last loop) reaches this, before
    # `steps` (which still sets the learning-rate schedule); needs eval_every and the synthetic task.
    stop_at_accuracy: float = 0.0
    # > 0: the stage ends at the first evaluation whose held-out loss (last loop) is at most this, before
    # `steps`; needs eval_every, on any data (text: the loss over all tokens; synthetic task: over the answers).
    stop_at_loss: float = 0.0
    # > 0: warmup-stable-decay. The learning rate (the optimizer's schedule, "constant" for WSD) is
    # scaled by a factor falling linearly from 1 to 0 over the last decay_steps steps, and the stage
    # ends with them; with decay_at_accuracy > 0 the decay starts earlier, at the first evaluation
    # whose held-out accuracy (last loop) reaches it (needs eval_every and the synthetic task).
    decay_steps: int = 0
    decay_at_accuracy: float = 0.0
    eval_batches: int = 4  # 0: no evaluation
    checkpoint_every: int = 50
    profile_steps: str = ""  # "START:END": a jax.profiler trace of steps START..END in output_dir/profile
    keep_checkpoints: int = 2
    async_checkpoints: bool = True
    progress: bool = True
    tensorboard: bool = True  # also write TensorBoard scalars when tensorboardX is installed
    optimizer: OptimizerConfig = OptimizerConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()

    def profile_range(self) -> tuple[int, int] | None:
        """(first, last) step of `profile_steps`, counted from 1; None when not profiling."""
        return _parse_profile_steps(self.profile_steps, self.steps)

    def validate(self) -> TrainConfig:
        """Raises RunConfigError naming the first field whose value cannot describe a runnable stage;
        returns the config."""
        if self.stage not in STAGES:
            raise RunConfigError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        self._check_counts()
        self._check_data()
        if self.forward not in ("two_pass", "sequential"):
            raise RunConfigError(f"forward must be 'two_pass' or 'sequential', got {self.forward!r}")
        self._check_schedule()
        self._check_accuracy_triggers()
        self.profile_range()
        self._check_model_choices()
        self._check_stage_inputs()
        return self

    def _check_counts(self) -> None:
        """Step counts and the batch are >= 1; the model-size overrides >= 0."""
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise RunConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("vocab_size", "num_layers", "intermediate_size", "num_heads"):
            if getattr(self, name) < 0:
                raise RunConfigError(f"{name} must be >= 0 (0 keeps the model's own), got {getattr(self, name)}")

    def _check_data(self) -> None:
        """The loss kind, the row length and, for the synthetic source, its task."""
        if self.data.loss not in ("answer", "all"):
            raise RunConfigError(f"data.loss must be 'answer' or 'all', got {self.data.loss!r}")
        if self.data.seq_len < 2:
            raise RunConfigError(f"data.seq_len must be >= 2, got {self.data.seq_len}")
        if self.data.source == "synthetic":
            try:
                self.data.synthetic_task(num_examples=1, seed=0)
            except DataError as e:
                raise RunConfigError(f"data: {e}") from None

    def _check_schedule(self) -> None:
        """The accuracy thresholds are fractions; the decay fits in the stage and has a length when an
        accuracy starts it."""
        if not 0 <= self.stop_at_accuracy <= 1:
            raise RunConfigError(f"stop_at_accuracy must be in [0, 1] (0: off), got {self.stop_at_accuracy}")
        if self.stop_at_loss < 0:
            raise RunConfigError(f"stop_at_loss must be >= 0 (0: off), got {self.stop_at_loss}")
        if not 0 <= self.decay_steps <= self.steps:
            raise RunConfigError(
                f"decay_steps must be in [0, steps={self.steps}] (0: no decay), got {self.decay_steps}"
            )
        if not 0 <= self.decay_at_accuracy <= 1:
            raise RunConfigError(f"decay_at_accuracy must be in [0, 1] (0: off), got {self.decay_at_accuracy}")
        if self.decay_at_accuracy and not self.decay_steps:
            raise RunConfigError("decay_at_accuracy needs decay_steps > 0 (the length of the decay it starts)")

    def _check_accuracy_triggers(self) -> None:
        """At most one of stop_at_accuracy and decay_at_accuracy, and a held-out accuracy to trigger it;
        a held-out evaluation for stop_at_loss."""
        if self.decay_at_accuracy and self.stop_at_accuracy:
            raise RunConfigError(
                "set stop_at_accuracy (stop at once) or decay_at_accuracy (decay, then stop), not both"
            )
        if self.stop_at_loss and not (self.eval_every and self.eval_batches):
            raise RunConfigError("stop_at_loss needs eval_every > 0 and eval_batches > 0 (the held-out loss it reads)")
        measured = self.eval_every and self.eval_batches and self.data.source == "synthetic"
        for name in ("stop_at_accuracy", "decay_at_accuracy"):
            if getattr(self, name) and not measured:
                raise RunConfigError(
                    f"{name} needs eval_every > 0, eval_batches > 0 and data.source=synthetic "
                    "(the accuracy is measured on the synthetic task's held-out examples)"
                )

    def _check_model_choices(self) -> None:
        """Known remat policy, MELT gate and attention implementation; a chunk that divides the rows
        of a MELT stage."""
        if self.remat not in REMAT_POLICIES:
            raise RunConfigError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")
        if self.gate not in GATES:
            raise RunConfigError(f"gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        try:
            check_implementation(self.attention, DEFAULT_BLOCK, DEFAULT_BLOCK, "attention")
            check_chunk_size(self.chunk_size)
            if self.stage.startswith("melt"):
                num_chunks(self.data.seq_len, self.chunk_size, "data.seq_len")
        except ConfigError as e:
            raise RunConfigError(str(e)) from None

    def _check_stage_inputs(self) -> None:
        """The checkpoints a stage starts from are named."""
        if self.stage.startswith("melt") and not self.teacher:
            raise RunConfigError(f"stage {self.stage} needs teacher= (the LoopLM checkpoint to distill)")
        if self.stage in ("exit_gate", "melt_phase2") and not self.init_from:
            raise RunConfigError(f"stage {self.stage} needs init_from= (the checkpoint to continue from)")


def _parse_profile_steps(text: str, total_steps: int) -> tuple[int, int] | None:
    if not text:
        return None
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise RunConfigError(f"profile_steps must be START:END (step numbers, e.g. 10:12), got {text!r}")
    start, end = int(parts[0]), int(parts[1])
    if not 1 <= start <= end <= total_steps:
        raise RunConfigError(f"profile_steps {text!r}: need 1 <= START <= END <= steps ({total_steps})")
    return start, end


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, annotation: Any, name: str) -> Any:
    """`value` (from a file or the command line) as the field's type."""
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise RunConfigError(f"{name} must be a mapping, got {value!r}")
        return from_dict(annotation, value, prefix=f"{name}.")
    args = typing.get_args(annotation)
    if value is None and type(None) in args:
        return None
    target = next((a for a in args if a is not type(None)), annotation)
    try:
        if target is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if target is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return target(value)
    except (TypeError, ValueError):
        raise RunConfigError(f"{name} must be {getattr(target, '__name__', target)}, got {value!r}") from None


def _near_misses(key: str, types: dict[str, Any], prefix: str) -> list[str]:
    """The fields of a config meant by the unknown `key`: those of a section holding a field `key`
    (e.g. train.data for data on the pipeline), and those spelled like it (difflib)."""
    sections = [name for name, t in types.items() if dataclasses.is_dataclass(t) and key in _field_types(t)]
    close = difflib.get_close_matches(key, list(types), n=3, cutoff=0.6)
    return [f"{prefix}{name}.{key}" for name in sections] + [prefix + name for name in close]


def from_dict(cls, values: dict[str, Any], prefix: str = ""):
    """An instance of the dataclass `cls` from a (nested) dict; unknown keys are errors naming the
    fields they may have meant."""
    types = _field_types(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        named = []
        for key in unknown:
            hints = _near_misses(key, types, prefix)
            named.append(prefix + key + (f" (did you mean {' or '.join(hints)}?)" if hints else ""))
        raise RunConfigError(f"unknown config field(s) {', '.join(named)}; `melt-train show-config` lists the fields")
    converted = {k: _convert(v, types[k], prefix + k) for k, v in values.items()}
    try:
        return cls(**converted)
    except (TypeError, ValueError) as e:
        if isinstance(e, MeltJaxError):
            raise
        raise RunConfigError(str(e)) from None


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """ "a.b=value" -> (["a", "b"], value), the value read as JSON when it parses, else as a string."""
    if "=" not in text:
        raise RunConfigError(
            f"override {text!r} is not of the form field=value (e.g. steps=200, optimizer.learning_rate=3e-4)"
        )
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    values = json.loads(json.dumps(values))  # a deep copy
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise RunConfigError(f"override {text!r}: {key} is not a section")
        node[keys[-1]] = value
    return values


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON or YAML (.yaml/.yml) file as a dict; RunConfigError naming the file when unreadable."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise RunConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is reported with the file name
        raise RunConfigError(f"config file {path} does not parse: {e}") from None
    if not isinstance(values, dict):
        raise RunConfigError(f"config file {path} must hold a mapping of fields")
    return values


def load_train_config(
    path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None
) -> TrainConfig:
    """A validated TrainConfig from defaults, then `base`, then a file, then overrides."""
    values = dict(base or {})
    if path is not None:
        values.update(read_config_file(path))
    return from_dict(TrainConfig, apply_overrides(values, list(overrides))).validate()
