"""Static-cache decoding (worker/engines/hf_static.py) on the tiny checkpoint in fp32 on CPU: the code a CUDA graph
captures, run eagerly. Each job's text must equal the model card's code for that job alone, token for token, however
the batch is split into prefill calls and decodes and whatever padding rows its shape adds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from producer.core.jobs import Generation, Job
from tests.reference import random_image, reference_text
from worker.engines.decode_plan import DecodePlan
from worker.engines.hf import prefill_probes
from worker.engines.hf_model import Prepared, VisionLanguageModel
from worker.engines.hf_static import CHECK_EVERY, StaticDecoder

SIZES = [(32, 32), (640, 480), (90, 300), (1000, 150), (77, 77), (384, 384), (200, 50)]
QUESTIONS = ["What is this?", "Describe it.", "How many?", "Where?", "Why?", "What colour is it?", "Who?"]


@pytest.fixture(scope="module")
def vlm(tiny_model: Path) -> VisionLanguageModel:
    return VisionLanguageModel.load(str(tiny_model), "cpu")


def jobs(vlm: VisionLanguageModel, new_tokens: int, count: int = 7, **sampling: float) -> list[Prepared]:
    generation = Generation(max_new_tokens=new_tokens, **sampling)  # type: ignore[arg-type]
    return [
        vlm.prepare(Job(task="qa", media=["s3://m/x.png"], question=q).conversation(),
                    [random_image(w, h, seed=i)], [], generation)
        for i, ((w, h), q) in enumerate(zip(SIZES[:count], QUESTIONS, strict=False))
    ]  # fmt: skip


def alone(tiny_model: Path, count: int, new_tokens: int) -> list[str]:
    return [
        reference_text(tiny_model, [random_image(w, h, seed=i)], q, new_tokens)
        for i, ((w, h), q) in enumerate(zip(SIZES[:count], QUESTIONS, strict=False))
    ]


def with_decoder(vlm: VisionLanguageModel, plan: DecodePlan) -> StaticDecoder:
    vlm.decoder = StaticDecoder(vlm.model, plan, vlm.pad_token_id, graphs=True)  # graphs: CUDA only, ignored here
    return vlm.decoder


@pytest.mark.parametrize(
    ("kv_tokens", "decodes"),
    [(1024, [2, 2, 2, 1]), (2048, [4, 3])],
    ids=["decodes-of-2", "a-decode-of-3-padded-to-4"],
)
def test_each_job_decodes_exactly_as_alone_however_the_batch_is_split(
    vlm: VisionLanguageModel, tiny_model: Path, kv_tokens: int, decodes: list[int]
) -> None:
    plan = DecodePlan(kv_tokens=kv_tokens, prefill_tokens=300, max_rows=4, max_length=4096)
    with_decoder(vlm, plan)
    items = jobs(vlm, new_tokens=12)

    staged = vlm.stage(items)
    results = vlm.run(staged)

    assert [len(group) for group, _ in staged.decodes] == decodes
    assert max(len(calls) for _, calls in staged.decodes) > 1  # prefills were split (300 tokens per call)
    assert staged.rest == []
    assert [r.text for r in results] == alone(tiny_model, 7, 12)
    assert sorted(r.batch_size for r in results) == sorted(n for n in decodes for _ in range(n))


def test_a_job_longer_than_every_shape_decodes_with_generate_beside_the_others(
    vlm: VisionLanguageModel, tiny_model: Path
) -> None:
    with_decoder(vlm, DecodePlan(kv_tokens=4096, prefill_tokens=4096, max_rows=4, max_length=256))
    items = jobs(vlm, new_tokens=100, count=3)
    longest = max(range(3), key=lambda i: items[i].num_tokens)
    assert (
        items[longest].num_tokens + 99
        > 256
        >= max(item.num_tokens + 99 for item in items if item is not items[longest])
    )

    staged = vlm.stage(items)
    results = vlm.run(staged)

    assert longest in staged.rest
    assert [r.text for r in results] == alone(tiny_model, 3, 100)


def test_sampling_jobs_decode_with_generate(vlm: VisionLanguageModel) -> None:
    with_decoder(vlm, DecodePlan(kv_tokens=4096, prefill_tokens=4096, max_rows=4, max_length=4096))
    staged = vlm.stage(jobs(vlm, new_tokens=4, count=2, temperature=0.7, top_p=0.9))
    assert (staged.decodes, staged.rest) == ([], [0, 1])


def test_a_row_that_ends_stops_where_generate_stops_it(tiny_model: Path) -> None:
    vlm = VisionLanguageModel.load(str(tiny_model), "cpu")
    items = jobs(vlm, new_tokens=16, count=3)
    # Make the 4th token the first job generates an end-of-sequence token, for generate() and the static loop alike
    # (its id from generate's output: a decoded text does not always tokenize back to the same ids).
    inputs = vlm.collate(items[:1])
    output = vlm.model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=vlm.pad_token_id)
    generated = output[0, inputs["input_ids"].shape[1] :].tolist()
    token = generated[3]
    vlm.model.generation_config.eos_token_id = token
    vlm.eos_ids = {token}
    expected = vlm.generate(items)
    with_decoder(vlm, DecodePlan(kv_tokens=4096, prefill_tokens=4096, max_rows=4, max_length=4096))

    results = vlm.run(vlm.stage(items))

    assert [(r.text, r.tokens) for r in results] == [(e.text, e.tokens) for e in expected]
    assert results[0].tokens == generated.index(token) + 1  # 4, or earlier where that id came before


def test_every_shape_is_built_at_start_up_and_serving_builds_none(vlm: VisionLanguageModel) -> None:
    plan = DecodePlan(kv_tokens=2048, prefill_tokens=4096, max_rows=4, max_length=2048)
    built: list[int] = []
    decoder = StaticDecoder(vlm.model, plan, vlm.pad_token_id, graphs=False, built=lambda: built.append(1))
    decoder.build()
    vlm.decoder = decoder
    assert len(built) == len(plan.shapes()) == 7

    for count, new_tokens in [(1, 4), (3, 30), (4, 12), (2, 400), (4, 200)]:
        vlm.run(vlm.stage(jobs(vlm, new_tokens=new_tokens, count=count)))

    assert len(built) == 7


class Dispatched(TorchDispatchMode):
    """The aten ops a block of code runs, in order: what a CUDA graph of it would capture."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket)
        indices = args[1] if name in ("aten.index", "aten.index_put_", "aten.index_put") else ()
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
            name += "(bool mask)"  # a boolean mask index counts its True values on the host
        self.ops.append(name)
        return func(*args, **(kwargs or {}))


