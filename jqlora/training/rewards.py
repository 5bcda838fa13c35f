"""Reward functions for GRPO: loading ``module.path:function`` specs, calling them on a batch of completions, and the
built-ins for verifiable tasks.

A reward function has TRL's signature ``f(prompts, completions, **columns) -> list[float | None]``: ``prompts`` and
``completions`` hold one entry per completion (B = n_prompts · G; strings, or for conversational prompts lists of
messages, the completion being ``[{"role": "assistant", "content": text}]``); ``columns`` are the dataset's other
columns, each value repeated for the G completions of its prompt, plus ``completion_ids`` (lists of token ids). A
function should take ``**kwargs`` for the columns it does not use. None means "not applicable" and is handled as
TRL 1.16 does: it becomes NaN, the weighted sum over functions ignores it (a nan-aware sum), and a completion every
function scored None is unscorable (no reward, advantage 0; `jqlora.training.grpo`).

A spec is ``"package.module:function"`` or, for a factory, ``"package.module:factory(key=literal, ...)"`` whose call
with those keyword arguments (Python literals) returns the reward function, e.g.
``"jqlora.training.rewards:regex_reward(pattern='^Answer: [A-Z][a-z]+\\\\.$')"``.

Built-ins: `exact_match` (the completion, normalized, equals the ``answer`` column), `answer_first` (it starts with
the ``answer`` column), `math_answer` (the last number
or ``\\boxed{...}`` of the completion equals the ``answer`` column numerically) and `regex_reward` (1 when the
completion matches a regular expression).
"""

from __future__ import annotations

import ast
import importlib
import math
import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

RewardFn = Callable[..., Sequence[float | None]]


class RewardError(ValueError):
    """A reward function that cannot be loaded, raised, or returned something that is not one reward a completion."""


# ----------------------------------------------------------------------------------------------------------------
# Loading


_SPEC = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*:\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*$", re.S)


def load_reward(spec: str) -> RewardFn:
    """The reward function a ``module:function`` or ``module:factory(k=v, ...)`` spec names (see the module doc)."""
    m = _SPEC.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise RewardError(f"reward {spec!r}: expected 'package.module:function' or 'package.module:factory(k=v)'")
    module_name, attr, args = m.groups()
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward {spec!r}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: module {module_name!r} has no callable {attr!r}")
    if args is None:
        return fn
    try:
        call = ast.parse(f"f({args})", mode="eval").body
        if call.args:
            raise ValueError("positional arguments are not accepted")
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as e:
        raise RewardError(f"reward {spec!r}: arguments must be key=literal pairs ({e})") from None
    try:
        made = fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - a user's factory: report it in one line
        raise RewardError(f"reward {spec!r}: {attr}(...) raised {type(e).__name__}: {e}") from None
    if not callable(made):
        raise RewardError(f"reward {spec!r}: {attr}(...) returned {type(made).__name__}, not a function")
    return made


def reward_name(spec: str | RewardFn) -> str:
    """The name metrics use: the function's ``__name__`` (TRL's ``reward_func_names``), or the spec's function."""
    if callable(spec):
        return getattr(spec, "__name__", type(spec).__name__)
    m = _SPEC.match(spec)
    return m.group(2) if m else str(spec)


# ----------------------------------------------------------------------------------------------------------------
# Calling


def _value(x: Any) -> float:
    if x is None:
        return math.nan
    if isinstance(x, (bool, np.bool_, int, float, np.integer, np.floating)):
        return float(x)
    raise TypeError(f"a reward must be a number or None, got {type(x).__name__} {x!r}")


def compute_rewards(funcs: Sequence[RewardFn], prompts: Sequence[Any], completions: Sequence[Any],
                    columns: dict[str, Sequence[Any]] | None = None, *, names: Sequence[str] | None = None,
                    prompt_index: Sequence[int] | None = None) -> np.ndarray:
    """float32 ``[B, F]``: function f's reward of completion b, NaN where it returned None.

    ``prompt_index[b]`` is completion b's prompt in the dataset (for error messages; default b). A function that
    raises, returns the wrong number of rewards or a non-number is a `RewardError` of one line naming the function
    and the prompt: the batch is retried one completion at a time to find the first that fails."""
    B = len(prompts)
    if len(completions) != B:
        raise ValueError(f"{B} prompts but {len(completions)} completions")
    columns = dict(columns or {})
    for key, values in columns.items():
        if len(values) != B:
            raise ValueError(f"column {key!r} has {len(values)} values for {B} completions")
    names = list(names) if names is not None else [reward_name(f) for f in funcs]
    index = list(prompt_index) if prompt_index is not None else list(range(B))
    out = np.zeros((B, len(funcs)), np.float32)
    for j, (fn, name) in enumerate(zip(funcs, names)):
        try:
            values = list(fn(prompts=list(prompts), completions=list(completions), **columns))
            if len(values) != B:
                raise RewardError(f"reward function {name} returned {len(values)} rewards for {B} completions")
            out[:, j] = [_value(v) for v in values]
        except RewardError:
            raise
        except Exception as e:  # noqa: BLE001 - a user's function: find the completion and say it in one line
            raise _locate(fn, name, prompts, completions, columns, index, e) from None
    return out


