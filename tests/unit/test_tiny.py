"""`vlmq make-tiny-model`: checkpoints that transformers and vLLM both load, and the 0.5b preset's real shapes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from worker.devtools.tiny import config_0_5b, make_tiny_model

# Every weight name the hub's llava-onevision-qwen2 checkpoints use, cut after the module path's first parts.
HUB_PREFIXES = {
    "image_newline",
    "language_model.lm_head",
    "language_model.model",
    "multi_modal_projector.linear_1",
    "multi_modal_projector.linear_2",
    "vision_tower.vision_model",
}


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a safetensors file's header (8-byte little-endian length, then JSON)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return [key for key in header if key != "__metadata__"]


def test_tiny_checkpoint_names_its_weights_as_the_hub_does(tiny_model: Path) -> None:
    # vLLM 0.32 loads only the hub's `vision_tower.vision_model.*`; transformers 5.x would save `vision_tower.*`.
    keys = safetensors_keys(tiny_model / "model.safetensors")
    assert {".".join(key.split(".")[:2]) for key in keys} == HUB_PREFIXES
    assert [k for k in keys if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")] == []


def test_tiny_language_model_has_heads_of_32(tiny_model: Path) -> None:
    # vLLM's CPU attention supports head sizes of 32 and up; 16 is refused.
    text = json.loads((tiny_model / "config.json").read_text())["text_config"]
    assert (text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]) == (64, 2, 1)
    assert text["hidden_size"] // text["num_attention_heads"] == 32


def test_transformers_loads_every_tiny_weight_with_no_missing_or_unexpected_keys(tiny_model: Path) -> None:
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    _, info = LlavaOnevisionForConditionalGeneration.from_pretrained(
        tiny_model, dtype=torch.float32, output_loading_info=True
    )
    assert {k: v for k, v in info.items() if v} == {}


def test_tiny_checkpoint_is_under_one_megabyte(tiny_model: Path) -> None:
    assert sum(f.stat().st_size for f in tiny_model.iterdir()) < 1024 * 1024


def test_0_5b_preset_has_the_hub_models_shapes() -> None:
    config = config_0_5b()
    vision, text = config.vision_config, config.text_config
    assert (vision.num_hidden_layers, vision.hidden_size, vision.intermediate_size) == (26, 1152, 4304)
    assert (vision.num_attention_heads, vision.patch_size, vision.image_size, vision.vision_use_head) == (
        16,
        14,
        384,
        False,
    )
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (24, 896, 4864)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (14, 2, 152000)
    assert (config.image_token_index, config.video_token_index, text.eos_token_id) == (151646, 151647, 151645)
    assert config.image_grid_pinpoints == [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "full")
    assert config.vision_aspect_ratio == "anyres_max_9"
    assert config.tie_word_embeddings


def test_0_5b_preset_has_the_hub_models_parameter_count() -> None:
    """893,675,552 = SigLIP tower 397,747,744 (patch and position embeddings 1,518,336, 26 layers of 15,239,504,
    post-norm 2,304) + Qwen2 494,090,112 (embeddings 152,000 x 896 shared with the output layer, 24 layers of
    14,912,384, norm 896) + projector 1,836,800 + image_newline 896: the hub model's 0.9B."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    with torch.device("meta"):  # shapes only, nothing allocated
        model = LlavaOnevisionForConditionalGeneration(config_0_5b())
    assert sum(p.numel() for p in model.parameters()) == 893_675_552


def test_an_unknown_preset_is_refused_with_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Hint: one of tiny, 0\.5b"):
        make_tiny_model(tmp_path, preset="7b")
