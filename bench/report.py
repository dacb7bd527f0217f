"""Medians, ratios and the markdown tables `run.py` prints and writes.

`samples` maps a side ("altclip", "reference", "machine") to {metric: [one value per repetition]}.
Ratios are altclip / reference; the targets are the project's performance goals.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    label: str
    metric: str
    digits: int  # decimals shown
    target: str = ""  # as printed
    ratio_max: float | None = None  # met when altclip / reference <= this
    ratio_min: float | None = None  # met when altclip / reference >= this
    abs_max: float | None = None  # met when altclip's own value <= this


COMPARED = [
    Row("image embedding, JPEGs from disk (images/s)", "images_per_s", 3, ">= 2.5x", ratio_min=2.5),
    Row("text embedding, short multilingual texts (texts/s)", "texts_per_s", 2, ">= 3x", ratio_min=3.0),
    Row("cold classify, 1 image + 2 labels, whole process (s)", "classify_s", 2, "<= 0.4x", ratio_max=0.4),
    Row("classify again, same labels (s; reference: cold again)", "classify_repeat_s", 2, "< cold"),
    Row("first classify ever, nothing cached (s; below fp32 it casts + caches the weights; reference: cold)",
        "classify_first_s", 2, "<= 1.0x", ratio_max=1.0),
    Row("peak RSS, cold classify (MB)", "classify_rss_mb", 0, "<= 0.7x", ratio_max=0.7),
    Row("peak RSS, first classify ever (MB; reference: cold)", "classify_first_rss_mb", 0, "<= 0.7x", ratio_max=0.7),
    Row("peak RSS, image embedding (MB)", "images_rss_mb", 0, "<= 0.7x", ratio_max=0.7),
    Row("peak RSS, text embedding (MB)", "texts_rss_mb", 0),
    Row("import + load weights, before embedding (s)", "images_load_s", 2),
    Row("`altclip --help` (s)", "help_s", 3, "<= 0.3 s", abs_max=0.3),
]


def median(values) -> float | None:
    return statistics.median(values) if values else None


def medians(samples: dict) -> dict:
    return {side: {k: median(v) for k, v in metrics.items()} for side, metrics in samples.items()}


def _fmt(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _met(row: Row, ours, ratio) -> str:
    if row.abs_max is not None:
        return "n/a" if ours is None else ("yes" if ours <= row.abs_max else "no")
    if ratio is None or (row.ratio_min is None and row.ratio_max is None):
        return ""
    ok = (row.ratio_min is None or ratio >= row.ratio_min) and (row.ratio_max is None or ratio <= row.ratio_max)
    return "yes" if ok else "no"


def comparison_table(med: dict, measured_only: bool = False) -> list[str]:
    """The rows of COMPARED; with measured_only, those that have an altclip value."""
    ours, ref = med.get("altclip", {}), med.get("reference", {})
    # The reference caches nothing: its every call is a cold one.
    ref = {**ref, "classify_repeat_s": ref.get("classify_s"), "classify_first_s": ref.get("classify_s"),
           "classify_first_rss_mb": ref.get("classify_rss_mb")}
    lines = ["| measure | altclip | reference | altclip / reference | target | met |",
             "|---|---:|---:|---:|---|---|"]
    for row in COMPARED:
        a, r = ours.get(row.metric), ref.get(row.metric)
        if measured_only and a is None:
            continue
        ratio = a / r if a is not None and r else None
        if row.metric == "classify_repeat_s":  # its target is altclip's own cold call
            cold = ours.get("classify_s")
            met = "" if a is None or cold is None else ("yes" if a < cold else "no")
        else:
            met = _met(row, a, ratio)
        lines.append(f"| {row.label} | {_fmt(a, row.digits)} | {_fmt(r, row.digits)} | "
                     f"{'n/a' if ratio is None else f'{ratio:.2f}x'} | {row.target} | {met} |")
    return lines


def vit_image_flops(vision) -> float:
    """Multiply-adds x 2 of one image through the ViT: patch embedding, the linear layers
    (qkv, out, fc1, fc2) and attention's two matmuls. Norms and activations are left out."""
    d, mlp, layers = vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers
    tokens = vision.num_positions
    patches = 2 * (tokens - 1) * vision.num_channels * vision.patch_size ** 2 * d
    linear = 2 * tokens * layers * (4 * d * d + 2 * d * mlp)
    attn = 2 * 2 * tokens * tokens * d * layers
    return patches + linear + attn


