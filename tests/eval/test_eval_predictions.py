"""eval.predictions: resumable, rank-dealt generation into JSONL files, their merge and reading;
eval.evaluate.score_predictions: missing answers counted and scored empty, unknown ids rejected.
The engine is a stand-in with the rollout engines' duck type (generate -> batch with prompt_of/texts)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from megatron_vrft.eval.evaluate import score_predictions
from megatron_vrft.eval.predictions import (
    generate_predictions,
    merge_prediction_parts,
    prediction_part_path,
    read_predictions,
    write_predictions,
)
from megatron_vrft.rewards import GroundTruth


@dataclass
class Example:
    source_id: str


@dataclass
class Batch:
    prompts: list
    texts: list

    def __len__(self):
        return len(self.texts)

    def prompt_of(self, i):
        return self.prompts[i]


class EchoEngine:
    """Answers ``<answer>{source_id}</answer>``; records every call."""

    def __init__(self):
        self.calls = []

    def generate(self, examples, sampling, *, seed):
        self.calls.append(([e.source_id for e in examples], sampling, seed))
        return Batch(list(examples), [f"<answer>{e.source_id}</answer>" for e in examples])


EXAMPLES = [Example(f"r{i}") for i in range(7)]


def test_generation_is_batched_appended_and_resumes(tmp_path):
    engine = EchoEngine()
    part = generate_predictions(engine, EXAMPLES[:4], "SAMPLING", tmp_path, batch_size=3, seed=10)
    assert part == tmp_path / "predictions.jsonl"
    assert [c[0] for c in engine.calls] == [["r0", "r1", "r2"], ["r3"]]
    assert [c[1] for c in engine.calls] == ["SAMPLING"] * 2 and [c[2] for c in engine.calls] == [10, 13]
    # a rerun with more examples answers only the new ones, appending
    engine = EchoEngine()
    generate_predictions(engine, EXAMPLES, "SAMPLING", tmp_path, batch_size=3, seed=10)
    assert [c[0] for c in engine.calls] == [["r4", "r5", "r6"]]
    predictions = read_predictions(part)
    assert list(predictions) == [e.source_id for e in EXAMPLES]
    assert predictions["r5"] == "<answer>r5</answer>"
    engine = EchoEngine()  # everything answered: no call at all
    generate_predictions(engine, EXAMPLES, "SAMPLING", tmp_path, batch_size=3)
    assert engine.calls == []


def test_ranks_answer_disjoint_shares_and_merge(tmp_path):
    world = 3
    for rank in range(world):
        engine = EchoEngine()
        part = generate_predictions(engine, EXAMPLES, None, tmp_path, rank=rank, world=world, batch_size=2)
        assert (
            part == prediction_part_path(tmp_path, rank=rank, world=world) == tmp_path / f"predictions.rank{rank}.jsonl"
        )
        assert [sid for ids, _, _ in engine.calls for sid in ids] == [f"r{i}" for i in range(rank, 7, world)]
    merged = merge_prediction_parts(tmp_path, world)
    assert merged == tmp_path / "predictions.jsonl"
    assert sorted(read_predictions(merged)) == sorted(e.source_id for e in EXAMPLES)


def test_prediction_files_round_trip_and_bad_rows(tmp_path):
    path = write_predictions(tmp_path / "p.jsonl", {"a": "x", "b": "y"})
    assert read_predictions(path) == {"a": "x", "b": "y"}
    path.write_text(path.read_text() + "\n" + json.dumps({"source_id": 3, "completion": None}) + "\n")
    assert read_predictions(path)["3"] == ""  # ids are strings; a non-string answer is empty
    path.write_text('{"source_id": "x"}\n')
    with pytest.raises(ValueError, match="p.jsonl:1"):
        read_predictions(path)
    path.write_text('{"source_id": "x", "completion": "a"}\n\n{"source_id": "x", "completion": "b"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:3: duplicate prediction for 'x'"):
        read_predictions(path)
    with pytest.raises(ValueError, match="batch_size"):
        generate_predictions(EchoEngine(), EXAMPLES, None, tmp_path, batch_size=0)


def grounding_gt(box):
    return GroundTruth(coord_space="norm_1000", box=np.asarray(box, dtype=np.float64))


def test_score_predictions_counts_missing_answers_as_empty():
    ids = ["a", "b", "c", "d"]
    boxes = [[0, 0, 100, 100], [100, 100, 300, 300], [500, 500, 900, 700], [10, 20, 30, 40]]
    gts = [grounding_gt(b) for b in boxes]

    def answer(box):
        return f"<think>.</think><answer>[{', '.join(map(str, box))}]</answer>"

    everything = {i: answer(b) for i, b in zip(ids, boxes)}
    metrics = score_predictions("grounding", ids, gts, everything)
    assert metrics["missing_predictions"] == 0 and metrics["Acc@0.5"] == pytest.approx(1.0)
    del everything["c"]
    metrics = score_predictions("grounding", ids, gts, everything)
    assert metrics["missing_predictions"] == 1 and metrics["Acc@0.5"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="1 predictions name records the dataset does not have.*'zz'"):
        score_predictions("grounding", ids, gts, {"zz": "x"})
    with pytest.raises(ValueError, match="3 source ids but 4 ground truths"):
        score_predictions("grounding", ids[:3], gts, {})
