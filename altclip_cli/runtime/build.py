"""Building the network from a model folder: config and weights read and checked against each
other, every tensor cast once, straight into its compute dtype on its device."""
from __future__ import annotations

from pathlib import Path

import torch

from ..cache import weights as weight_cache
from ..errors import CheckpointError, ModelError
from ..nn.checkpoint import check_keys, find_weights, open_lazily, read_state_dict
from ..nn.config import check_against_tensors, read_config
from ..nn.layers import LayerNorm, uninitialised
from ..nn.model import AltCLIPModel
from ..paths import mark_used
from .device import PRECISIONS


def build_model(folder: Path, weights: list[Path] | None, device: torch.device, precision: str,
                cache_key: str | None = None) -> AltCLIPModel:
    """Read config and weights (`weights` None: those found in `folder`), check them against
    each other, and return the model in eval mode on `device`: matmul weights in the compute
    dtype, LayerNorms and logit_scale in fp32.

    cache_key (weight_cache.weights_identity of `weights`): below fp32, keep a copy of the weights
    already cast in altclip's cache, so that later starts memory-map it: no cast, half the
    bytes, and pages of a tower that is not used are never read. None: no cache.
    """
    cfg = read_config(folder)
    weights = weights or find_weights(folder)
    with torch.device("meta"), uninitialised():
        model = AltCLIPModel(cfg)  # shapes only, no memory: the checkpoint's tensors are assigned
    keep_fp32 = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, LayerNorm)
                 for p in ("weight", "bias")} | {"logit_scale"}
    dtype = PRECISIONS[precision]

    def target_dtype(name: str, source: torch.dtype) -> torch.dtype:
        return torch.float32 if name in keep_fp32 or not source.is_floating_point else dtype

    def convert(name: str, tensor: torch.Tensor) -> torch.Tensor:
        # One tensor at a time, straight to its final dtype and device.
        return tensor.to(device=device, dtype=target_dtype(name, tensor.dtype))

    expected = set(model.state_dict().keys())
    cached = weight_cache.compute_weights_path(cache_key, precision) if cache_key and precision != "fp32" else None
    state = _read_cached(cached, convert, cfg, expected) if cached and cached.is_file() else None
    if cached and state is None:
        # First start: cast the checkpoint into the cache a piece at a time, then load the cache
        # as every later start does; the whole model is never in memory twice.
        lazy = open_lazily(weights)
        check_against_tensors(cfg, {k: v.shape for k, v in lazy.items()})
        check_keys(expected, lazy)
        cast = {name: t.cast(target_dtype(name, t.dtype)) for name, t in lazy.items()}
        if weight_cache.save_compute_weights(cast, cached, weights):
            state = _read_cached(cached, convert, cfg, expected)
    if state is None:  # no cache, fp32, or the cache could not be written
        state = read_state_dict(weights, convert)
        check_against_tensors(cfg, {k: tuple(v.shape) for k, v in state.items()})
        check_keys(expected, state)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"the weights do not fit the model: {e}") from None
    if cached:
        mark_used(cached)
    return model.eval().requires_grad_(False)


def _read_cached(path: Path, convert, cfg, expected: set[str]) -> dict | None:
    """The cached weights, or None (and the entry removed) when they are damaged or do not fit
    the model: the weights are then read from the checkpoint and cached again."""
    try:
        state = read_state_dict([path], convert)
        check_against_tensors(cfg, {k: tuple(v.shape) for k, v in state.items()})
        check_keys(expected, state)
        return state
    except ModelError as e:
        weight_cache.log.warning("rebuilding the damaged weight cache %s (%s)", path, e.message)
        weight_cache.discard(path)
        return None
