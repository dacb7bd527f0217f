"""One measurement in a fresh process; `run.py` starts it and reads its last stdout line (JSON).

    python bench/worker.py images altclip|reference --model DIR --images DIR --count N [--out F.npy]
    python bench/worker.py texts altclip|reference --model DIR --count N [--out F.npy]
    python bench/worker.py accuracy --model DIR --images DIR --count N --texts N
    python bench/worker.py matmul [--n 4096]

`--precision` (default auto) is altclip's compute precision, as `altclip --precision` takes it;
the reference always runs in fp32, its default.

The timed part starts with paths or strings and ends with embeddings (decode, preprocessing and
tokenisation included); imports and weight loading are timed separately as `load_s`. Each side is
used the way its documentation shows: the reference in batches of 16 images or 64 texts (altclip's
CPU defaults), altclip through `stream_images` (what its CLI uses: decoding in threads ahead of
the model) and `encode_texts`. Peak memory is the parent's job (rusage of this process).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures import LABELS, bench_texts  # noqa: E402

IMAGE_BATCH = 16
TEXT_BATCH = 64


def chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def image_files(folder: str, count: int) -> list[Path]:
    return sorted(Path(folder).glob("*.jpg"))[:count]


# --- altclip --------------------------------------------------------------------------------------


def load_altclip(model: str, precision: str = "auto"):
    import altclip_cli

    return altclip_cli.load(model, device="cpu", precision=precision)


def altclip_images(clip, paths: list[Path]):
    """(N, D) normalised embeddings of image files, through altclip's decode-ahead pipeline."""
    import numpy as np

    results = list(clip.stream_images([str(p) for p in paths]))
    for r in results:
        if r.error:
            raise r.error
    return np.stack([r.embedding for r in results])


def altclip_texts(clip, texts: list[str]):
    return clip.encode_texts(texts)  # it batches (by length) itself


# --- the reference (transformers, as its AltCLIP docs show) ----------------------------------------


def load_reference(model: str):
    from transformers import AltCLIPModel, AltCLIPProcessor

    return AltCLIPModel.from_pretrained(model).eval(), AltCLIPProcessor.from_pretrained(model)


def reference_images(ref, paths: list[Path]):
    import torch
    from PIL import Image

    model, processor = ref
    out = []
    for batch in chunks(paths, IMAGE_BATCH):
        inputs = processor(images=[Image.open(p) for p in batch], return_tensors="pt")
        with torch.no_grad():
            out.append(_features(model.get_image_features(**inputs)))
    return _normalised(torch.cat(out))


def reference_texts(ref, texts: list[str]):
    import torch

    model, processor = ref
    out = []
    for batch in chunks(texts, TEXT_BATCH):
        inputs = processor(text=batch, padding=True, return_tensors="pt")
        with torch.no_grad():
            out.append(_features(model.get_text_features(**inputs)))
    return _normalised(torch.cat(out))


def _features(x):
    return x if hasattr(x, "shape") else x.pooler_output  # transformers 5.x returns an output object


def _normalised(x):
    import torch

    return torch.nn.functional.normalize(x.float(), dim=-1).numpy()


# --- tasks ----------------------------------------------------------------------------------------

LOADERS = {"altclip": load_altclip, "reference": load_reference}
EMBED_IMAGES = {"altclip": altclip_images, "reference": reference_images}
EMBED_TEXTS = {"altclip": altclip_texts, "reference": reference_texts}


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def embedding_task(args, embed, items) -> dict:
    """Load, then embed `items` once; throughput of the embedding call alone."""
    load_args = (args.model, args.precision) if args.impl == "altclip" else (args.model,)
    model, load_s = timed(LOADERS[args.impl], *load_args)
    emb, seconds = timed(embed[args.impl], model, items)
    if args.out:
        import numpy as np

        np.save(args.out, emb)
    return {"load_s": load_s, "seconds": seconds, "items": len(items), "per_s": len(items) / seconds,
            "dtype": _dtype_of(model)}


def _dtype_of(model) -> str:
    if isinstance(model, tuple):  # the reference: (model, processor)
        return str(next(model[0].parameters()).dtype).replace("torch.", "")
    return model.precision


