"""The benchmark's inputs, made once and cached outside the repository.

- `ensure_model`: a random checkpoint with BAAI/AltCLIP's exact shapes (864 M parameters) in the
  hub's layout. The weights are generated and written one tensor at a time, so making the 3.5 GB
  file needs little memory.
- `ensure_images`: JPEGs of mixed sizes (640x480 to 4000x3000) that compress like photos.
- `bench_texts`: short multilingual texts, deterministic.

Each folder is built in a temporary sibling and renamed into place, so an interrupted run
leaves no half-made fixture behind.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
DEFAULT_CACHE = Path(os.environ.get("ALTCLIP_BENCH_CACHE", "~/.cache/altclip-bench")).expanduser()
N_IMAGES = 64
SEED = 0

# What the hub's BAAI/AltCLIP ships beside tokenizer.json; transformers reads the tokenizer class
# and the special tokens from these.
TOKENIZER_CONFIG = {
    "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>", "unk_token": "<unk>",
    "pad_token": "<pad>", "mask_token": "<mask>", "model_max_length": 512,
    "tokenizer_class": "XLMRobertaTokenizer", "processor_class": "AltCLIPProcessor",
}
SPECIAL_TOKENS_MAP = {k: TOKENIZER_CONFIG[k] for k in
                      ("bos_token", "eos_token", "sep_token", "cls_token", "unk_token", "pad_token", "mask_token")}

# (width, height) of the bench photos: phone, camera and web sizes, both orientations.
IMAGE_SIZES = [(640, 480), (800, 600), (1024, 768), (1280, 720), (1600, 1200), (1920, 1080),
               (2048, 1536), (3000, 2000), (4000, 3000), (480, 640), (1080, 1920), (3000, 4000)]


# --- the checkpoint --------------------------------------------------------------------------------


def model_dir(cache: Path, tiny: bool = False) -> Path:
    return cache / ("model-tiny" if tiny else "model")


def ensure_model(cache: Path, tiny: bool = False) -> Path:
    """The cached random checkpoint folder, made on first use."""
    folder = model_dir(cache, tiny)
    if not (folder / "model.safetensors").is_file():
        _build_atomically(folder, lambda tmp: write_checkpoint(tmp, tiny))
    return folder


def write_checkpoint(folder: Path, tiny: bool) -> None:
    """config.json, model.safetensors, tokenizer files and preprocessor_config.json, as the hub has them."""
    sys.path.insert(0, str(TESTS))  # the test helpers that make tokenizer files and tiny configs
    from tiny import PREPROCESSOR_CONFIG, tiny_config
    from tokenizer_fixture import make_tokenizer_files

    from altclip_cli.nn.config import AltCLIPConfig, config_to_dict

    vocab = make_tokenizer_files(folder)  # a small real Unigram vocab: ids use a subset of the table
    cfg = tiny_config(vocab_size=vocab) if tiny else AltCLIPConfig()  # defaults = BAAI/AltCLIP
    _write_json(folder / "config.json", config_to_dict(cfg))
    _write_json(folder / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    _write_json(folder / "tokenizer_config.json", TOKENIZER_CONFIG)
    _write_json(folder / "special_tokens_map.json", SPECIAL_TOKENS_MAP)
    print(f"bench: writing random weights to {folder / 'model.safetensors'} ...", file=sys.stderr)
    write_random_safetensors(folder / "model.safetensors", cfg)


def tensor_specs(cfg) -> tuple[list[tuple[str, tuple[int, ...]]], set[str]]:
    """(name, shape) of every checkpoint tensor, and the names of LayerNorm weights."""
    import torch

    from altclip_cli.nn.model import AltCLIPModel

    with torch.device("meta"):
        model = AltCLIPModel(cfg)  # shapes only, no memory
    norms = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()], norms


def write_random_safetensors(path: Path, cfg) -> None:
    """Stream a float32 safetensors file: header first (offsets follow from the shapes), then
    each tensor as it is generated. Scales: LayerNorm weights ~1, everything else ~N(0, 0.02)."""
    import torch

    specs, norms = tensor_specs(cfg)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        size = 4 * _numel(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data must start 8-byte aligned
    gen = torch.Generator().manual_seed(SEED)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in specs:
            for chunk in _random_chunks(name, shape, name in norms, gen):
                f.write(chunk.numpy().tobytes())


def _random_chunks(name: str, shape: tuple[int, ...], is_norm: bool, gen, rows: int = 16384):
    """The tensor's values, a block of rows at a time (the 250002-row embedding is 1 GB)."""
    import torch

    if name == "logit_scale":
        yield torch.tensor(2.6592)  # ln(1 / 0.07), the released value's init
        return
    for start in range(0, shape[0] if shape else 1, rows):
        block = (min(rows, shape[0] - start),) + shape[1:] if shape else ()
        values = 0.02 * torch.randn(block, generator=gen)
        yield values + 1.0 if is_norm else values


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- the images ------------------------------------------------------------------------------------