# Ops that read a tensor's values on the host or size their output from them (on CUDA each waits for the device
# and none can be captured), or that copy host data to the device (torch.tensor(...) inside the step). Not seen
# here: .cpu() and .tolist() on a CPU tensor dispatch nothing.
HOST_BOUND = {
    "aten.is_nonzero", "aten._local_scalar_dense", "aten.item", "aten.equal", "aten.nonzero", "aten.masked_select",
    "aten.isin", "aten.repeat_interleave", "aten.bincount", "aten._unique", "aten._unique2",
    "aten.unique_consecutive", "aten.unique_dim", "aten.lift_fresh", "aten.lift_fresh_copy",
    "aten.index(bool mask)", "aten.index_put_(bool mask)", "aten.index_put(bool mask)",
}  # fmt: skip


def test_a_decode_step_is_the_same_device_work_every_time_and_the_loop_reads_the_device_every_8_steps(
    vlm: VisionLanguageModel,
) -> None:
    decoder = with_decoder(vlm, DecodePlan(kv_tokens=4096, prefill_tokens=4096, max_rows=4, max_length=4096))
    steps: list[list[str]] = []
    loops: list[tuple[int, list[str]]] = []
    step_once, loop = decoder._step, decoder._loop

    def recorded_step(step: Any) -> None:
        with Dispatched() as ops:
            step_once(step)
        steps.append(ops.ops)

    def recorded_loop(step: Any, rows: int, count: int) -> int:
        with Dispatched() as ops:
            ran = loop(step, rows, count)
        loops.append((ran, ops.ops))
        return ran

    decoder._step, decoder._loop = recorded_step, recorded_loop  # type: ignore[method-assign]
    vlm.run(vlm.stage(jobs(vlm, new_tokens=33, count=3)))

    assert [ran for ran, _ in loops] == [32]
    assert len(steps) == 32 and all(ops == steps[0] for ops in steps)  # no data-dependent control flow
    assert HOST_BOUND.isdisjoint(steps[0])
    assert len([op for op in loops[0][1] if op in HOST_BOUND]) == 32 // CHECK_EVERY  # bool(done.all()) each 8th


def test_a_graph_that_cuda_refuses_to_capture_leaves_every_shape_decoding_eagerly(
    vlm: VisionLanguageModel, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plan = DecodePlan(kv_tokens=2048, prefill_tokens=4096, max_rows=4, max_length=2048)
    decoder = StaticDecoder(vlm.model, plan, vlm.pad_token_id, graphs=False)
    warmed: list[tuple[int, int]] = []
    captured: list[tuple[int, int]] = []

    def record(step: Any) -> None:  # as on a GPU: the first shapes capture, then CUDA refuses one
        if len(captured) == 2:
            try:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
            except RuntimeError:  # what torch.cuda.graph's exit then raises, the cause as its context
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture") from None
        captured.append((step.rows, step.length))
        step.graph = "a captured graph"

    decoder.graphs = True
    decoder._warm_up = lambda step: warmed.append((step.rows, step.length))  # type: ignore[method-assign]
    decoder._record = record  # type: ignore[method-assign]
    decoder.build()
    vlm.decoder = decoder

    results = vlm.run(vlm.stage(jobs(vlm, new_tokens=12, count=3)))

    assert [r.text for r in results] == alone(tiny_model, 3, 12)
    assert len(captured) == 2 and len(warmed) == 3 and len(decoder.steps) == len(plan.shapes()) == 7
    assert decoder.graphs is False and [s.graph for s in decoder.steps.values()] == [None] * 7
    assert [r.getMessage().split(";")[0] for r in caplog.records if r.levelname == "WARNING"] == [
        "capturing the decode step (rows 4, cache 512) as a CUDA graph failed "
        "(RuntimeError: CUDA error: operation not permitted when stream is capturing)"
    ]


def test_the_prefill_budget_is_probed_with_an_image_job_and_a_video_job(vlm: VisionLanguageModel) -> None:
    """On CUDA the worker measures the peak activations of these two prefills and budgets for the larger per prompt
    token (a video frame's vision patches per prompt token are ~3x an image's); here, on CPU, both prefill."""
    probes = prefill_probes(vlm)

    assert [(p.modality, p.num_tokens) for p in probes] == [(("image", "", ()), 169), (("", "video", (8,)), 56)]
    for probe in probes:
        output = vlm.model(**vlm.collate([probe]), use_cache=True, logits_to_keep=1)
        assert tuple(output.logits.shape[:2]) == (1, 1)
