"""A small, realistic XLM-R-style tokenizer for tests: a sentencepiece Unigram model trained here.

`make_tokenizer_files(folder)` writes `sentencepiece.bpe.model` (what BAAI/AltCLIP-m9 ships) and the
`tokenizer.json` our own converter makes from it (what BAAI/AltCLIP ships), and returns the fairseq vocab
size a matching text tower must have. Training takes about a second and happens once per process.
"""

from __future__ import annotations

import atexit
import random
import shutil
import tempfile
from pathlib import Path

SPM_VOCAB = 1000

# Words in several scripts, so the model learns multi-character pieces in each of them.
_WORDS = {
    "en": "a photo of the cat dog bird car house tree river mountain city street people child woman man "
    "playing running eating sitting small big red blue green picture painting sunset beach".split(),
    "fr": "une photo du chat chien oiseau voiture maison arbre rivière montagne ville été élève café "
    "naïve garçon déjà où très".split(),
    "de": "ein Foto der Katze Hund Vogel Auto Haus Baum Fluss Berg Stadt Straße schön grün über Mädchen".split(),
    "ru": "фотография кошки собаки птицы машина дом дерево река гора город улица красивый большой".split(),
    "ar": "صورة قطة كلب طائر سيارة منزل شجرة نهر جبل مدينة شارع جميل كبير".split(),
    "el": "φωτογραφία γάτα σκύλος πουλί αυτοκίνητο σπίτι δέντρο".split(),
    "hi": "एक बिल्ली की तस्वीर कुत्ता पक्षी घर पेड़ नदी".split(),
    "ko": "고양이 사진 강아지 새 자동차 집 나무 강 산 도시".split(),
    "ja": "猫の写真 犬 鳥 車 家 木 川 山 都市 ねこ いぬ とり くるま しゃしん です".split(),
    "th": "รูปภาพ แมว สุนัข นก รถยนต์ บ้าน ต้นไม้".split(),
}
# Chinese has no spaces: sentences are strings of these phrases.
_ZH = "一张 猫 的 照片 狗 鸟 汽车 房子 树 河流 山 城市 街道 人们 孩子 女人 男人 在 玩 跑步 吃饭 坐着 小 大 红色 蓝色 绿色".split()
_EXTRA = ["😀", "🐱", "🐶", "❤️", "👍🏽", "１２３", "ＡＢＣ", "ﬁne", "½", "№", "…", "“quoted”", "(x)", "1,024", "3.14", "#tag"]


def _corpus(n_lines: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic multilingual lines: mostly one language per line, some mixed, some symbols."""
    rng = random.Random(seed)
    langs = sorted(_WORDS)
    lines = []
    for _ in range(n_lines):
        if rng.random() < 0.15:
            lines.append("".join(rng.choices(_ZH, k=rng.randint(3, 10))) + "。")
            continue
        pool = _WORDS[rng.choice(langs)]
        words = rng.choices(pool, k=rng.randint(3, 12))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words) + 1), rng.choice(_EXTRA))
        if rng.random() < 0.1:
            words.insert(rng.randrange(len(words) + 1), rng.choice(_WORDS[rng.choice(langs)]))
        lines.append(" ".join(words))
    return lines


def _train(folder: Path) -> None:
    """Train `sentencepiece.bpe.model` the way XLM-R's was made (unigram, nmt_nfkc, ids unk=0 s=1 /s=2)."""
    import sentencepiece as spm

    spm.set_random_generator_seed(0)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(_corpus()) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "sentencepiece.bpe"),
        model_type="unigram",
        vocab_size=SPM_VOCAB,
        normalization_rule_name="nmt_nfkc",
        character_coverage=1.0,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    corpus.unlink()
    (folder / "sentencepiece.bpe.vocab").unlink()


_CACHE: Path | None = None


def make_tokenizer_files(folder: Path) -> int:
    """Write sentencepiece.bpe.model and tokenizer.json into `folder`; return the fairseq vocab size."""
    from altclip_cli.inputs.spm import convert_spm_model

    global _CACHE
    if _CACHE is None:
        cache = Path(tempfile.mkdtemp(prefix="altclip-spm-"))
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        _train(cache)
        convert_spm_model(cache / "sentencepiece.bpe.model").save(str(cache / "tokenizer.json"))
        _CACHE = cache
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("sentencepiece.bpe.model", "tokenizer.json"):
        shutil.copyfile(_CACHE / name, folder / name)
    # fairseq: 4 specials + the spm pieces after its own 3 specials + <mask>
    return SPM_VOCAB + 2