def _locate(fn, name, prompts, completions, columns, index, error) -> RewardError:
    for b in range(len(prompts)):
        try:
            [_value(v) for v in fn(prompts=[prompts[b]], completions=[completions[b]],
                                   **{k: [v[b]] for k, v in columns.items()})]
        except Exception as e:  # noqa: BLE001
            return RewardError(f"reward function {name} raised {type(e).__name__}: {e} (prompt index {index[b]})")
    return RewardError(f"reward function {name} raised {type(error).__name__}: {error} on the batch of prompt "
                       f"indices {min(index)}..{max(index)} (not on any one completion alone)")


def weighted_total(rewards_per_func: np.ndarray, weights: Sequence[float] | None = None) -> np.ndarray:
    """float32 ``[B]``: Σ_f w_f · r_bf ignoring NaN (TRL's nansum), NaN where every function returned None."""
    r = np.asarray(rewards_per_func, np.float32)
    w = np.ones(r.shape[1], np.float32) if weights is None else np.asarray(weights, np.float32)
    if w.shape != (r.shape[1],):
        raise ValueError(f"{len(w)} reward weights for {r.shape[1]} reward functions")
    total = np.nansum(r * w[None, :], axis=1).astype(np.float32)
    total[np.isnan(r).all(axis=1)] = np.nan
    return total


# ----------------------------------------------------------------------------------------------------------------
# Built-ins


def completion_text(c: Any) -> str:
    """The text of a completion: the string itself, or the content of a conversational completion's last message."""
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        return str(c.get("content", ""))
    if isinstance(c, (list, tuple)) and c:
        return completion_text(c[-1])
    return ""


def _normalize(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().strip(".!").strip().casefold()


def exact_match(prompts, completions, answer=None, **_) -> list[float | None]:
    """1.0 when the completion equals the ``answer`` column after normalization (whitespace runs to one space, ends
    stripped, a trailing period or ``!`` dropped, case folded), else 0.0; None where the answer is missing."""
    answers = answer if answer is not None else [None] * len(completions)
    return [None if a is None else float(_normalize(completion_text(c)) == _normalize(str(a)))
            for c, a in zip(completions, answers)]


def answer_first(prompts, completions, answer=None, **_) -> list[float | None]:
    """1.0 when the completion, normalized as `exact_match` does, starts with the ``answer`` column's sentence (what
    follows it is not judged), else 0.0; None where the answer is missing."""
    answers = answer if answer is not None else [None] * len(completions)
    return [None if a is None else float(_normalize(completion_text(c)).startswith(_normalize(str(a))))
            for c, a in zip(completions, answers)]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _parse_number(s: str) -> Fraction | None:
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str) -> Fraction | None:
    """The answer of a math completion: the content of its last ``\\boxed{...}``, else its last number."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        return _parse_number(boxed[-1])
    numbers = _NUMBER.findall(text)
    return _parse_number(numbers[-1]) if numbers else None


def math_answer(prompts, completions, answer=None, **_) -> list[float | None]:
    """1.0 when the completion's final answer (`extract_answer`) equals the ``answer`` column as a number (integers,
    decimals, fractions, thousands separators), else 0.0; None where the answer is missing or not a number."""
    answers = answer if answer is not None else [None] * len(completions)
    out: list[float | None] = []
    for c, a in zip(completions, answers):
        want = None if a is None else _parse_number(str(a))
        if want is None:
            out.append(None)
            continue
        got = extract_answer(completion_text(c))
        out.append(float(got is not None and got == want))
    return out


def regex_reward(pattern: str, reward: float = 1.0, search: bool = False) -> RewardFn:
    """A format reward: ``reward`` when the completion fully matches ``pattern`` (``search=True``: contains a match;
    DOTALL either way), else 0.0."""
    rx = re.compile(pattern, re.S)
    test = rx.search if search else rx.fullmatch

    def format_reward(prompts, completions, **_) -> list[float]:
        return [float(reward) if test(completion_text(c)) else 0.0 for c in completions]

    format_reward.__name__ = "format_reward"
    return format_reward
