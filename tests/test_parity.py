"""Parity with the reference (transformers' AltCLIPModel, the test oracle) at fp32 on CPU."""
import json
import pickle

import pytest
import torch

from oracle import require

transformers = require("transformers")

from altclip_cli.errors import CheckpointError, ConfigError  # noqa: E402
from altclip_cli.runtime.build import build_model  # noqa: E402

TOL = 1e-5


def oracle_model(vision_act="quick_gelu", seed=0):
    """A tiny random reference model with odd sizes (built by transformers itself)."""
    cfg = transformers.AltCLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=37, project_dim=24, max_position_embeddings=40),
        vision_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=50,
                           image_size=30, patch_size=6, hidden_act=vision_act),
        projection_dim=16)
    torch.manual_seed(seed)
    model = transformers.AltCLIPModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # move off the init so every weight matters
            p.copy_((1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    return model


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 4, 1, 7]  # padded batch: rows of different lengths, right padding
    ids = torch.ones(len(lengths), max(lengths) + 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n + 1] = 0, 2  # <s> ... </s>
        ids[i, 1:n + 1] = torch.randint(3, 99, (n,), generator=g)
        mask[i, :n + 2] = 1
    pixels = torch.randn(3, 3, 30, 30, generator=g)
    return ids, mask, pixels


def features(x):
    return x if isinstance(x, torch.Tensor) else x.pooler_output  # 5.x returns an output object


def assert_parity(ours, ref):
    ids, mask, pixels = inputs()
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        ref_text = features(ref.get_text_features(input_ids=ids, attention_mask=mask))
        ref_image = features(ref.get_image_features(pixel_values=pixels))
        ours_text = ours.encode_text(ids, mask)
        ours_image = ours.encode_image(pixels)
        ours_logits = ours(ids, mask, pixels)
    assert (ours_text - ref_text).abs().max() < TOL
    assert (ours_image - ref_image).abs().max() < TOL
    assert (ours_logits - out.logits_per_image).abs().max() < TOL * out.logits_per_image.abs().max()
    assert torch.allclose(ours_logits.softmax(-1), out.logits_per_image.softmax(-1), atol=TOL)


def load(folder):
    return build_model(folder, None, torch.device("cpu"), "fp32")


def test_gradients_through_the_image_tower_match_the_reference(tmp_path):
    """The tower adds into its residual stream in place only while autograd does not record:
    with it recording, gradients to the pixels and to the weights are the reference's."""
    ref = oracle_model()
    ref.save_pretrained(tmp_path)
    ours = load(tmp_path).requires_grad_(True)
    _, _, pixels = inputs()
    name = "vision_model.encoder.layers.0.mlp.fc1.weight"

    def grads(encode):
        x = pixels.clone().requires_grad_(True)
        encode(x).pow(2).sum().backward()
        return x.grad

    theirs_px = grads(lambda x: features(ref.get_image_features(pixel_values=x)))
    ours_px = grads(ours.encode_image)
    assert theirs_px.abs().max() > 0
    assert (ours_px - theirs_px).abs().max() < TOL * theirs_px.abs().max()
    theirs_w, ours_w = dict(ref.named_parameters())[name].grad, dict(ours.named_parameters())[name].grad
    assert (ours_w - theirs_w).abs().max() < TOL * theirs_w.abs().max()


def test_gradients_through_the_text_tower_match_the_reference(tmp_path):
    ref = oracle_model()
    ref.save_pretrained(tmp_path)
    ours = load(tmp_path).requires_grad_(True)
    ids, mask, _ = inputs()
    features(ref.get_text_features(input_ids=ids, attention_mask=mask)).pow(2).sum().backward()
    ours.encode_text(ids, mask).pow(2).sum().backward()
    theirs = dict(ref.named_parameters())["text_model.roberta.encoder.layers.0.intermediate.dense.weight"].grad
    mine = dict(ours.named_parameters())["text_model.roberta.encoder.layer.0.intermediate.dense.weight"].grad
    assert theirs.abs().max() > 0
    assert (mine - theirs).abs().max() < TOL * theirs.abs().max()


def test_save_pretrained_checkpoint(tmp_path):
    ref = oracle_model()
    ref.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert_parity(load(tmp_path), ref)


@pytest.mark.parametrize("text_spelling", ["layer", "layers"])
@pytest.mark.parametrize("vision_spelling", ["layer", "layers"])
def test_both_key_spellings(tmp_path, text_spelling, vision_spelling):
    from safetensors.torch import save_file

    ref = oracle_model()
    ref.config.save_pretrained(tmp_path)
    state = {}
    for k, v in ref.state_dict().items():
        k = k.replace("roberta.encoder.layers.", f"roberta.encoder.{text_spelling}.")
        k = k.replace("vision_model.encoder.layers.", f"vision_model.encoder.{vision_spelling}.")
        state[k] = v.contiguous()
    save_file(state, str(tmp_path / "model.safetensors"))
    assert_parity(load(tmp_path), ref)


def legacy_config(ref, drop_vision_key=None):
    """The hub's config.json form: sizes in text_config_dict / vision_config_dict, which win."""
    raw = ref.config.to_dict()
    vision = {k: v for k, v in raw["vision_config"].items() if k != drop_vision_key}
    raw["text_config_dict"], raw["vision_config_dict"] = raw.pop("text_config"), vision
    raw["vision_config"] = {"hidden_size": 8}  # overridden by vision_config_dict, as in the reference
    return raw


def write_bin(ref, folder, config):
    """pytorch_model.bin as older tools saved it: persistent index buffers and the RoBERTa pooler."""
    state = {k.replace("encoder.layers.", "encoder.layer."): v for k, v in ref.state_dict().items()}
    state["text_model.roberta.embeddings.position_ids"] = torch.arange(40)[None]
    state["text_model.roberta.embeddings.token_type_ids"] = torch.zeros(1, 40, dtype=torch.long)
    state["vision_model.embeddings.position_ids"] = torch.arange(26)[None]
    state["text_model.roberta.pooler.dense.weight"] = torch.randn(32, 32)
    state["text_model.roberta.pooler.dense.bias"] = torch.randn(32)
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(config))