def task_images(args) -> dict:
    return embedding_task(args, EMBED_IMAGES, image_files(args.images, args.count))


def task_texts(args) -> dict:
    return embedding_task(args, EMBED_TEXTS, bench_texts(args.count))


def cpu_precision(request: str = "auto") -> str:
    """The precision altclip computes in on this CPU for `request` (auto: bf16 only where the CPU
    multiplies bf16 natively, fp32 elsewhere)."""
    import torch

    from altclip_cli.runtime.device import choose_precision

    return choose_precision(torch.device("cpu"), request)[0]


def task_accuracy(args) -> dict:
    """altclip's chosen precision against its fp32: per-row cosine, and the top label per image
    (with the fp32 logit margin between the two best labels, since random weights make near-ties).
    Where the chosen precision is fp32 itself there is nothing to compare, and nothing is run."""
    import gc

    import numpy as np

    chosen = cpu_precision(args.precision)
    if chosen == "fp32":
        return {"precision": chosen}
    paths, texts = image_files(args.images, args.count), bench_texts(args.texts)
    runs = {}
    for precision in ("fp32", args.precision):
        clip = load_altclip(args.model, precision)
        images = altclip_images(clip, paths)
        _, logits = clip.scores(images, clip.encode_texts(LABELS))
        runs[precision] = (images, altclip_texts(clip, texts), logits, clip.precision)
        del clip
        gc.collect()
    (img32, txt32, logits32, _), (img, txt, logits, auto) = runs["fp32"], runs[args.precision]
    image_cos, text_cos = np.sum(img32 * img, -1), np.sum(txt32 * txt, -1)
    top2 = np.sort(logits32, -1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]  # fp32 logit gap between the best and second-best label
    same = logits32.argmax(-1) == logits.argmax(-1)
    return {"precision": auto, "image_cos_min": float(image_cos.min()), "image_cos_mean": float(image_cos.mean()),
            "text_cos_min": float(text_cos.min()), "text_cos_mean": float(text_cos.mean()),
            "same_top_label": int(same.sum()), "images": len(paths), "labels": len(LABELS),
            "margin_median": float(np.median(margin)),
            "flipped_margin_max": float(margin[~same].max()) if (~same).any() else None}


def task_matmul(args) -> dict:
    """This CPU's matmul rate in GFLOP/s, on all the cores this process may use, in the precision
    altclip computes in here (`precision`), and in the other of bf16/fp32 only where the CPU runs it
    natively: fp32 always; bf16 only with avx512_bf16 or AMX (elsewhere it is emulated, and a
    4096-sized product takes minutes)."""
    import torch

    from altclip_cli.runtime.device import PRECISIONS, cpu_has_native_bf16

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    n, chosen = args.n, cpu_precision(args.precision)
    names = [chosen] + [p for p in ("bf16", "fp32") if p != chosen and (p == "fp32" or cpu_has_native_bf16())]
    result = {"threads": torch.get_num_threads(), "n": n, "precision": chosen}
    for name in names:
        dtype = PRECISIONS[name]
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up: oneDNN picks and prepares its kernel
        best = min(timed(torch.matmul, a, b)[1] for _ in range(args.repeat))
        result[f"{name}_gflops"] = 2 * n ** 3 / best / 1e9
    return result


TASKS = {"images": task_images, "texts": task_texts, "accuracy": task_accuracy, "matmul": task_matmul}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=TASKS)
    p.add_argument("impl", nargs="?", choices=LOADERS, default="altclip")
    p.add_argument("--model")
    p.add_argument("--images")
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--texts", type=int, default=512)
    p.add_argument("--out")
    p.add_argument("--precision", default="auto", help="altclip's precision: auto, fp32, bf16 or fp16")
    p.add_argument("--n", type=int, default=4096, help="matmul size")
    p.add_argument("--repeat", type=int, default=5, help="matmul repetitions (best is kept)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    print(json.dumps(TASKS[args.task](args)), flush=True)


if __name__ == "__main__":
    main()
