"""Hypothesis strategies for the reward fuzz tests: garbage and near-miss completions.

A near-miss is a well-formed completion with one mutation that *guarantees* the completion is
invalid (the test then asserts a failure is counted), or a mutation that may or may not keep it
valid (``must_fail=False``: only the invariants are checked).
"""

from __future__ import annotations

from hypothesis import strategies as st

# --------------------------------------------------------------------------------------- garbage

_TOKENS = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<answer",
    "answer>",
    "[",
    "]",
    "{",
    "}",
    "(",
    ")",
    ",",
    ":",
    "'",
    '"',
    " ",
    "\n",
    "Position",
    "Confidence",
    "position",
    "bbox",
    "bbox_2d",
    "score",
    "NaN",
    "Infinity",
    "-",
    ".",
    "e",
    "%",
    "1e999",
    "0",
    "1",
    "12",
    "345",
    "0.5",
    "No Objects",
    "None",
    "True",
    "```",
    "```json",
    "\u200b",
    "\ufeff",
    "\U0001f600",
    "\x00",
    "猫",
    "ß",
    "İ",
]


def tokens_from_bytes(tokens: list[str]):
    """Map a byte string to a token string: one draw per example keeps generation cheap."""
    return lambda b: "".join(tokens[x % len(tokens)] for x in b)


def _splice(parts: tuple[bytes, str]) -> str:
    tokens, text = parts
    s = tokens_from_bytes(_TOKENS)(tokens)
    cut = len(s) // 2
    return s[:cut] + text + s[cut:]


garbage_text = st.one_of(
    st.text(max_size=80),
    st.binary(max_size=40).map(tokens_from_bytes(_TOKENS)),
    st.tuples(st.binary(max_size=30), st.text(max_size=6)).map(_splice),
)

non_strings = st.one_of(
    st.none(), st.integers(), st.binary(max_size=10), st.floats(), st.lists(st.integers(), max_size=3)
)


def wrap(answer: str, think: str = "reasoning") -> str:
    return f"<think>{think}</think> <answer>{answer}</answer>"


# ----------------------------------------------------------------------------------------- boxes


@st.composite
def valid_box(draw, lo: int = 0, hi: int = 1000) -> list[int]:
    x1 = draw(st.integers(lo, hi - 1))
    y1 = draw(st.integers(lo, hi - 1))
    x2 = draw(st.integers(x1 + 1, hi))
    y2 = draw(st.integers(y1 + 1, hi))
    return [x1, y1, x2, y2]


class ByteSource:
    """Derives many small choices from one drawn byte string (one hypothesis draw, cheap)."""

    def __init__(self, raw: bytes) -> None:
        self.raw, self.pos = raw, 0

    def byte(self) -> int:
        b = self.raw[self.pos % len(self.raw)] if self.raw else 0
        self.pos += 1
        return b

    def int(self, lo: int, hi: int) -> int:
        return lo + ((self.byte() << 8) | self.byte()) % (hi - lo + 1)

    def choice(self, seq):
        return seq[self.byte() % len(seq)]

    def box(self) -> list[int]:
        x1, y1 = self.int(0, 999), self.int(0, 999)
        return [x1, y1, self.int(x1 + 1, 1000), self.int(y1 + 1, 1000)]


_RAW = st.binary(min_size=48, max_size=48)

# Coordinate tokens each of which makes an answer invalid, whatever parser reads it.
BAD_COORD_TOKENS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "nan",
    "inf",
    "1e999",
    "-1e999",
    "123456789",
    "'12a'",
    "'1e999'",
    "None",
    "null",
    "True",
    "false",
    "[1, 2]",
    "{}",
    "''",
    "'abc'",
    "'\U0001f600'",
    "1e400",
]
BAD_CONF_TOKENS = ["1.5", "-0.1", "'150%'", "'abc'", "NaN", "None", "True", "[0.5]", "2", "'-5%'"]
_POS_KEYS = ["Position", "position", "bbox", "box", "bbox_2d", "BBox"]
_CONF_KEYS = ["Confidence", "confidence", "score", "conf"]


def serialize_entries(entries: list[tuple[list[str], str | None]], quote: str, pos_key: str, conf_key: str) -> str:
    """``[(coord tokens, confidence token or None)]`` -> a Visual-RFT style list literal."""
    parts = []
    for coords, conf in entries:
        s = f"{{{quote}{pos_key}{quote}: [{', '.join(coords)}]"
        if conf is not None:
            s += f", {quote}{conf_key}{quote}: {conf}"
        parts.append(s + "}")
    return "[" + ", ".join(parts) + "]"


def _insert_text(completion: str, pos_frac: int, text: str) -> str:
    pos = pos_frac % (len(completion) + 1)
    return completion[:pos] + text + completion[pos:]


_DET_KINDS = [
    "truncate",
    "bad_coord",
    "swap",
    "degenerate",
    "box_len",
    "nested",
    "no_conf",
    "bad_conf",
    "two_answers",
    "too_many",
    "too_long",
    "unicode",
    "non_string",
]


