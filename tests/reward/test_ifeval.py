"""ifeval (ROLL's GeneralRuleRewardWorker): its checks on instruction-following examples in ROLL's data format
(RLVR-IFeval: every constraint key present, null where unused), and the reward served over gRPC."""

from __future__ import annotations

import json

import pytest

from fabric.reward.ifeval import CHECKS, ifeval_reward
from tests.reward.test_server import score

KEYS = ["N", "quantifier", "end_phrase", "keyword_list", "word", "forbidden_words", "letter", "i", "first_word",
        "postscript_marker", "options", "section_splitter", "original_prompt"]  # fmt: skip


def truth(func_name: str, **args) -> str:
    """A ground_truth as ROLL's ifeval data writes it."""
    return json.dumps({"func_name": func_name, **{key: None for key in KEYS}, **args})


POEM = "the sea is calm tonight\nthe tide is full, the moon lies fair"
EXAMPLES = [  # (check, its arguments, a response that follows the instruction, one that does not)
    ("validate_lowercase", {}, POEM, "The sea is calm tonight."),
    ("validate_uppercase", {}, "HELLO FROM THE NORTH", "Hello from the north"),
    ("validate_no_commas", {}, "Paris is the capital of France.", "Paris, the capital, is in France."),
    ("validate_quotation", {}, '"Be yourself; everyone else is already taken."', "Be yourself."),
    ("validate_title", {}, "<<Ode to Autumn>>\nSeason of mists...", "Ode to Autumn\nSeason of mists..."),
    ("validate_json_format", {}, '{"name": "Ada", "born": 1815}', "name: Ada"),
    ("verify_keywords", {"keyword_list": ["photosynthesis", "Chlorophyll"]},
     "Chlorophyll drives photosynthesis in leaves.", "Leaves are green."),
    ("verify_keyword_frequency", {"word": "data", "N": 3},
     "Data beats opinions. Clean data, then more data!", "Data beats opinions. Clean data."),
    ("validate_forbidden_words", {"forbidden_words": ["very", "really"]},
     "The results were striking.", "The results were really striking."),
    ("verify_letter_frequency", {"letter": "z", "N": 2}, "Jazz is fun.", "Jazzz is fun."),
    ("verify_paragraph_count", {"N": 2}, "First part.\n* * *\nSecond part.", "First part.\nSecond part."),
    ("validate_word_constraint", {"N": 5, "quantifier": "at most"}, "Keep it short, please.",
     "This answer uses far more than five words in total."),
    ("validate_word_constraint", {"N": 10, "quantifier": "around"}, "one two three four five six seven eight nine",
     "one two three four five six seven"),
    ("verify_sentence_constraint", {"N": 3, "quantifier": "at least"}, "It rained. We stayed in. We read.",
     "It rained all day."),
    ("validate_paragraphs", {"N": 2, "first_word": "Moreover", "i": 2}, "Cats sleep a lot.\n\nMoreover, they purr.",
     "Cats sleep a lot.\n\nAlso, they purr."),
    ("verify_postscript", {"postscript_marker": "P.S."}, "See you soon.\nP.S. Bring snacks.", "See you soon. P.S."),
    ("validate_placeholders", {"N": 2}, "Send it to [name] at [address].", "Send it to [name]."),
    ("verify_bullet_points", {"N": 3}, "* eggs\n* milk\n* bread", "* eggs\n* milk"),
    ("validate_choice", {"options": ["My answer is yes.", "My answer is no.", "My answer is maybe."]},
     "My answer is yes.", "Yes, definitely."),
    ("validate_highlighted_sections", {"N": 2}, "The *first* and the *second* points.", "The *first* point."),
    ("validate_sections", {"N": 2, "section_splitter": "SECTION"}, "SECTION 1\nIntro\nSECTION 2\nBody",
     "SECTION 1\nIntro and body"),
    ("validate_repeat_prompt", {"original_prompt": "Name a prime."}, "Name a prime. 7 is prime.", "7 is prime."),
    ("validate_two_responses", {}, "Tea is best.\n******\nCoffee is best.",
     "Tea is best.\n******\nCoffee wins.\n******\nJuice."),
    ("validate_frequency_capital_words", {"N": 2, "quantifier": "at least"}, "The NASA and ESA teams met.",
     "The Nasa team met."),
    ("validate_end", {"end_phrase": "Is there anything else I can help with?"},
     "Done. Is there anything else I can help with?", "Is there anything else I can help with? Done."),
]  # fmt: skip


