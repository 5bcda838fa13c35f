"""jqlora.training.rewards: specs load user functions and factories, None is NaN and the weighted sum is TRL 1.16's
nan-aware one (torch, as TRL computes it), a raising function is one line naming it and the prompt, and the built-ins
score hand-checked cases."""

import math
import sys
import textwrap

import numpy as np
import pytest
import torch

from jqlora.training import rewards as R

USER = textwrap.dedent('''
    def length_reward(prompts, completions, **kw):
        return [float(len(c)) for c in completions]

    def picky(prompts, completions, answer, **kw):
        return [None if a == "skip" else 1.0 for a in answer]

    def fails_on_bad(prompts, completions, **kw):
        return [1.0 / (c != "bad") for c in completions]

    def wrong_count(prompts, completions, **kw):
        return [1.0]

    def not_a_number(prompts, completions, **kw):
        return ["yes" for c in completions]

    def make_bonus(bonus=1.0):
        def bonus_reward(prompts, completions, **kw):
            return [bonus] * len(completions)
        return bonus_reward
''')


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards")
    (root / "my_rewards.py").write_text(USER)
    sys.path.insert(0, str(root))
    yield "my_rewards"
    sys.path.remove(str(root))
    sys.modules.pop("my_rewards", None)


def test_specs_load_functions_and_factories(user_module):
    fn = R.load_reward(f"{user_module}:length_reward")
    assert fn(["p"], ["abc"]) == [3.0]
    assert R.reward_name(f"{user_module}:length_reward") == "length_reward" == R.reward_name(fn)
    bonus = R.load_reward(f"{user_module}:make_bonus(bonus=2.5)")
    assert bonus(["p", "q"], ["a", "b"]) == [2.5, 2.5]
    fmt = R.load_reward(r"jqlora.training.rewards:regex_reward(pattern='Answer: \\w+\\.')")
    assert fmt(["p", "p"], ["Answer: Paris.", "Paris"]) == [1.0, 0.0]


@pytest.mark.parametrize("spec,words", [
    ("no_colon", "expected 'package.module:function'"),
    ("not_a_module_xyz:f", "cannot import module 'not_a_module_xyz'"),
    ("jqlora.training.rewards:nope", "has no callable 'nope'"),
    ("jqlora.training.rewards:regex_reward(1)", "key=literal"),
    ("jqlora.training.rewards:regex_reward(pattern=open)", "key=literal"),
    ("jqlora.training.rewards:regex_reward(pattern='(')", "regex_reward(...) raised error"),
])
def test_bad_specs_are_one_line(spec, words):
    with pytest.raises(R.RewardError) as e:
        R.load_reward(spec)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_none_is_nan_and_weighted_sum_is_trls(user_module):
    funcs = [R.load_reward(f"{user_module}:picky"), R.load_reward(f"{user_module}:length_reward")]
    answers = ["x", "skip", "skip", "y"]
    completions = ["ab", "abc", "a", "abcd"]
    rpf = R.compute_rewards(funcs, ["p"] * 4, completions, {"answer": answers})
    assert np.isnan(rpf[1, 0]) and np.isnan(rpf[2, 0]) and not np.isnan(rpf[:, 1]).any()
    rpf[2, 1] = np.nan  # row 2: every function None: unscorable
    w = [0.5, 2.0]
    t = torch.from_numpy(rpf)
    ref = (t * torch.tensor(w).unsqueeze(0)).nansum(dim=1)  # TRL 1.16 sum_then_normalize
    ref[torch.isnan(t).all(dim=1)] = torch.nan
    np.testing.assert_array_equal(R.weighted_total(rpf, w), ref.numpy())
    assert math.isnan(R.weighted_total(rpf, w)[2]) and R.weighted_total(rpf, w)[1] == 6.0


def test_columns_reach_the_function_and_bad_returns_are_errors(user_module):
    with pytest.raises(R.RewardError, match=r"^reward function wrong_count returned 1 rewards for 3 completions$"):
        R.compute_rewards([R.load_reward(f"{user_module}:wrong_count")], ["p"] * 3, ["a", "b", "c"])
    with pytest.raises(R.RewardError, match=r"not_a_number raised TypeError: a reward must be a number"):
        R.compute_rewards([R.load_reward(f"{user_module}:not_a_number")], ["p"] * 2, ["a", "b"])


def test_a_raising_reward_names_function_and_prompt(user_module):
    fn = R.load_reward(f"{user_module}:fails_on_bad")
    completions = ["ok", "ok", "ok", "bad", "ok", "ok"]
    with pytest.raises(R.RewardError) as e:
        R.compute_rewards([fn], ["p"] * 6, completions, prompt_index=[10, 10, 10, 11, 11, 11])
    msg = str(e.value)
    assert msg == "reward function fails_on_bad raised ZeroDivisionError: float division by zero (prompt index 11)"


def test_exact_match_and_math_answer():
    comps = ["  Paris. ", "paris", "Lyon", [{"role": "assistant", "content": "PARIS!"}]]
    assert R.exact_match(None, comps, answer=["Paris", "Paris", "Paris", "paris"]) == [1.0, 1.0, 0.0, 1.0]
    assert R.exact_match(None, ["x"], answer=[None]) == [None]
    comps = ["so the answer is 1,234.", r"we get \boxed{3/4} and 7 later", "it is 0.75", "x = -2", "no number"]
    assert R.math_answer(None, comps, answer=["1234", "0.75", "3/4", "-2", "5"]) == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert R.math_answer(None, ["12"], answer=["twelve"]) == [None]  # an answer that is not a number: no reward
    fmt = R.regex_reward(r"<answer>.*</answer>", search=True, reward=0.5)
    assert fmt(None, ["x <answer>4</answer>", "4"]) == [0.5, 0.0]


def test_answer_first():
    comps = [" The capital of Peru is Lima. The capital of", "The capital of Peru is Lim", "the capital of peru is lima",
             " The capital of Chile is Lima."]
    assert R.answer_first(None, comps, answer=["The capital of Peru is Lima."] * 4) == [1.0, 0.0, 1.0, 0.0]
    assert R.answer_first(None, ["x"], answer=[None]) == [None]
