"""Parsing model completions: the ``<answer>`` block, numbers, and lists of boxes.

Every function returns ``(value, None)`` on success or ``(None, reason)`` on failure and never
raises on any ``str`` (or non-``str``) input. Caps bound the work per completion:

- ``MAX_COMPLETION_CHARS = 65536``: longer completions fail with ``too_long`` (a 16k-token
  generation is well under it).
- ``MAX_ANSWER_CHARS = 16384``: longer ``<answer>`` blocks (or box-list spans) fail with ``too_long``.
- ``MAX_BOXES = 100``: more predictions fail with ``too_many_boxes`` (COCO's ``maxDets``).
- ``MAX_DEPTH = 6``: box answers nest 3 deep (list > dict > list); deeper fails with ``too_deep``
  before any parser sees it (bounds the recursion of ``json``/``ast``).
- ``MAX_ABS_COORD = 1e5``: larger coordinates fail with ``out_of_range`` (keeps areas finite).
- ``MAX_NUMBER_CHARS = 64``: longer numeric strings fail with ``bad_number``.

Box answers accepted (what models emit in practice): the Visual-RFT format
``[{'Position': [x1, y1, x2, y2], 'Confidence': c}, ...]``; strict JSON; Python literals (read
with ``ast.literal_eval``, which evaluates literals only); single quotes; unquoted keys; trailing
commas; a missing outer ``[ ]`` or missing closing brackets; key variants ``position``/``bbox``/
``box``/``bbox_2d``/``bounding_box`` (any case), ``confidence``/``conf``/``score``, optional
``label``/``category``/``class``/``name``; confidence as a number, a numeric string or a percentage
(``"90%"``); bare ``[x1, y1, x2, y2]`` lists; markdown code fences and text around the list; and
``No Objects`` / ``[]`` for an empty prediction. Inverted boxes are *rejected*, never swapped: a
swapped box is still a wrong answer, and fixing it would reward outputs the prompt forbids.

Never salvaged: one invalid entry rejects the whole answer, and so does a structure opening after
the last closing bracket (a truncated final entry, or a second list). Dropping entries silently
would let a model pad its answer with junk at no cost.
"""

from __future__ import annotations

import ast
import json
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

from megatron_vrft.rewards.types import FailureReason as R

MAX_COMPLETION_CHARS = 65536
MAX_ANSWER_CHARS = 16384
MAX_BOXES = 100
MAX_DEPTH = 6
MAX_ABS_COORD = 1e5
MAX_NUMBER_CHARS = 64

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"

_POSITION_KEYS = frozenset({"position", "bbox", "box", "bbox2d", "boundingbox"})
_CONFIDENCE_KEYS = frozenset({"confidence", "conf", "score"})
_LABEL_KEYS = frozenset({"label", "category", "class", "name"})
_EMPTY_ANSWERS = frozenset({"no objects", "no object", "none", "[]", "no objects found"})

_FENCE_RE = re.compile(r"```[A-Za-z0-9_+-]*")
_TRAILING_COMMA_RE = re.compile(r",\s*([\]}])")
# Words separated by single spaces: no two quantifiers can share a character (linear time).
_BARE_KEY_RE = re.compile(r"([{,]\s*)([A-Za-z_][A-Za-z0-9_]*(?: [A-Za-z0-9_]+)*)\s*:")
_PERCENT_RE = re.compile(r"(?<![\"\w.])(\d+(?:\.\d+)?)\s*%")
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_POINT_PAIR_RE = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*(?:to|-)?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")


@dataclass(frozen=True)
class ParsedBox:
    """One predicted box: ``box = (x1, y1, x2, y2)`` validated; ``confidence`` in [0, 1]."""

    box: tuple[float, float, float, float]
    confidence: float | None
    label: str | None


def extract_answer(completion: Any, *, max_chars: int = MAX_COMPLETION_CHARS) -> tuple[str | None, R | None]:
    """Content of the single ``<answer>...</answer>`` block, stripped.

    Failures: ``not_a_string``, ``too_long``, ``no_answer_tag``, ``unclosed_answer_tag`` (a
    truncated generation), ``multiple_answer_tags`` (first-or-last would be a guess, and letting
    the model hedge over several answers is a hack). Text outside the block is ignored here (the
    format reward judges it).
    """
    if not isinstance(completion, str):
        return None, R.NOT_A_STRING
    if len(completion) > max_chars:
        return None, R.TOO_LONG
    start = completion.find(ANSWER_OPEN)
    if start < 0:
        return None, R.NO_ANSWER_TAG
    body = start + len(ANSWER_OPEN)
    end = completion.find(ANSWER_CLOSE, body)
    if end < 0:
        return None, R.UNCLOSED_ANSWER_TAG
    if completion.find(ANSWER_OPEN, body) >= 0:
        return None, R.MULTIPLE_ANSWER_TAGS
    answer = completion[body:end].strip()
    if len(answer) > MAX_ANSWER_CHARS:
        return None, R.TOO_LONG
    return answer, None