def test_bin_with_buffers_and_legacy_config(tmp_path):
    ref = oracle_model()
    write_bin(ref, tmp_path, legacy_config(ref))
    assert_parity(load(tmp_path), ref)


def test_legacy_config_missing_key_takes_reference_default(tmp_path):
    # The reference fills a key missing from vision_config_dict with its ViT-B/32 default
    # (intermediate_size 3072), which disagrees with the tensors: a clear error, not a crash.
    ref = oracle_model()
    write_bin(ref, tmp_path, legacy_config(ref, drop_vision_key="intermediate_size"))
    with pytest.raises(ConfigError, match=r"vision_config.intermediate_size: config says 3072, tensors say 50"):
        load(tmp_path)


def test_vision_tower_plain_gelu(tmp_path):
    ref = oracle_model(vision_act="gelu")  # as the m18 model's image tower
    ref.save_pretrained(tmp_path)
    ours = load(tmp_path)
    assert ours.config.vision.hidden_act == "gelu"
    assert_parity(ours, ref)


def test_sharded_safetensors(tmp_path):
    from safetensors.torch import save_file

    ref = oracle_model()
    ref.config.save_pretrained(tmp_path)
    items = list(ref.state_dict().items())
    shards = {"model-00001-of-00002.safetensors": dict(items[:40]), "model-00002-of-00002.safetensors": dict(items[40:])}
    weight_map = {}
    for name, part in shards.items():
        save_file({k: v.contiguous() for k, v in part.items()}, str(tmp_path / name))
        weight_map.update({k: name for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_parity(load(tmp_path), ref)


def _saved(tmp_path, edit):
    from safetensors.torch import save_file

    ref = oracle_model()
    ref.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_missing_tensor_is_named(tmp_path):
    folder = _saved(tmp_path, lambda s: s.pop("vision_model.encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"missing 1: vision_model\.encoder\.layers\.\{1\}\.mlp\.fc2\.bias"):
        load(folder)


def test_missing_tensors_are_grouped_by_layer(tmp_path):
    def drop_queries(s):
        for i in range(3):
            s.pop(f"text_model.roberta.encoder.layers.{i}.attention.self.query.weight")

    with pytest.raises(CheckpointError, match=r"missing 3: text_model\.roberta\.encoder\.layer\.\{0-2\}"
                                              r"\.attention\.self\.query\.weight"):
        load(_saved(tmp_path, drop_queries))


def test_extra_tensor_is_named(tmp_path):
    folder = _saved(tmp_path, lambda s: s.update({"text_model.lm_head.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected 1: text_model\.lm_head\.weight"):
        load(folder)


def test_config_that_disagrees_with_tensors(tmp_path):
    folder = _saved(tmp_path, lambda s: None)
    raw = json.loads((folder / "config.json").read_text())
    raw["text_config"]["num_hidden_layers"] = 5
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="text_config.num_hidden_layers: config says 5, tensors have 3 layers"):
        load(folder)


def test_truncated_safetensors(tmp_path):
    folder = _saved(tmp_path, lambda s: None)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(folder)


class Payload:
    def __reduce__(self):
        return (print, ("this ran code from a checkpoint",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_bin_holding_code_is_refused(tmp_path, capsys, writer):
    ref = oracle_model()
    ref.config.save_pretrained(tmp_path)
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        (torch.save if writer == "torch.save" else pickle.dump)({"logit_scale": Payload()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load(tmp_path)
    assert "this ran code" not in capsys.readouterr().out


def test_no_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load(tmp_path)
