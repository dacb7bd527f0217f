"""Where the image tower's time goes on this CPU, step by step, against the limit bench/run.py
measures (its matmul rate / the tower's FLOPs per image), and how near that limit the tower's
own kernels let it come.

    python bench/tower.py                  # the bench's random model with BAAI/AltCLIP's shapes
    python bench/tower.py --model DIR      # any AltCLIP folder
    python bench/tower.py --out FILE       # also write the tables (markdown) to FILE

Random pixels, `images_per_pass` images a pass (as `encode_pixel_batch` runs them), after one
warm-up pass; medians over `--passes` passes (default 5). A benchmark, not a test: it prints
tables and takes about a minute on 2 cores.

The steps are timed with the wall clock between them (the CPU runs each op to its end before the
next starts), not with torch.profiler, which inflates oneDNN calls that carry a post-op about 4x.
To time them it runs the tower's layers one step at a time, through the tower's own modules, and
checks that the result equals `encode_pixel_batch`'s bit for bit, so the profile is of the code
that runs. A change to the tower's forward that this file does not follow fails that check.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from argparse import Namespace
from collections import defaultdict
from pathlib import Path

import torch

import fixtures  # the bench's own modules, beside this script (sys.path[0] when it runs)
from report import vit_image_flops
from worker import task_matmul

TARGET = 0.85  # of the limit: the goal bench/run.py's table states


class Steps:
    """Wall-clock seconds per named step, accumulated between calls of `lap`."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._last = time.perf_counter()

    def start(self) -> None:
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] += now - self._last
        self._last = now


def tower_by_steps(clip, pixels: torch.Tensor, steps: Steps) -> torch.Tensor:
    """encode_pixel_batch's work for one pass, one step at a time: (B, 3, H, W) -> (B, P).

    Mirrors VisionTower.forward, VisionLayer.add_to_, SelfAttention.forward and MLP.add_to_
    (altclip_cli/nn/vision.py) on the oneDNN path (bf16 on the CPU); `main` checks the result
    against the tower's."""
    from altclip_cli.nn.layers import attention

    model = clip.model
    tower = model.vision_model
    steps.start()
    h = tower.pre_layrnorm(tower.embeddings(pixels))
    steps.lap("patch embedding + pre-LN")
    for layer in tower.encoder.layers:
        sa, mlp = layer.self_attn, layer.mlp
        x = layer.layer_norm1(h)
        steps.lap("layer norm 1 (fp32)")
        x = x.to(sa.q_proj.weight.dtype)
        steps.lap("cast to bf16")
        q, k, v = sa.q_proj(x), sa.k_proj(x), sa.v_proj(x)
        steps.lap("q, k, v projections")
        a = attention(q, k, v, sa.heads)
        steps.lap("attention")
        a = sa.out_proj(a)
        steps.lap("out projection")
        h.add_(a)
        steps.lap("residual add 1")
        post_op, algorithm, s = mlp.fc1.onednn_activation(mlp.activation)
        x = layer.layer_norm2(h, scale=s)
        steps.lap("layer norm 2 (fp32)")
        x = mlp.fc1.onednn(x, post_op, algorithm, bias_scale=s)
        steps.lap("fc1 + activation")
        x = mlp.fc2.onednn(x, bias_scale=s)
        steps.lap("fc2")
        h.add_(x, alpha=1 / s)
        steps.lap("residual add 2")
    out = model.visual_projection(tower.post_layernorm(h[:, 0])).float()
    steps.lap("post-LN + projection")
    return out


def step_flops(vision, images: int) -> dict[str, float]:
    """FLOPs of one pass of `images` images, by step (matrix products only, as vit_image_flops)."""
    d, mlp, layers, t = vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_positions
    per_layer = {"q, k, v projections": 3 * 2 * t * d * d, "attention": 2 * 2 * t * t * d,
                 "out projection": 2 * t * d * d, "fc1 + activation": 2 * t * d * mlp, "fc2": 2 * t * mlp * d}
    flops = {name: f * layers * images for name, f in per_layer.items()}
    flops["patch embedding + pre-LN"] = 2 * (t - 1) * vision.num_channels * vision.patch_size ** 2 * d * images
    return flops


