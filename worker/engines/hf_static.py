"""Static-cache greedy decoding for the hf engine: the model card's forward for the prompt, then a decode step on fixed
buffers, captured once per shape as a CUDA graph on a GPU and run eagerly on a CPU (the same code, which is how the
tests check it).

Why: transformers' `generate` launches ~870 kernels, ~16 host-to-device copies and a host synchronisation per step,
so a step costs 20-30 ms on an H200 whatever the batch size (the GPU waits on the host). A replayed graph launches a
step in one call, and the loop reads the device only every `CHECK_EVERY` steps (has every row ended?).

One decode of R jobs:
1. prefill, in calls of at most `plan.prefill_tokens` prompt tokens: the whole model (vision tower, projector,
   language model) on the left-padded prompts with the position ids `generate` gives them, into a dynamic cache that
   is then copied into the rows of the static one; the last logits give each row its first token;
2. decode, in the (rows, length) shape that holds them (`worker.engines.decode_plan`): each step feeds every row its
   last token at one cache column, masks all other unwritten columns, takes the greedy choice, and ends rows that
   produced an end-of-sequence token (their later tokens are the pad token, as `generate` writes them).

The texts equal `generate`'s for each job alone, token for token on CPU in fp32 (tests/unit/test_static_decode.py):
same prompt forward, same positions, and masked cache columns add exactly nothing to the attention.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from producer.core.jobs import Generation
from worker.engines.decode_plan import DecodePlan
from worker.engines.grouped_sdpa import grouped_decode_attention

log = logging.getLogger(__name__)

CHECK_EVERY = 8  # decode steps between two reads of "has every row ended?" (the loop's only host synchronisation)
# Generation settings that add logits processors to `generate`; with any of them set, the checkpoint decodes there.
_PROCESSOR_SETTINGS = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "min_length": 0,
    "min_new_tokens": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
}


class DecodeCache:
    """The KV cache the captured step writes: one column (`write_at`) per step into fixed tensors.

    It stands in for a transformers `Cache` in the language model's forward, which calls only `update` when position
    ids and a prepared mask are given (transformers 5.17 to 5.25). transformers' own StaticCache tracks its length
    differently across those versions, and the rows of several shapes here share one memory pool.
    """

    is_compileable = True

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], write_at: torch.Tensor) -> None:
        self.keys, self.values, self.write_at = keys, values, write_at

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.write_at, key_states)
        values.index_copy_(2, self.write_at, value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # never asked for: position ids are always given


@dataclass
class Step:
    """One (rows, length) shape's buffers and its decode step (a CUDA graph once captured)."""

    rows: int
    length: int
    tokens: torch.Tensor  # (rows, 1): each row's last token, the step's input
    positions: torch.Tensor  # (rows, 1): its position id
    write_at: torch.Tensor  # (1,): the cache column this step writes
    count: torch.Tensor  # (1,): tokens generated so far
    mask: torch.Tensor  # (rows, 1, 1, length): 0 where a row attends, the dtype's minimum elsewhere
    done: torch.Tensor  # (rows,): the row has produced an end-of-sequence token (or is padding)
    out: torch.Tensor  # (rows, length): generated tokens
    cache: DecodeCache
    graph: Any = None  # torch.cuda.CUDAGraph

    def advance(self, run: Callable[[Step], None]) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            run(self)


