"""`vlmq make-tiny-model`: random-weight LLaVA-OneVision checkpoints for tests, offline demos and GPU benchmarks.

The checkpoints use the real classes (`LlavaOnevisionForConditionalGeneration`, `LlavaOnevisionProcessor` with
its image and video processors, a byte-level BPE `Qwen2Tokenizer`), the real special tokens and the chat template
of llava-hf's conversion script, and the hub's weight names, so everything that loads the real model (transformers'
`from_pretrained`, vLLM) loads these. Their text is meaningless but deterministic. Two presets:

- `tiny` (the default): a 32 px vision tower with 8 px patches (16 tokens per crop) and a 2-layer language model
  64 wide (2 heads of 32, 1 KV head) over a 620-token vocabulary, under 1 MB on disk, in float32.
- `0.5b`: the shapes of llava-hf/llava-onevision-qwen2-0.5b-ov-hf (SigLIP-so400m, Qwen2-0.5B, 152,000-token
  vocabulary, 384 px crops, the hub's 36 anyres grids), 893.7M parameters, about 1.8 GB in bfloat16.
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


def build_tokenizer(pad_vocab_to: int | None = None):  # -> transformers.Qwen2Tokenizer
    """A byte-level BPE trained on a small corpus, with LLaVA-OneVision's special tokens after its vocabulary.

    Args:
        pad_vocab_to: fill the vocabulary with unused tokens up to this size, so that the special tokens get the
            ids they have in Qwen2's tokenizer (151643 for `<|endoftext|>` and on, in `SPECIAL_TOKENS` order).
    """
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
    vocab: dict[str, int] = model_state["vocab"]
    if pad_vocab_to is not None:
        # No merge produces these, so encoding never does either; decoded, they read as their own text.
        filler = (f"<|unused_{i}|>" for i in range(pad_vocab_to))
        while len(vocab) < pad_vocab_to:
            vocab.setdefault(next(filler), len(vocab))
        vocab.update({tok: pad_vocab_to + i for i, tok in enumerate(SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]})
    return tokenizer


PRESETS = ("tiny", "0.5b")
# llava-hf/llava-onevision-qwen2-0.5b-ov-hf: Qwen2's special tokens and ids, the model's (padded) vocabulary size.
QWEN2_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<image>": 151646,
                     "<video>": 151647}  # fmt: skip
VOCAB_SIZE_0_5B = 152000
IMAGE_SIZE_0_5B = 384
PATCH_SIZE_0_5B = 14
SIGLIP_MEAN_STD = [0.5, 0.5, 0.5]  # the hub checkpoint's image and video processors (SigLIP's), not CLIP's default


def make_tiny_model(
    directory: str | Path,
    seed: int = 0,
    *,
    preset: str = "tiny",
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = IMAGE_SIZE,
) -> Path:
    """Write a random-weight LLaVA-OneVision checkpoint to `directory` and return its path.

    Args:
        directory: where to write; created if missing.
        seed: torch seed for the random weights; the same seed writes the same weights.
        preset: "tiny" (tests, demos) or "0.5b" (the real 0.5B model's shapes, for GPU benchmarks); the sizes
            below apply to "tiny" only.
        hidden_size: width of the language model, a multiple of 32 (heads of 32; the vision tower is half as wide).
        num_layers: layers of the language model and of the vision tower.
        image_size: side of one crop in pixels (a multiple of 8); (image_size / 8)^2 tokens per crop.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}. Hint: one of {', '.join(PRESETS)}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if preset == "0.5b":
        tokenizer = build_tokenizer(pad_vocab_to=QWEN2_SPECIAL_IDS["<|endoftext|>"])
        ids = _special_ids(tokenizer)
        assert ids == QWEN2_SPECIAL_IDS, ids
        config = config_0_5b()
        _save_model(out, config, ids, seed, dtype="bfloat16", lm_head_scale=None)
        _save_processor(out, tokenizer, config.image_grid_pinpoints, IMAGE_SIZE_0_5B, PATCH_SIZE_0_5B, SIGLIP_MEAN_STD)
    else:
        tokenizer = build_tokenizer()
        ids = _special_ids(tokenizer)
        pinpoints = [[image_size * h, image_size * w] for h in range(1, 4) for w in range(1, 4)]
        config = _model_config(len(tokenizer), ids, pinpoints, hidden_size, num_layers, image_size)
        # Random logits sit close together; widen the output layer so greedy argmax is decided by clear margins and
        # not by the last bits of float rounding, which differ between batch shapes (and between engines).
        _save_model(out, config, ids, seed, dtype="float32", lm_head_scale=40.0)
        _save_processor(out, tokenizer, pinpoints, image_size, PATCH_SIZE, None)
    (out / "VLMQ_TINY_MODEL").write_text(
        f"random weights written by `vlmq make-tiny-model --preset {preset}`: its text is meaningless\n"
    )
    return out