@pytest.mark.parametrize("func_name, args, good, bad", EXAMPLES, ids=[f"{e[0]}-{i}" for i, e in enumerate(EXAMPLES)])
def test_each_check_passes_a_following_response_and_fails_one_that_does_not(func_name, args, good, bad):
    assert ifeval_reward(good, truth(func_name, **args))[:2] == (1.0, 1.0)
    assert ifeval_reward(bad, truth(func_name, **args))[:2] == (0.0, 0.0)


def test_the_examples_cover_every_check_but_language_detection():
    assert set(CHECKS) - {e[0] for e in EXAMPLES} == {"validate_response_language"}


def test_the_check_reads_after_the_last_think_and_the_penalty_reads_everything():
    response = "<think>Let me THINK, with commas.</think>\n\nall lowercase here<|im_end|>"
    assert ifeval_reward(response, truth("validate_lowercase"))[:2] == (1.0, 1.0)
    repetitive = "the cat sat " * 6
    reward, correct, _ = ifeval_reward(repetitive, truth("validate_lowercase"))
    # ROLL's 3-gram penalty: 16 3-grams, 3 distinct -> (1 - 3/16) * -0.5
    assert correct == 1.0 and reward == pytest.approx(1.0 + (1 - 3 / 16) * -0.5)


def test_keyword_frequency_counts_the_word_not_every_word():
    # ROLL counts every word (its `word == word`): this 4-word response would pass N=4 for any keyword
    assert ifeval_reward("apples and more pears", truth("verify_keyword_frequency", word="apples", N=4))[1] == 0.0


def test_a_check_that_raises_on_its_input_scores_zero_as_in_roll():
    reward, correct, info = ifeval_reward("Jazz", truth("verify_letter_frequency", letter="zz", N=2))
    assert (reward, correct) == (0.0, 0.0) and "ValueError" in info


def item(response: str, ground_truth: str) -> dict:
    return {"prompt": "Follow the instruction.", "response": response, "ground_truth": ground_truth,
            "reward_name": "ifeval"}  # fmt: skip


def test_served_ifeval_scores_a_batch(rlvr_reward_server):
    items = [item(good, truth(name, **args)) for name, args, good, _ in EXAMPLES[:8]]
    items += [item(bad, truth(name, **args)) for name, args, _, bad in EXAMPLES[:8]]
    responses = score(rlvr_reward_server.address, items)
    assert not any(r.HasField("error") for r in responses)
    assert [r.score for r in responses] == [1.0] * 8 + [0.0] * 8


def test_served_ifeval_refuses_a_ground_truth_it_cannot_check(rlvr_reward_server):
    responses = score(rlvr_reward_server.address, [
        item("hello", "validate_lowercase"),
        item("hello", json.dumps({"func_name": "validate_lowercse"})),
        item("hello", json.dumps({"func_name": "verify_keywords"})),
    ])  # fmt: skip
    assert [(r.error.code, r.error.field) for r in responses] == [(3, "ground_truth")] * 3
    assert "JSON object" in responses[0].error.message
    assert "did you mean 'validate_lowercase'?" in responses[1].error.message
    assert "verify_keywords needs keyword_list" in responses[2].error.message


def test_the_multi_domain_example_gold_answers_score_full_marks(rlvr_reward_server):
    from fabric.tasks.multi_domain import examples

    rows = [row for row in examples(seed=0, per_domain=8) if row["tag"] in ("ifeval", "KodCode")]
    names = {"ifeval": "ifeval", "KodCode": "code"}
    items = [{"prompt": r["prompt"], "response": r["response"], "ground_truth": r["ground_truth"],
              "reward_name": names[r["tag"]]} for r in rows]  # fmt: skip
    responses = score(rlvr_reward_server.address, items)
    assert [(r.reward_name, r.score) for r in responses] == [(item["reward_name"], 1.0) for item in items], [
        r.info or r.error.message for r in responses
    ]