class StaticDecoder:
    """Greedy decoding of micro-batches in the shapes of a `DecodePlan` (see the module docstring).

    Args:
        model: a loaded `LlavaOnevisionForConditionalGeneration`.
        plan: the shapes and token budgets.
        pad_token_id: written after a row ends, as `generate` does.
        graphs: capture each shape's step as a CUDA graph (CUDA only).
        built: called once per shape built (the compilations metric).
        stepped: called after each decode with its steps and their wall time (the step-time metrics).
    """

    def __init__(
        self,
        model: Any,
        plan: DecodePlan,
        pad_token_id: int,
        *,
        graphs: bool,
        built: Callable[[], None] = lambda: None,
        stepped: Callable[[int, float], None] = lambda steps, seconds: None,
    ) -> None:
        self.model, self.plan, self.built, self.stepped = model, plan, built, stepped
        grouped_decode_attention()
        self.lm = model.model.language_model
        self.device = next(model.parameters()).device
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.graphs = graphs and self.device.type == "cuda"
        text = model.config.text_config
        self.layer_types = sorted(set(getattr(text, "layer_types", None) or ["full_attention"]))
        params = inspect.signature(self.lm.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x
        eos = model.generation_config.eos_token_id
        self.eos = torch.tensor(eos if isinstance(eos, list) else [eos], device=self.device)
        self.pad_id = pad_token_id
        self.pad = torch.tensor(pad_token_id, device=self.device)
        self.min = torch.finfo(self.dtype).min
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.kv_heads = int(heads)
        self.layers = int(text.num_hidden_layers)
        # One pool per layer for keys and one for values; each shape's cache is a view of its first rows x length.
        size = plan.kv_tokens * self.kv_heads * self.head_dim
        with torch.inference_mode():
            self.pool = torch.zeros((self.layers, 2, size), dtype=self.dtype, device=self.device)
        self.steps: dict[tuple[int, int], Step] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @staticmethod
    def supported(model: Any) -> str | None:
        """Why this model cannot decode here (`generate` then does), or None when it can."""
        text = model.config.text_config
        if "sliding_attention" in (getattr(text, "layer_types", None) or []):
            return "its language model has sliding-window layers"
        config = model.generation_config
        for name, neutral in _PROCESSOR_SETTINGS.items():
            if getattr(config, name, None) not in (neutral, None, []):
                return f"its generation config sets {name}, a logits processor of generate()"
        if model.config._attn_implementation not in ("sdpa", "eager"):
            return f"{model.config._attn_implementation} attention takes no prepared mask"
        return None

    @staticmethod
    def takes(generation: Generation) -> bool:
        """Greedy jobs decode here; sampling ones in `generate` (its sampling processors, its seeding)."""
        return generation.temperature == 0

    # -- shapes --------------------------------------------------------------------------------------------------
    def build(self) -> None:
        """Build every shape of the plan (capture its graph on CUDA): once, at start-up."""
        started = time.perf_counter()
        for shape in self.plan.shapes():
            self.step_for(*shape)
        log.info(
            "static decoding: %d shapes (rows %s x cache lengths %s) built%s in %.1f s; KV pool %d tokens, "
            "prefill calls up to %d tokens",
            len(self.steps),
            "/".join(map(str, self.plan.row_buckets)),
            "/".join(map(str, self.plan.length_buckets)),
            " as CUDA graphs" if self.graphs else "",
            time.perf_counter() - started,
            self.plan.kv_tokens,
            self.plan.prefill_tokens,
        )

    def step_for(self, rows: int, length: int) -> Step:
        """The shape's step, built (and captured) the first time it is asked for."""
        step = self.steps.get((rows, length))
        if step is None:
            step = self.steps[(rows, length)] = self._new_step(rows, length)
            if self.graphs:
                self._capture_or_decode_eagerly(step)
            self.built()
        return step

    def _capture_or_decode_eagerly(self, step: Step) -> None:
        """Capture the shape's graph; if CUDA refuses (a kernel that this torch or driver cannot capture), every shape
        decodes eagerly from then on: the same tokens, slower, and the worker still starts. The warm-up runs the step
        first, outside that fallback: a step that fails eagerly is a bug that stops the start-up."""
        self._warm_up(step)
        try:
            self._record(step)
        except Exception as exc:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # a lost device (a sticky CUDA error) raises here: no fallback
            self.graphs = False
            for built in self.steps.values():
                built.graph = None
            cause = exc.__context__ or exc  # torch reports a failed capture as "failed due to a previous error"
            log.warning(
                "capturing the decode step (rows %d, cache %d) as a CUDA graph failed (%s: %s); every shape decodes "
                "eagerly instead (the same tokens, slower). Hint: report this with the torch and driver versions; "
                "--decoder static --no-cuda-graphs runs this loop without trying the capture",
                step.rows, step.length, type(cause).__name__, cause,
            )  # fmt: skip

    def _new_step(self, rows: int, length: int) -> Step:
        n = rows * self.kv_heads * length * self.head_dim
        shape = (rows, self.kv_heads, length, self.head_dim)
        with torch.inference_mode():
            keys = [self.pool[i, 0, :n].view(shape) for i in range(self.layers)]
            values = [self.pool[i, 1, :n].view(shape) for i in range(self.layers)]
            write_at = torch.zeros(1, dtype=torch.long, device=self.device)

            def longs(*size: int) -> torch.Tensor:
                return torch.zeros(size, dtype=torch.long, device=self.device)

            return Step(
                rows=rows,
                length=length,
                tokens=longs(rows, 1),
                positions=longs(rows, 1),
                write_at=write_at,
                count=longs(1),
                mask=torch.full((rows, 1, 1, length), self.min, dtype=self.dtype, device=self.device),
                done=torch.ones(rows, dtype=torch.bool, device=self.device),
                out=longs(rows, length),
                cache=DecodeCache(keys, values, write_at),
            )

    def _warm_up(self, step: Step) -> None:
        # As torch.cuda.graphs asks: run the step on a side stream first (cuBLAS and SDPA pick and allocate their
        # workspaces there), then capture it.
        with torch.inference_mode():
            self._reset(step, prompt_length=0)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step(step)
            torch.cuda.current_stream(self.device).wait_stream(side)

    def _record(self, step: Step) -> None:
        # Into the memory pool every shape shares (one decode runs at a time). The outer stream context puts this
        # thread's stream back even when a failed capture's own exit cannot.
        with torch.inference_mode():
            self._reset(step, prompt_length=0)
            graph = torch.cuda.CUDAGraph()
            this_stream = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(this_stream), torch.cuda.graph(graph, pool=self.graph_pool):
                self._step(step)
            step.graph = graph

    def _reset(self, step: Step, prompt_length: int) -> None:
        step.mask.fill_(self.min)
        step.mask[:, :, :, 0] = 0  # padding rows attend to something (an all-masked row would be NaN)
        step.done.fill_(True)
        step.tokens.fill_(self.pad_id)
        step.positions.zero_()
        step.out.fill_(self.pad_id)
        step.count.zero_()
        step.write_at.fill_(prompt_length)

    def _step(self, step: Step) -> None:
        """One decode step on the shape's buffers; everything stays on the device (it is what the graph holds)."""
        step.mask.index_fill_(3, step.write_at, 0.0)
        hidden = self.lm(
            input_ids=step.tokens,
            attention_mask={kind: step.mask for kind in self.layer_types},
            position_ids=step.positions,
            use_cache=True,
            **{self.cache_arg: step.cache},
        ).last_hidden_state
        chosen = self.model.lm_head(hidden[:, -1, :]).argmax(-1)
        chosen = torch.where(step.done, self.pad, chosen)
        step.done |= self._ends(chosen)
        step.count.add_(1)
        step.out.index_copy_(1, step.count, chosen[:, None])
        step.tokens.copy_(chosen[:, None])
        step.positions.add_(1)
        step.write_at.add_(1)

    # -- one decode ----------------------------------------------------------------------------------------------
    def stage(self, batches: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Move collated prefill inputs to the device: pinned host memory and non-blocking copies on a side stream,
        so that they travel while the previous batch decodes. `decode` waits for them."""
        if self.copy_stream is None:
            return [dict(b) for b in batches]
        staged = []
        with torch.cuda.stream(self.copy_stream):
            for batch in batches:
                staged.append({k: self._to_device(k, v) for k, v in batch.items()})
        return staged

    def _to_device(self, key: str, value: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if key.startswith("pixel_values") else value.dtype
        return value.pin_memory().to(self.device, dtype=dtype, non_blocking=True)

    def decode(self, prefills: Sequence[dict[str, torch.Tensor]], new_tokens: int) -> list[list[int]]:
        """Prefill each call's rows into one shape's cache, then decode them together; each row's new tokens.

        `prefills` hold one decode's rows, in order, each call left-padded to its own longest prompt.
        """
        rows = sum(int(p["input_ids"].shape[0]) for p in prefills)
        longest = max(int(p["input_ids"].shape[1]) for p in prefills)
        length = self.plan.length_for(longest, new_tokens)
        if length is None:
            raise ValueError(f"a prompt of {longest} tokens plus {new_tokens} new ones is longer than every shape")
        step = self.step_for(self.plan.rows_for(rows), length)
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        with torch.inference_mode():
            self._reset(step, prompt_length=longest)
            row = 0
            for inputs in prefills:
                row = self._prefill(step, inputs, row, longest)
            if self.device.type == "cuda":  # time the steps alone, not the prefill still running
                torch.cuda.current_stream(self.device).synchronize()
            started = time.perf_counter()
            steps = self._loop(step, rows, new_tokens - 1)
            out = step.out[:rows, :new_tokens].tolist()  # waits for the last step
        self.stepped(steps, time.perf_counter() - started)
        return out

    def _prefill(self, step: Step, inputs: dict[str, torch.Tensor], row: int, longest: int) -> int:
        """The model card's forward over one call's prompts; their keys and values go right-aligned before column
        `longest` of rows `row`.. of the static cache. Returns the next free row."""
        mask = inputs["attention_mask"]
        # As `generate` derives them from a left-padded mask: each prompt counts its positions from its first token.
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        output = self.model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = output.get("cache") or output.get("past_key_values")  # renamed in transformers 5.2x
        n, width = mask.shape
        rows, cols = slice(row, row + n), slice(longest - width, longest)
        for i, layer in enumerate(cache.layers):
            step.cache.keys[i][rows, :, cols] = layer.keys
            step.cache.values[i][rows, :, cols] = layer.values
        step.mask[rows, 0, 0, :] = self.min
        step.mask[rows, 0, 0, cols] = torch.where(mask.bool(), 0.0, self.min).to(self.dtype)
        chosen = output.logits[:, -1, :].argmax(-1)
        step.tokens[rows, 0] = chosen
        step.positions[rows, 0] = mask.sum(-1)
        step.out[rows, 0] = chosen
        step.done[rows] = self._ends(chosen)
        return row + n

    def _ends(self, tokens: torch.Tensor) -> torch.Tensor:
        # Not torch.isin: for some sizes it sorts, which synchronises with the host and cannot be captured.
        return (tokens[:, None] == self.eos[None, :]).any(-1)

    def _loop(self, step: Step, rows: int, steps: int) -> int:
        """Up to `steps` decode steps, until every row has ended; how many ran."""
        for i in range(steps):
            step.advance(self._step)
            if (i + 1) % CHECK_EVERY == 0 and bool(step.done[:rows].all()):
                return i + 1
        return steps
