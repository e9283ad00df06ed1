"""The models: configs, layers, Ouro and MELT, their KV caches and KV sources, the exit policies, the
parameter table and the registry of model types (docs/melt.md)."""
