"""The typed hand-offs of a step: sampling settings, a :class:`RolloutBatch` of generated rows and the
:class:`ScoredBatch` the rewards stage makes of it.

A batch holds its prompts once (``prompts[g]`` is group ``g``) and one row per sampled response;
``group_ids[i]`` names the prompt of row ``i``, so nobody re-expands groups by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_vrft.data.processing import PreprocessedExample
from megatron_vrft.rewards.types import GroundTruth


@dataclass(kw_only=True, frozen=True)
class SamplingParams:
    """How an engine samples; the same on every engine."""

    n: int = 1
    """Responses per prompt (the group size G)."""
    temperature: float = 1.0
    """Softmax temperature; the returned log-probs are of ``softmax(logits / temperature)``."""
    top_p: float = 1.0
    """Nucleus threshold in (0, 1]."""
    top_k: int = -1
    """Top-k; -1 disables."""
    max_new_tokens: int = 64
    """Maximum generated tokens per response (the stop token included)."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end a response (kept as its last token)."""
    greedy: bool = False
    """Arg-max decoding (evaluation); ``n`` must be 1."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"sampling n must be >= 1, got {self.n}")
        if not self.temperature > 0:
            raise ValueError(f"sampling temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"sampling top_k must be -1 or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.greedy and self.n != 1:
            raise ValueError("greedy decoding gives one response per prompt: n must be 1")


FINISH_STOP = "stop"
"""A stop token ended the response."""
FINISH_LENGTH = "length"
"""``max_new_tokens`` ended the response."""


@dataclass(kw_only=True)
class RolloutBatch:
    """Sampled responses, one row each, with the prompts they answer."""

    prompts: list[PreprocessedExample]
    """``(num_groups,)`` prompts: token ids with image pads expanded, images, pixel values, ground truth."""
    group_ids: torch.Tensor
    """``(N,)`` int64: the index into ``prompts`` of each row."""
    response_ids: list[torch.Tensor]
    """``N`` int64 tensors ``(R_i,)``: the generated tokens, stop token included."""
    sampling_logprobs: list[torch.Tensor]
    """``N`` float32 tensors ``(R_i,)``: log-prob of each generated token under the distribution it
    was sampled from (temperature applied)."""
    finish_reasons: list[str]
    """``N`` of :data:`FINISH_STOP` / :data:`FINISH_LENGTH`."""
    texts: list[str]
    """``N`` decoded responses (special tokens dropped): what the rewards read."""

    def __post_init__(self) -> None:
        n = len(self.group_ids)
        lengths = {len(self.response_ids), len(self.sampling_logprobs), len(self.finish_reasons), len(self.texts)}
        if lengths != {n}:
            raise ValueError(f"RolloutBatch rows disagree: {n} group ids but field lengths {sorted(lengths)}")
        for i, (ids, lp) in enumerate(zip(self.response_ids, self.sampling_logprobs)):
            if ids.shape != lp.shape:
                raise ValueError(f"row {i}: {tuple(ids.shape)} response ids but {tuple(lp.shape)} log-probs")
        if n and (int(self.group_ids.min()) < 0 or int(self.group_ids.max()) >= len(self.prompts)):
            raise ValueError(f"group ids outside [0, {len(self.prompts)})")

    def __len__(self) -> int:
        return len(self.group_ids)

    @property
    def num_groups(self) -> int:
        return len(self.prompts)

    def prompt_of(self, row: int) -> PreprocessedExample:
        return self.prompts[int(self.group_ids[row])]

    def ground_truths(self) -> list[GroundTruth]:
        """``(N,)`` ground truths of the rows (the prompts', repeated by group), as the rewards read them."""
        return [self.prompt_of(i).ground_truth for i in range(len(self))]

    def response_lengths(self) -> torch.Tensor:
        return torch.tensor([len(r) for r in self.response_ids], dtype=torch.long)

    def rows(self) -> RolloutRows:
        """The per-row fields alone (what ranks exchange; prompts stay local)."""
        return RolloutRows(
            group_ids=self.group_ids,
            response_ids=self.response_ids,
            sampling_logprobs=self.sampling_logprobs,
            finish_reasons=self.finish_reasons,
            texts=self.texts,
        )

    @staticmethod
    def from_rows(prompts: list[PreprocessedExample], parts: Sequence[RolloutRows]) -> RolloutBatch:
        """Concatenate row sets whose ``group_ids`` already index ``prompts``."""
        cat = lambda name: [x for p in parts for x in getattr(p, name)]  # noqa: E731
        return RolloutBatch(
            prompts=prompts,
            group_ids=torch.cat([p.group_ids for p in parts]) if parts else torch.zeros(0, dtype=torch.long),
            response_ids=cat("response_ids"),
            sampling_logprobs=cat("sampling_logprobs"),
            finish_reasons=cat("finish_reasons"),
            texts=cat("texts"),
        )


@dataclass(kw_only=True)
class RolloutRows:
    """The per-row part of a :class:`RolloutBatch` (picklable, small)."""

    group_ids: torch.Tensor
    response_ids: list[torch.Tensor]
    sampling_logprobs: list[torch.Tensor]
    finish_reasons: list[str]
    texts: list[str]

    def offset_groups(self, offset: int) -> RolloutRows:
        return RolloutRows(
            group_ids=self.group_ids + offset,
            response_ids=self.response_ids,
            sampling_logprobs=self.sampling_logprobs,
            finish_reasons=self.finish_reasons,
            texts=self.texts,
        )


@dataclass(kw_only=True)
class ScoredBatch:
    """A :class:`RolloutBatch` with rewards and group-normalised advantages."""

    rollout: RolloutBatch
    """The rows that were scored."""
    rewards: torch.Tensor
    """``(N,)`` float32 weighted reward sum."""
    reward_columns: dict[str, torch.Tensor]
    """Reward name -> ``(N,)`` unweighted scores."""
    parse_failures: dict[str, dict[str, int]] = field(default_factory=dict)
    """Reward name -> failure reason -> count."""
    advantages: torch.Tensor
    """``(N,)`` float32 per-response advantages."""

    def __len__(self) -> int:
        return len(self.rollout)