def median_steps(clip, pixels: torch.Tensor, passes: int) -> tuple[dict[str, float], float]:
    """Median seconds per step and per pass over `passes` passes (after one warm-up pass)."""
    tower_by_steps(clip, pixels, Steps())
    per_step, totals = defaultdict(list), []
    for _ in range(passes):
        steps = Steps()
        start = time.perf_counter()
        tower_by_steps(clip, pixels, steps)
        totals.append(time.perf_counter() - start)
        for name, s in steps.seconds.items():
            per_step[name].append(s)
    return {name: statistics.median(v) for name, v in per_step.items()}, statistics.median(totals)


def isolated_rates(clip, images: int, passes: int) -> list[tuple[str, float, float]]:
    """(kernel, GFLOP/s, FLOPs) of the tower's kernels alone, on random inputs of a pass's shape:
    each linear kind over every layer's own weights in turn (each weight read once a pass, as in
    the tower), fc1 with and without its activation, and attention."""
    from altclip_cli.nn.layers import attention

    tower = clip.model.vision_model
    vision = clip.model.config.vision
    d, mlp_d, t, heads = vision.hidden_size, vision.intermediate_size, vision.num_positions, vision.num_attention_heads
    layers = tower.encoder.layers
    dtype = layers[0].mlp.fc1.weight.dtype
    x_d = torch.randn(images, t, d, dtype=dtype)
    x_mlp = torch.randn(images, t, mlp_d, dtype=dtype)
    first = layers[0].mlp
    with torch.inference_mode():  # oneDNN's linear is only taken without autograd
        fc1_act = first.fc1.onednn_activation(first.activation)

    def fc1_with_activation(layer):
        if fc1_act is None:
            return layer.mlp.act(layer.mlp.fc1(x_d))
        return layer.mlp.fc1.onednn(x_d, fc1_act[0], fc1_act[1], bias_scale=fc1_act[2])

    kernels = {
        "q/k/v/out projection (D -> D)": (lambda L: L.self_attn.q_proj(x_d), 2 * t * d * d),
        "fc1 without its activation": (lambda L: L.mlp.fc1(x_d), 2 * t * d * mlp_d),
        "fc1 + activation": (fc1_with_activation, 2 * t * d * mlp_d),
        "fc2": (lambda L: L.mlp.fc2(x_mlp), 2 * t * mlp_d * d),
        "attention": (lambda L: attention(x_d, x_d, x_d, heads), 2 * 2 * t * t * d),
    }
    rates = []
    with torch.inference_mode():
        for name, (fn, flops) in kernels.items():
            for layer in layers:  # warm-up: oneDNN creates its primitives
                fn(layer)
            times = []
            for _ in range(passes):
                start = time.perf_counter()
                for layer in layers:
                    fn(layer)
                times.append(time.perf_counter() - start)
            total = flops * images * len(layers)
            rates.append((name, total / statistics.median(times) / 1e9, total))
    return rates


