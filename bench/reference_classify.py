"""The reference's cold `classify`: what a transformers user runs to score one image against labels.

    python bench/reference_classify.py IMAGE MODEL_DIR LABEL [LABEL ...]

Written as AltCLIP's transformers documentation shows it (fp32, the processor pads the labels);
`run.py` times it as a whole fresh process, imports included, against `altclip classify`.
"""
import sys

import torch
from PIL import Image
from transformers import AltCLIPModel, AltCLIPProcessor


def main(image_path: str, model_dir: str, labels: list[str]) -> None:
    model = AltCLIPModel.from_pretrained(model_dir)
    processor = AltCLIPProcessor.from_pretrained(model_dir)
    inputs = processor(text=labels, images=Image.open(image_path), return_tensors="pt", padding=True)
    with torch.no_grad():
        probs = model(**inputs).logits_per_image.softmax(dim=1)[0]
    for label, p in sorted(zip(labels, probs.tolist()), key=lambda pair: -pair[1]):
        print(f"{p:.4f}\t{label}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
