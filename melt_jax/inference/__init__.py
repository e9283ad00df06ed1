"""Running a trained model: prefill and decode steps, generation and sampling, teacher-forced
evaluation, the lm-evaluation-harness adapter and the melt-generate / melt-eval command lines."""
