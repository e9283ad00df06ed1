"""Data for training and evaluation: text sources, tokenizers, packing into rows, the resumable batch
iterator and the embedded synthetic task."""