def report(clip, images: int, per_step: dict, total: float, rates: list, matmul: dict) -> list[str]:
    vision = clip.model.config.vision
    precision = matmul["precision"]
    limit_gflops = matmul[f"{precision}_gflops"]
    per_image = vit_image_flops(vision)
    flops = step_flops(vision, images)
    rate = images / total
    limit = limit_gflops * 1e9 / per_image
    lines = [f"Image tower, {images} images a pass, {precision}, {torch.get_num_threads()} threads: "
             f"{rate:.2f} images/s = {rate / limit:.0%} of the limit ({limit:.2f} images/s: "
             f"{precision} matmul {limit_gflops:,.0f} GFLOP/s / {per_image / 1e9:.1f} GFLOP an image).", "",
             "| step | ms a pass | share of the time | GFLOP/s | % of the matmul rate |",
             "|---|---:|---:|---:|---:|"]
    for name, s in sorted(per_step.items(), key=lambda kv: -kv[1]):
        g = flops.get(name, 0) / s / 1e9 if name in flops else None
        lines.append(f"| {name} | {1000 * s:.1f} | {s / total:.1%} | {'' if g is None else f'{g:,.0f}'} | "
                     f"{'' if g is None else f'{g / limit_gflops:.0%}'} |")
    lines.append(f"| whole pass | {1000 * total:.1f} | 100% | {per_image * images / total / 1e9:,.0f} | "
                 f"{per_image * images / total / 1e9 / limit_gflops:.0%} |")

    lines += ["", f"Kernels alone, on a pass's shapes ({vision.num_positions} tokens; linear layers over every "
              "layer's weights in turn):", "",
              "| kernel | GFLOP/s | % of the matmul rate |", "|---|---:|---:|"]
    lines += [f"| {name} | {g:,.0f} | {g / limit_gflops:.0%} |" for name, g, _ in rates]

    # The best these kernels allow: every matrix product at its rate alone (the table above),
    # the norms, casts and adds as they take now.
    alone = {name: g * 1e9 for name, g, _ in rates}
    products = {"q, k, v projections": "q/k/v/out projection (D -> D)", "out projection": "q/k/v/out projection (D -> D)",
                "fc1 + activation": "fc1 + activation", "fc2": "fc2", "attention": "attention"}
    rest = total - sum(per_step[n] for n in products)
    best = rest + sum(flops[n] / alone[k] for n, k in products.items())
    budget = images * per_image / (TARGET * limit_gflops * 1e9)
    lines += ["", f"With every matrix product at its rate alone and the rest (norms, casts, adds, "
              f"{1000 * rest:.0f} ms) as now, a pass would take {1000 * best:.0f} ms: "
              f"{images / best:.2f} images/s, {images / best / limit:.0%} of the limit. "
              f"{TARGET:.0%} of the limit needs a pass of at most {1000 * budget:.0f} ms."]
    return lines


def count(text: str) -> int:
    """argparse type of --passes: a median needs one pass at least."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: at least 1")
    return n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="an AltCLIP folder (default: the bench's random model, made if missing)")
    p.add_argument("--cache", type=Path, default=fixtures.DEFAULT_CACHE,
                   help="where the bench keeps its random model (default $ALTCLIP_BENCH_CACHE or ~/.cache/altclip-bench)")
    p.add_argument("--precision", default="auto", help="auto, bf16 or fp32, as altclip --precision")
    p.add_argument("--passes", type=count, default=5, help="timed passes (medians are taken over them)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    import altclip_cli
    from altclip_cli.nn import layers
    from altclip_cli.runtime.device import images_per_pass

    model = args.model or str(fixtures.ensure_model(args.cache))
    clip = altclip_cli.load(model, device="cpu", precision=args.precision)
    if clip.precision != "bf16":
        sys.exit(f"bench/tower.py profiles the bf16 path (oneDNN's linear layers); this run is {clip.precision}")
    if layers._ONEDNN_LINEAR is None:
        sys.exit("bench/tower.py profiles oneDNN's linear layers, which this PyTorch lacks "
                 "(torch.ops.mkldnn._linear_pointwise)")
    images = images_per_pass(clip.device, clip.precision) or 8
    pixels = torch.randn(images, 3, clip.preprocessor.crop_height, clip.preprocessor.crop_width)

    with torch.inference_mode(), clip._autocast():
        if not torch.equal(tower_by_steps(clip, pixels, Steps()), clip.encode_pixel_batch(pixels)):
            sys.exit("bench/tower.py no longer follows the tower's forward (altclip_cli/nn/vision.py): update tower_by_steps")
        per_step, total = median_steps(clip, pixels, args.passes)
    rates = isolated_rates(clip, images, args.passes)
    matmul = task_matmul(Namespace(n=4096, repeat=5, precision=clip.precision))
    lines = report(clip, images, per_step, total, rates, matmul)
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
