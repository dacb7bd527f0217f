"""The network and its weights: config (one dataclass per tower), layers, the two towers, the
composed model, and checkpoint reading and writing. The model knows nothing of devices or
precision (runtime/ owns those). Importing the package itself is cheap; its modules need torch."""
