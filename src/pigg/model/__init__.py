"""The model: loading, freezing, adapters, and how a batch is split to fit the GPU."""