def limit_table(med: dict, vision, precision: str) -> list[str]:
    """The image tower's images/s limit: the `precision` matmul rate / the tower's FLOPs per image.
    The other of bf16/fp32 is shown where it was measured (the worker skips an emulated bf16)."""
    machine, ours = med.get("machine", {}), med.get("altclip", {})
    dtypes = [precision] + [d for d in ("bf16", "fp32") if d != precision and machine.get(f"{d}_gflops")]
    gflops = machine.get(f"{precision}_gflops")
    flops = vit_image_flops(vision)
    limit = gflops * 1e9 / flops if gflops else None
    rate = ours.get("images_per_s")
    share = rate / limit if rate and limit else None
    head = "".join(f"| {d} matmul (GFLOP/s) " for d in dtypes)
    cells = "".join(f"| {_fmt(machine.get(f'{d}_gflops'), 0)} " for d in dtypes)
    return [f"{head}| image tower (GFLOP/image) | {precision} limit (images/s) "
            "| altclip (images/s) | % of limit (target >= 85%) |",
            "|---:" * (len(dtypes) + 4) + "|",
            f"{cells}| {flops / 1e9:.1f} | {_fmt(limit, 2)} | {_fmt(rate, 3)} | "
            f"{'n/a' if share is None else f'{100 * share:.0f}%'} |"]


def accuracy_table(acc: dict, cross: dict, asked: str = "auto") -> list[str]:
    if not acc:
        return ["accuracy: not measured (the accuracy worker failed)"]
    ok = lambda v: "yes" if v >= 0.999 else "no"  # noqa: E731
    head = ["| check | min | mean | target | met |", "|---|---:|---:|---|---|"]
    if acc["precision"] == "fp32":  # the same computation as fp32: nothing to compare
        lines = [f"altclip `{asked}` precision here is **fp32**: the same computation as fp32, so there is "
                 "no precision loss to measure; altclip against the reference:", "", *head]
        return lines + cross_rows(cross)
    lines = [f"altclip `{asked}` precision here is **{acc['precision']}**; compared with altclip fp32 "
             "on the same inputs:", "", *head,
             f"| image embedding cosine, {asked} vs fp32 | {acc['image_cos_min']:.5f} | {acc['image_cos_mean']:.5f} "
             f"| >= 0.999 | {ok(acc['image_cos_min'])} |",
             f"| text embedding cosine, {asked} vs fp32 | {acc['text_cos_min']:.5f} | {acc['text_cos_mean']:.5f} "
             f"| >= 0.999 | {ok(acc['text_cos_min'])} |",
             f"| same top label ({acc['images']} images, {acc['labels']} labels) | {acc['same_top_label']}/{acc['images']} "
             f"| | all | {'yes' if acc['same_top_label'] == acc['images'] else 'no'} |"]
    if acc.get("flipped_margin_max") is not None:
        lines.append(f"| fp32 logit margin, best vs second label: where the top label changed (max) / "
                     f"all images (median) | {acc['flipped_margin_max']:.4f} | {acc['margin_median']:.4f} | "
                     "(random weights: near-ties) | |")
    return lines + cross_rows(cross)


def cross_rows(cross: dict) -> list[str]:
    return [f"| {what[:-1]} embedding cosine, altclip vs reference fp32 | {cross[what][0]:.5f} "
            f"| {cross[what][1]:.5f} | (sanity: same model) | |" for what in ("images", "texts") if what in cross]
