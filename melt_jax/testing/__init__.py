"""Tiny checkpoints and independent references, shared by the tests and the benchmarks.

- `hf_checkpoints`: tiny Ouro (and MELT gate) checkpoints in Hugging Face layout with random weights,
  written from the checkpoint layout rather than through the converter.
- `torch_ouro`, `torch_melt`: eager PyTorch implementations of Ouro and MELT written from the spec,
  the references the JAX models are checked and timed against. They import nothing of the library
  (tests/test_architecture.py), so an error in the library cannot hide in them. They need torch
  (the `test` or `bench` extra).

The library never imports this package.
"""