def parse_number(value: Any) -> tuple[float | None, R | None]:
    """A finite float from an int/float or a numeric string. ``bool`` is not a number."""
    if isinstance(value, bool):
        return None, R.BAD_NUMBER
    if isinstance(value, int):
        try:
            x = float(value)
        except OverflowError:
            return None, R.NONFINITE
    elif isinstance(value, float):
        x = value
    elif isinstance(value, str):
        s = value.strip()
        if not s or len(s) > MAX_NUMBER_CHARS:
            return None, R.BAD_NUMBER
        try:
            x = float(s)
        except ValueError:
            return None, R.BAD_NUMBER
    else:
        return None, R.BAD_NUMBER
    if not math.isfinite(x):
        return None, R.NONFINITE
    return x, None


def parse_confidence(value: Any) -> tuple[float | None, R | None]:
    """Confidence in [0, 1]: a number, a numeric string, or a percentage string ``"87%"``."""
    if isinstance(value, str) and value.strip().endswith("%"):
        x, err = parse_number(value.strip()[:-1])
        if err is not None:
            return None, err
        x = x / 100.0
    else:
        x, err = parse_number(value)
        if err is not None:
            return None, err
    if not 0.0 <= x <= 1.0:
        return None, R.BAD_CONFIDENCE
    return x, None


def parse_box(value: Any) -> tuple[tuple[float, float, float, float] | None, R | None]:
    """Exactly 4 finite coordinates with ``x1 < x2``, ``y1 < y2`` and ``|v| <= MAX_ABS_COORD``."""
    if not isinstance(value, (list, tuple)):
        return None, R.BAD_BOX_LENGTH if isinstance(value, (dict, set)) else R.BAD_NUMBER
    if len(value) != 4:
        return None, R.BAD_BOX_LENGTH
    coords = []
    for v in value:
        x, err = parse_number(v)
        if err is not None:
            return None, err
        if abs(x) > MAX_ABS_COORD:
            return None, R.OUT_OF_RANGE
        coords.append(x)
    x1, y1, x2, y2 = coords
    if x2 < x1 or y2 < y1:
        return None, R.INVERTED_BOX
    if x2 == x1 or y2 == y1:
        return None, R.DEGENERATE_BOX
    return (x1, y1, x2, y2), None


def _norm_key(key: Any) -> str | None:
    if not isinstance(key, str):
        return None
    return re.sub(r"[\s_\-]", "", key).lower()


def _parse_entry(entry: Any) -> tuple[ParsedBox | None, R | None]:
    if isinstance(entry, (list, tuple)):
        if len(entry) != 4:
            return None, R.BAD_ENTRY
        box, err = parse_box(entry)
        return (None, err) if err is not None else (ParsedBox(box, None, None), None)
    if not isinstance(entry, dict):
        return None, R.BAD_ENTRY
    pos, conf, label = [], [], []
    for k, v in entry.items():
        nk = _norm_key(k)
        if nk in _POSITION_KEYS:
            pos.append(v)
        elif nk in _CONFIDENCE_KEYS:
            conf.append(v)
        elif nk in _LABEL_KEYS:
            label.append(v)
    if len(pos) > 1 or len(conf) > 1 or len(label) > 1:
        return None, R.BAD_ENTRY  # e.g. both 'Position' and 'bbox': ambiguous
    if not pos:
        return None, R.MISSING_BOX
    box, err = parse_box(pos[0])
    if err is not None:
        return None, err
    c = None
    if conf:
        c, err = parse_confidence(conf[0])
        if err is not None:
            return None, err
    lab = label[0].strip() if label and isinstance(label[0], str) else None
    return ParsedBox(box, c, lab), None


def _bracket_scan(text: str) -> tuple[int, list[str]]:
    """Max nesting depth of ``[]{}()`` and the closers missing at the end (outside quotes)."""
    pairs = {"[": "]", "{": "}", "(": ")"}
    stack: list[str] = []
    depth = 0
    quote = None
    for ch in text:
        if quote is not None:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in pairs:
            stack.append(pairs[ch])
            depth = max(depth, len(stack))
        elif ch in "]})":
            if stack and stack[-1] == ch:
                stack.pop()
    return depth, stack[::-1]


