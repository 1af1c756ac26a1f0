"""The reward family (minicd/algo/reward.py) against values derived by hand in each test."""

import pytest

from minicd.algo.reward import (NO_CONTEXT, RewardContext, class_weights, code_frequencies,
                                make_reward, missed_bonus, release_codes, release_f1_reward,
                                reward, weighted_f1)
from minicd.config import load_config, parse_reward_spec
from minicd.errors import ConfigError


def test_paper_reward_and_f_beta():
    gold = ["401.9", "584.9"]
    # one of two gold codes: P = 1, R = 1/2; F1 = 2/3, F2 = 5 P R / (4 P + R) = 5/9
    assert reward("<code>401.9</code>", gold)[0] == pytest.approx(2 / 3)
    assert reward("<code>401.9</code>", gold, beta=2.0)[0] == pytest.approx(5 / 9)
    assert make_reward("fbeta:2")("<code>401.9</code>", gold, NO_CONTEXT)[0] == pytest.approx(5 / 9)
    assert reward("401.9 584.9", gold)[0] == 0.0                       # no span: 0 (the paper)


def test_weighted_f1_small_case():
    # w_c = 1 / sqrt(freq): A seen once (1), B four times (1/2), C sixteen times (1/4); D never
    # (default weight). gold {A, B}, pred {B, C, D}: TP = w_B = 0.5, FP = w_C + w_D = 0.25 + 1,
    # FN = w_A = 1 -> F1 = 2 x 0.5 / (2 x 0.5 + 1.25 + 1) = 1 / 3.25 (unweighted: 2 / 5)
    freq = {"A": 1, "B": 4, "C": 16}
    weights = class_weights(["A", "B", "C", "D"], freq)
    assert weights == {"A": 1.0, "B": 0.5, "C": 0.25}
    assert weighted_f1({"B", "C", "D"}, {"A", "B"}, weights, 1.0) == pytest.approx(1 / 3.25)
    assert weighted_f1({"B", "C", "D"}, {"A", "B"}, weights, 0.5) == pytest.approx(1 / 2.75)
    assert weighted_f1({"B", "C", "D"}, {"A", "B"}, {}, 1.0) == pytest.approx(2 / 5)
    assert weighted_f1(set(), {"A"}, weights) == 0.0 and weighted_f1({"D"}, set(), weights) == 0.0
    # through the reward spec, with real codes and frequencies in the context
    ctx = RewardContext(freq={"401.9": 1, "584.9": 4, "428.0": 16})
    gold = ["401.9", "584.9"]
    text = "<code>584.9, 428.0, 250.00</code>"
    assert make_reward("weighted_f1")(text, gold, ctx)[0] == pytest.approx(1 / 3.25)
    assert make_reward("weighted_f1:0.5")(text, gold, ctx)[0] == pytest.approx(1 / 2.75)
    assert make_reward("weighted_f1")("584.9", gold, ctx)[0] == 0.0      # no span
    # a rare code found counts more than a frequent one
    rare, head = (make_reward("weighted_f1")(f"<code>{c}</code>", gold, ctx)[0]
                  for c in ("401.9", "584.9"))
    assert rare == pytest.approx(2 / (2 + 0.5)) and head == pytest.approx(1 / (1 + 1))


def test_code_frequencies_count_records():
    assert code_frequencies([("A", "B", "A"), ("B",), ()]) == {"A": 1, "B": 2}


def test_missed_code_bonus():
    gold = ["401.9", "584.9", "428.0"]
    ctx = RewardContext(pool=frozenset({"584.9", "428.0"}))   # the codes last round missed
    # pred {401.9, 584.9}: F1 = 2 x 2 / (2 + 3) = 0.8; one pool code predicted: + 0.1
    value, parsed = make_reward("f1+missed:0.1")("<code>401.9, 584.9</code>", gold, ctx)
    assert value == pytest.approx(0.8 + 0.1) and parsed.codes == ("401.9", "584.9")
    value, _ = make_reward("f1 + missed:0.25")("<code>584.9, 428.0</code>", gold, ctx)
    assert value == pytest.approx(0.8 + 2 * 0.25)
    # no pool (plain GRPO context) or no pool code predicted: no bonus
    assert make_reward("f1+missed:0.1")("<code>401.9</code>", gold, NO_CONTEXT)[0] == \
        pytest.approx(0.5)
    assert missed_bonus({"401.9"}, gold, ctx.pool, 0.1) == 0.0
    assert missed_bonus({"584.9", "999.9"}, gold, {"584.9", "999.9"}, 0.5) == 0.5  # gold only


def test_release_fallback_scores_icd_shaped_tokens_without_a_span():
    text = "The patient has 401.9 and I10. also 0DTJ4ZZ, V58.61; temp 98.6"
    parsed = release_codes(text)
    # the release's patterns overlap: "V58.61" also matches its ICD-10 category pattern as
    # "V58." (kept with its dot); "I10." before a space is "I10"; 98.6 (a temperature) counts
    assert set(parsed.codes) == {"401.9", "I10", "0DTJ4ZZ", "V58.61", "V58.", "98.6"}
    assert not parsed.has_span
    # 1 of 6 predicted codes is gold, 1 of 2 gold codes found: F1 = 2 x 1 / (6 + 2)
    gold = ["401.9", "428.0"]
    assert release_f1_reward(text, gold)[0] == pytest.approx(2 / 8)
    assert make_reward("f1_release")(text, gold, NO_CONTEXT)[0] == pytest.approx(2 / 8)
    assert make_reward("f1")(text, gold, NO_CONTEXT)[0] == 0.0          # the paper: 0
    # with a span the release and the paper agree; reasoning before </think> is not scanned
    assert release_f1_reward("<code>401.9</code>", gold)[0] == pytest.approx(2 / 3)
    assert release_codes("<think>maybe 250.00</think> so 401.9").codes == ("401.9",)
    # the release scores an empty prediction of an empty gold set 1 (the paper: 0)
    assert release_f1_reward("nothing", [])[0] == 1.0 and reward("nothing", [])[0] == 0.0


def test_reward_spec_errors_and_stage_rule():
    assert parse_reward_spec("weighted_f1").arg == 1.0
    assert parse_reward_spec("fbeta:2+missed:0.5").missed == 0.5
    for bad, words in (("f1+missed:0", "lambda must be a number > 0"),
                       ("f1+bonus:1", "'missed:<lambda>'"),
                       ("f1+missed:1+missed:1", "'missed:<lambda>'"),
                       ("weighted_f1:-1", "default code weight"),
                       ("f2", "expected 'f1'")):
        with pytest.raises(ConfigError, match="grpo.reward") as err:
            parse_reward_spec(bad)
        assert words in str(err.value), bad
    assert load_config(None, ["grpo.reward=f1+missed:0.1"], stage="phi").grpo.reward == \
        "f1+missed:0.1"
    assert load_config(None, ["grpo.reward=weighted_f1"]).grpo.reward == "weighted_f1"