def config_0_5b():  # -> transformers.LlavaOnevisionConfig
    """The configuration of llava-hf/llava-onevision-qwen2-0.5b-ov-hf: SigLIP-so400m without its last layer and
    head, a 2-layer projector, Qwen2-0.5B(-Instruct) with tied embeddings, anyres_max_9 over the 36 grids."""
    from transformers import LlavaOnevisionConfig

    ids = QWEN2_SPECIAL_IDS
    # LlavaOnevisionConfig's defaults are the hub's (vision tower, grids, feature layer and strategy); spelt out so
    # that a change of defaults upstream cannot change the benchmark model.
    pinpoints = [[IMAGE_SIZE_0_5B * h, IMAGE_SIZE_0_5B * w] for h in range(1, 7) for w in range(1, 7)]
    return LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 26,
            "num_attention_heads": 16,
            "image_size": IMAGE_SIZE_0_5B,
            "patch_size": PATCH_SIZE_0_5B,
            "vision_use_head": False,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": VOCAB_SIZE_0_5B,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "max_window_layers": 24,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "tie_word_embeddings": True,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=True,
    )


def _special_ids(tokenizer: Any) -> dict[str, int]:
    return {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}


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

    if hidden_size < 32 or hidden_size % 32:
        # vLLM's CPU attention backend supports head sizes of 32 and up (not 16).
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of 32. Hint: 64 (2 heads of 32)")
    heads = hidden_size // 32
    return LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": hidden_size // 2,
            "intermediate_size": hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 2,  # heads of 16 are fine here: vLLM runs the vision tower with torch's SDPA
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
            "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 2),
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


def _save_model(
    out: Path, config: Any, ids: dict[str, int], seed: int, dtype: str, lm_head_scale: float | None
) -> None:
    """Random weights from `seed` in `dtype`, greedy generation ending at `<|im_end|>`, hub weight names."""
    import torch
    from transformers import GenerationConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    if lm_head_scale is not None:
        with torch.no_grad():
            model.lm_head.weight.mul_(lm_head_scale)
    model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], do_sample=False
    )
    model.save_pretrained(out)
    _to_hub_layout(out)


def _to_hub_layout(out: Path) -> None:
    """Rename the vision tower's weights to the hub's `vision_tower.vision_model.*`.

    transformers 5.x saves them as `vision_tower.*` and loads either name; vLLM (0.32) loads only the hub's.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    def hub_name(key: str) -> str:
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            return "vision_tower.vision_model." + key[len("vision_tower.") :]
        return key

    for file in sorted(out.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata()
            tensors = {hub_name(key): f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no iter)
        save_file(tensors, file, metadata=metadata)
    index = out / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {hub_name(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _save_processor(
    out: Path,
    tokenizer: Any,
    pinpoints: list[list[int]],
    image_size: int,
    patch_size: int,
    mean_std: list[float] | None,
) -> None:
    """The image and video processors at `image_size`, the tokenizer and the chat template."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    size = {"height": image_size, "width": image_size}
    norm: dict[str, Any] = {} if mean_std is None else {"image_mean": mean_std, "image_std": mean_std}
    image_processor = LlavaOnevisionImageProcessor(size=size, crop_size=size, image_grid_pinpoints=pinpoints, **norm)
    video_processor = LlavaOnevisionVideoProcessor(size=size, **norm)
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )
    processor.save_pretrained(out)


def is_tiny_model(path: str | Path) -> bool:
    """True when `path` is a checkpoint written by `make_tiny_model`."""
    return (Path(path) / "VLMQ_TINY_MODEL").is_file()


def model_or_tiny(requested: str, workdir: Path) -> tuple[str, str | None]:
    """`requested` when it can be loaded here (a local directory, or a Hugging Face id whose files the cache or the
    hub has: they are downloaded now), else the tiny model in `workdir/tiny-model` (written once, then reused).

    Returns:
        (the model to load, None) or (the tiny model's path, why `requested` could not be had).
    """
    if Path(requested).expanduser().is_dir():
        return requested, None
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(requested, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"])
        return requested, None
    except Exception as exc:
        reason = " ".join(str(exc).split())[:160]
    tiny = workdir / "tiny-model"
    if not is_tiny_model(tiny):
        make_tiny_model(tiny)
    return str(tiny), reason