def _loose_json(text: str) -> str:
    text = text.replace("'", '"')
    text = _PERCENT_RE.sub(r'"\1%"', text)
    text = _BARE_KEY_RE.sub(r'\1"\2":', text)
    text = _TRAILING_COMMA_RE.sub(r"\1", text)
    return re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", re.sub(r"\bNone\b", "null", text)))


def _literal_eval_quiet(text: str) -> Any:
    """``ast.literal_eval`` without the SyntaxWarnings that model garbage triggers (``12a``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.literal_eval(text)


def _try_parse(text: str) -> Any:
    """First successful parse of ``text`` as JSON, a Python literal, or repaired JSON; else None."""
    for parse in (json.loads, _literal_eval_quiet, lambda s: json.loads(_loose_json(s))):
        try:
            value = parse(text)
        except Exception:  # noqa: BLE001 - any parser error means "not this parser"
            continue
        if isinstance(value, (list, tuple, dict)):
            return value
    return None


def _locate_structure(answer: str) -> tuple[Any, R | None]:
    text = _FENCE_RE.sub("", answer).strip()
    if text.lower().strip(" \t\r\n'\"`.!") in _EMPTY_ANSWERS:
        return [], None
    starts = [i for i in (text.find("["), text.find("{")) if i >= 0]
    if not starts:
        return None, R.NOT_A_LIST
    start = min(starts)
    end = max(text.rfind("]"), text.rfind("}"))
    span = text[start:] if end < start else text[start : end + 1]
    tail = "" if end < start else text[end + 1 :]
    if "[" in tail or "{" in tail:
        # A structure starts after the last closer: a truncated entry (or a second list). Taking
        # the prefix would silently drop entries, so the whole answer is rejected.
        return None, R.NOT_A_LIST
    if len(span) > MAX_ANSWER_CHARS:
        return None, R.TOO_LONG
    depth, missing = _bracket_scan(span)
    if depth > MAX_DEPTH:
        return None, R.TOO_DEEP
    candidates = [span]
    if missing:
        candidates.append(span + "".join(missing))
    if span.startswith("{"):  # entries without the outer list, with or without its "]"
        candidates.append("[" + span + "".join(missing) + "]")
        if span.endswith("]"):
            candidates.append("[" + span)
    for cand in candidates:
        value = _try_parse(cand)
        if value is not None:
            return value, None
    return None, R.NOT_A_LIST


def _is_flat_box(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 4
        and all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in value)
    )


def parse_boxes(answer: str) -> tuple[list[ParsedBox] | None, R | None]:
    """All boxes in an answer (content of ``<answer>``), in the order written.

    An empty list is a valid answer ("no objects"). Any invalid entry rejects the whole answer:
    dropping bad entries would let a model pad its answer with junk at no cost.
    """
    if not isinstance(answer, str):
        return None, R.NOT_A_STRING
    if not answer.strip():
        return None, R.EMPTY_ANSWER
    value, err = _locate_structure(answer)
    if err is not None:
        return None, err
    if isinstance(value, dict) or _is_flat_box(value):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return None, R.NOT_A_LIST
    if len(value) > MAX_BOXES:
        return None, R.TOO_MANY_BOXES
    out = []
    for entry in value:
        parsed, err = _parse_entry(entry)
        if err is not None:
            return None, err
        out.append(parsed)
    return out, None


def parse_single_box(answer: str) -> tuple[tuple[float, float, float, float] | None, R | None]:
    """Exactly one box for grounding: any ``parse_boxes`` form, or Qwen2-VL's ``(x1,y1),(x2,y2)``.

    More than one box fails with ``multiple_boxes`` (hedging over several boxes is not allowed);
    an empty answer or ``[]`` fails with ``missing_box``/``empty_answer``.
    """
    if not isinstance(answer, str):
        return None, R.NOT_A_STRING
    if not answer.strip():
        return None, R.EMPTY_ANSWER
    if len(answer) > MAX_ANSWER_CHARS:
        return None, R.TOO_LONG
    pairs = _POINT_PAIR_RE.findall(answer)
    if pairs and "[" not in answer and "{" not in answer:
        if len(pairs) > 1:
            return None, R.MULTIPLE_BOXES
        return parse_box(list(pairs[0]))
    boxes, err = parse_boxes(answer)
    if err is not None:
        return None, err
    if not boxes:
        return None, R.MISSING_BOX
    if len(boxes) > 1:
        return None, R.MULTIPLE_BOXES
    return boxes[0].box, None
