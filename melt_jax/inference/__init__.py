"""Running a trained model: prefill and decode steps, generation and sampling, text generation,
self-speculative decoding, teacher-forced evaluation and loading a checkpoint for inference.

Import from this package (`from melt_jax.inference import generate, SamplingConfig`); the modules
inside it import each other directly. Three modules are imported by name because they need an
optional extra or are programs: `quantization` (int8 weights, the `int8` extra), `lm_eval_adapter`
(the `eval` extra) and the command lines `cli_generate` (melt-generate) and `cli_eval` (melt-eval).
"""

from melt_jax.inference.batching import DEFAULT_BATCH_BUCKETS, DEFAULT_BUCKETS, bucket_length, check_prompts
from melt_jax.inference.decoding import (
    DecodeState,
    check_tokens_fit,
    decode_step,
    decode_until,
    forward,
    prefill,
    start_generation,
)
from melt_jax.inference.evaluation import (
    LossSums,
    answer_accuracy,
    answer_matches,
    evaluate_dataset,
    hidden_states,
    loop_answer_matches,
    loop_logits,
    loss_sums,
    per_loop_losses,
    perplexity,
    teacher_forced_exact_match,
    token_log_probs,
)
from melt_jax.inference.generation import (
    LENGTH,
    STOP_TOKEN,
    STOPPED,
    GenerationResult,
    GenerationRun,
    GenerationTiming,
    generate,
    generation_run,
)
from melt_jax.inference.model_loading import load_model
from melt_jax.inference.param_check import ParamMismatches, check_params, param_mismatches
from melt_jax.inference.sampling import SamplingConfig
from melt_jax.inference.speculative import (
    SpeculativeResult,
    SpeculativeRun,
    SpeculativeStats,
    generate_speculative,
    speculative_run,
)
from melt_jax.inference.text_generation import (
    TextGenerator,
    TextResult,
    TextRun,
    chat_prompt,
    cut_at_stops,
    stop_token_ids,
)

__all__ = [
    "DEFAULT_BATCH_BUCKETS",
    "DEFAULT_BUCKETS",
    "LENGTH",
    "STOPPED",
    "STOP_TOKEN",
    "DecodeState",
    "GenerationResult",
    "GenerationRun",
    "GenerationTiming",
    "LossSums",
    "ParamMismatches",
    "SamplingConfig",
    "SpeculativeResult",
    "SpeculativeRun",
    "SpeculativeStats",
    "TextGenerator",
    "TextResult",
    "TextRun",
    "answer_accuracy",
    "answer_matches",
    "bucket_length",
    "chat_prompt",
    "check_params",
    "check_prompts",
    "check_tokens_fit",
    "cut_at_stops",
    "decode_step",
    "decode_until",
    "evaluate_dataset",
    "forward",
    "generate",
    "generate_speculative",
    "generation_run",
    "hidden_states",
    "load_model",
    "loop_answer_matches",
    "loop_logits",
    "loss_sums",
    "param_mismatches",
    "per_loop_losses",
    "perplexity",
    "prefill",
    "speculative_run",
    "start_generation",
    "stop_token_ids",
    "teacher_forced_exact_match",
    "token_log_probs",
]