def images_dir(cache: Path) -> Path:
    return cache / "images"


def ensure_images(cache: Path, count: int = N_IMAGES) -> list[Path]:
    """Paths of the first `count` bench JPEGs (the set holds N_IMAGES), made on first use."""
    folder = images_dir(cache)
    if not (folder / f"{N_IMAGES - 1:03d}.jpg").is_file():
        _build_atomically(folder, write_images)
    return image_paths(cache)[:count]


def image_paths(cache: Path) -> list[Path]:
    return sorted(images_dir(cache).glob("*.jpg"))


def write_images(folder: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(SEED)
    print(f"bench: writing {N_IMAGES} JPEGs to {folder} ...", file=sys.stderr)
    for i in range(N_IMAGES):
        width, height = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        synthetic_photo(width, height, rng).save(folder / f"{i:03d}.jpg", quality=90)


def synthetic_photo(width: int, height: int, rng):
    """Smooth colour gradients, a few filled shapes, then sensor-like noise: JPEG sizes like photos."""
    import numpy as np
    from PIL import Image, ImageDraw

    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]  # (1, W)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]  # (H, 1)
    channels = []
    for _ in range(3):
        a, b, c, f = rng.uniform(-1, 1, 3).tolist() + [rng.uniform(1, 6)]
        channels.append(128 + 60 * (a * x + b * y) + 40 * c * np.sin(f * (x + y) * np.pi))  # (H, W)
    image = Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 16))):
        box = sorted(rng.uniform(0, width, 2).tolist()), sorted(rng.uniform(0, height, 2).tolist())
        xy = (box[0][0], box[1][0], box[0][1], box[1][1])
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(xy, fill=fill)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, (height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# --- the texts -------------------------------------------------------------------------------------

# A template and nouns per language; the tokenizer fixture's vocabulary covers these scripts.
_PHRASES = {
    "en": ("a photo of a {}", "cat dog bird car house tree river mountain city street child woman".split()),
    "fr": ("une photo du {}", "chat chien oiseau voiture maison arbre montagne ville".split()),
    "de": ("ein Foto der {}", "Katze Hund Vogel Auto Haus Baum Fluss Berg Stadt".split()),
    "ru": ("фотография {}", "кошки собаки птицы машина дом дерево река гора город".split()),
    "ar": ("صورة {}", "قطة كلب طائر سيارة منزل شجرة نهر جبل مدينة".split()),
    "ko": ("{} 사진", "고양이 강아지 새 자동차 집 나무 강 산 도시".split()),
    "ja": ("{}の写真です", "猫 犬 鳥 車 家 木 川 山".split()),
    "zh": ("一张{}的照片", "猫 狗 鸟 汽车 房子 树 河流 山 城市 街道".split()),
}
_EXTRAS = {"en": "small big red blue green playing running sitting on the beach at sunset".split(),
           "zh": "小 大 红色 蓝色 绿色 在 玩 跑步 坐着".split()}

LABELS = ["猫", "dog", "une voiture", "ein Haus", "дерево", "一张山的照片", "고양이", "a river"]


def bench_texts(count: int) -> list[str]:
    """`count` short captions (about 5 to 20 tokens) in eight languages, the same every run."""
    rng = random.Random(SEED)
    langs = sorted(_PHRASES)
    texts = []
    for i in range(count):
        template, nouns = _PHRASES[langs[i % len(langs)]]
        text = template.format(rng.choice(nouns))
        extras = _EXTRAS["zh" if langs[i % len(langs)] in ("zh", "ja") else "en"]
        words = [rng.choice(extras) for _ in range(rng.randint(0, 6))]
        texts.append(" ".join([text] + words))
    return texts


# --- helpers ---------------------------------------------------------------------------------------


def main(argv=None) -> None:
    """Make the fixtures; `run.py` calls this in a child process so that its own memory stays
    small (a child's peak RSS as the kernel reports it starts from its parent's)."""
    import argparse

    p = argparse.ArgumentParser(description="Make the bench's cached checkpoint and images.")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    print(ensure_model(args.cache, args.tiny))
    ensure_images(args.cache)


def _build_atomically(folder: Path, build) -> None:
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