@st.composite
def detection_near_miss(draw) -> tuple[object, bool]:
    """``(completion, must_fail)``: a valid detection answer with one mutation."""
    kind = draw(st.sampled_from(_DET_KINDS))
    if kind == "non_string":
        return draw(non_strings), True
    r = ByteSource(draw(_RAW))
    n = r.int(1, 3)
    entries = [([str(v) for v in r.box()], str(r.int(0, 100) / 100)) for _ in range(n)]
    quote, pos_key, conf_key = r.choice(["'", '"']), r.choice(_POS_KEYS), r.choice(_CONF_KEYS)
    k, axis = r.int(0, n - 1), r.int(0, 1)
    c = entries[k][0]
    must_fail = True
    if kind == "bad_coord":
        c[r.int(0, 3)] = r.choice(BAD_COORD_TOKENS)
    elif kind == "swap":
        c[axis], c[axis + 2] = c[axis + 2], c[axis]
    elif kind == "degenerate":
        c[axis + 2] = c[axis]
    elif kind == "box_len":
        entries[k] = (c[:3] if axis else c + ["7"], entries[k][1])
    elif kind == "nested":
        entries[k] = (["[1, 2]", "[3, 4]"] if axis else ["{'x': 1}"] * 4, entries[k][1])
    elif kind == "no_conf":
        entries[k] = (c, None)
    elif kind == "bad_conf":
        entries[k] = (c, r.choice(BAD_CONF_TOKENS))
    answer = serialize_entries(entries, quote, pos_key, conf_key)
    if kind == "too_many":
        answer = serialize_entries(entries * (101 // n + 1), quote, pos_key, conf_key)
    completion = wrap(answer)
    if kind == "truncate":
        completion = completion[: r.int(0, completion.index("</answer>"))]
    elif kind == "two_answers":
        completion = completion + " <answer>" + answer + "</answer>"
    elif kind == "too_long":
        completion = completion + " " * 70000
    elif kind == "unicode":
        completion = _insert_text(completion, r.int(0, 10**4), draw(st.text(min_size=1, max_size=8)))
        must_fail = False
    return completion, must_fail


_GROUND_KINDS = [
    "truncate",
    "bad_coord",
    "swap",
    "degenerate",
    "box_len",
    "multiple",
    "empty",
    "two_answers",
    "unicode",
    "non_string",
    "none_list",
    "valid",
]


@st.composite
def grounding_near_miss(draw) -> tuple[object, bool]:
    """``(completion, must_fail)`` for single-box answers (``valid`` ones included, must_fail False)."""
    kind = draw(st.sampled_from(_GROUND_KINDS))
    if kind == "non_string":
        return draw(non_strings), True
    r = ByteSource(draw(_RAW))
    coords = [str(v) for v in r.box()]
    axis = r.int(0, 1)
    must_fail = kind not in ("unicode", "valid")
    if kind == "bad_coord":
        coords[r.int(0, 3)] = r.choice(BAD_COORD_TOKENS)
    elif kind == "swap":
        coords[axis], coords[axis + 2] = coords[axis + 2], coords[axis]
    elif kind == "degenerate":
        coords[axis + 2] = coords[axis]
    elif kind == "box_len":
        coords = coords[:3] if axis else coords + ["5"]
    style = r.choice(["bare", "dict", "visual_rft", "qwen2"])
    if kind == "multiple":
        other = [str(v) for v in r.box()]
        answer = (
            f"[[{', '.join(coords)}], [{', '.join(other)}]]"
            if style != "qwen2"
            else (
                f"({coords[0]},{coords[1]}),({coords[2]},{coords[3]}) ({other[0]},{other[1]}),({other[2]},{other[3]})"
            )
        )
    elif kind == "empty":
        answer = r.choice(["", "[]", "No Objects", "   "])
    elif kind == "none_list":
        answer = "[" + ", ".join(coords) + ", None]"
    elif style == "bare":
        answer = "[" + ", ".join(coords) + "]"
    elif style == "dict":
        answer = '{"bbox_2d": [' + ", ".join(coords) + "]}"
    elif style == "visual_rft":
        answer = serialize_entries([(coords, "0.9")], "'", "Position", "Confidence")
    elif len(coords) != 4 or kind == "bad_coord":  # Qwen2-VL point pairs only hold 4 numbers
        answer = "[" + ", ".join(coords) + "]"
    else:
        answer = f"({coords[0]},{coords[1]}),({coords[2]},{coords[3]})"
    completion = wrap(answer)
    if kind == "truncate":
        completion = completion[: r.int(0, completion.index("</answer>"))]
    elif kind == "two_answers":
        completion += "<answer>" + answer + "</answer>"
    elif kind == "unicode":
        completion = _insert_text(completion, r.int(0, 10**4), draw(st.text(min_size=1, max_size=8)))
    return completion, must_fail


_CLS_KINDS = ["truncate", "empty", "punct", "two_answers", "no_tag", "unicode", "non_string"]


@st.composite
def classification_near_miss(draw, labels: list[str]) -> tuple[int, object, bool]:
    """``(label index, completion, must_fail)`` around a correct answer for ``labels[index]``."""
    kind = draw(st.sampled_from(_CLS_KINDS))
    r = ByteSource(draw(_RAW))
    index = r.int(0, len(labels) - 1)
    label = labels[index]
    completion = wrap(label)
    if kind == "non_string":
        return index, draw(non_strings), True
    if kind == "punct":
        return index, wrap(tokens_from_bytes(list(" _-.,;:!?/'\"()[]"))(r.raw[: r.int(0, 10)])), True
    if kind == "truncate":
        return index, completion[: r.int(0, completion.index("</answer>"))], True
    if kind == "empty":
        return index, wrap(r.choice(["", " ", "\n\t"])), True
    if kind == "two_answers":
        return index, completion + "<answer>" + label + "</answer>", True
    if kind == "no_tag":
        return index, f"<think>x</think> {label}", True
    return index, _insert_text(completion, r.int(0, 10**4), draw(st.text(min_size=1, max_size=8))), False
