"""`vlmq make-tiny-model`: a random-weight LLaVA-OneVision checkpoint for tests and offline demos.

The checkpoint uses the real classes (`LlavaOnevisionForConditionalGeneration`, `LlavaOnevisionProcessor` with
its image and video processors, a byte-level BPE `Qwen2Tokenizer`), the real special tokens and the chat template
of llava-hf's conversion script, so everything that loads the real model loads this one with `from_pretrained`.
Only the sizes are small: a 32 px vision tower with 8 px patches (16 tokens per crop) and a 2-layer language
model over a 1,024-token vocabulary, about 1 MB on disk. Its text is meaningless but deterministic.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

# Chat template of llava-hf/llava-onevision-qwen2-*-ov-hf (transformers' convert_llava_onevision_weights_to_hf.py).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
IMAGE_SIZE = 32
PATCH_SIZE = 8
VOCAB_SIZE = 1024


_CORPUS = (
    "a photo of the cat dog person car street tree sky house table chair window red green blue white black "
    "small large young old running sitting standing holding looking near under over in on with and is are "
    "describe this image video in detail what color how many who where when why which question answer caption "
    "there two three people man woman child playing walking water grass road building light dark shows scene"
)


def _training_text() -> list[str]:
    """A small, fixed English corpus: enough for a BPE with real merges, with no download."""
    words = _CORPUS.split()
    lines = [" ".join(words[i : i + 9]) for i in range(len(words))]
    lines += [string.ascii_letters, string.digits, string.punctuation, "\n\t "]
    return lines * 4


def build_tokenizer():  # -> transformers.Qwen2Tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_text(), trainer=trainer)
    model_state = json.loads(bpe.model.__getstate__())
    # tokenizers wants (left, right) pairs; transformers' type hints say strings
    merges: Any = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_state["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=model_state["vocab"],
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]})
    return tokenizer


def make_tiny_model(
    directory: str | Path,
    seed: int = 0,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = IMAGE_SIZE,
) -> Path:
    """Write a random-weight LLaVA-OneVision checkpoint to `directory` and return its path.

    Args:
        directory: where to write; created if missing.
        seed: torch seed for the random weights; the same seed writes the same weights.
        hidden_size: width of the language model (the vision tower is half as wide).
        num_layers: layers of the language model and of the vision tower.
        image_size: side of one crop in pixels (a multiple of 8); (image_size / 8)^2 tokens per crop.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    pinpoints = [[image_size * h, image_size * w] for h in range(1, 4) for w in range(1, 4)]
    config = _model_config(len(tokenizer), ids, pinpoints, hidden_size, num_layers, image_size)
    _save_model(out, config, ids, seed)
    _save_processor(out, tokenizer, pinpoints, image_size)
    (out / "VLMQ_TINY_MODEL").write_text("random weights written by `vlmq make-tiny-model`: its text is meaningless\n")
    return out


def _model_config(
    vocab_size: int,
    ids: dict[str, int],
    pinpoints: list[list[int]],
    hidden_size: int,
    num_layers: int,
    image_size: int,
):  # -> transformers.LlavaOnevisionConfig
    """A SigLIP vision tower half as wide as a Qwen2 language model, with the special tokens' ids."""
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": hidden_size // 2,
            "intermediate_size": hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": PATCH_SIZE,
            "vision_use_head": False,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": False,
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
    )


def _save_model(out: Path, config: Any, ids: dict[str, int], seed: int) -> None:
    """Random weights from `seed`, greedy generation ending at `<|im_end|>`."""
    import torch
    from transformers import GenerationConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    # Random logits sit close together; widen the output layer so greedy argmax is decided by clear margins and
    # not by the last bits of float rounding, which differ between batch shapes.
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.generation_config = GenerationConfig(
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], do_sample=False
    )
    model.save_pretrained(out)


def _save_processor(out: Path, tokenizer: Any, pinpoints: list[list[int]], image_size: int) -> None:
    """The image and video processors at `image_size`, the tokenizer and the chat template."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    size = {"height": image_size, "width": image_size}
    image_processor = LlavaOnevisionImageProcessor(size=size, crop_size=size, image_grid_pinpoints=pinpoints)
    video_processor = LlavaOnevisionVideoProcessor(size=size)
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=(image_size // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )
    processor.save_pretrained(out)


def is_tiny_model(path: str | Path) -> bool:
    """True when `path` is a checkpoint written by `make_tiny_model`."""
    return (Path(path) / "VLMQ_TINY_MODEL").is_file()
