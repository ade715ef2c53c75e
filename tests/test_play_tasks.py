"""The play tasks (nomoat/eval/play_tasks.py): items whose answers the passage holds, plausible wrong answers,
seeded and disjoint splits, and the paired test that says whether a stage's change in accuracy is more than
chance (checked against the binomial distribution by hand and against SciPy's exact binomial test)."""

from __future__ import annotations

import math
import random

import pytest

from nomoat.errors import UserError
from nomoat.eval.play_tasks import TASKS, change_line, look_alike, make_items, paired_change, speeches

PLAY = "\n\n".join(
    f"{name}:\n{line}"
    for name, line in [
        ("ANTONIO", "What news upon the Rialto?"), ("BASSANIO", "I know not, good sir."),
        ("PORTIA", "The quality of mercy is not strained."), ("ANTONIO", "I hold the world but as the world."),
        ("GRATIANO", "Let me play the fool."), ("PORTIA", "By my troth, my little body is aweary."),
        ("NERISSA", "You would be, sweet madam."), ("BASSANIO", "In Belmont is a lady richly left."),
        ("ANTIGONUS", "Come, poor babe."), ("PORTIA", "Tarry a little."), ("GRATIANO", "O learned judge!"),
        ("NERISSA", "Mark, Jew: O learned judge!"), ("ANTONIO", "Most heartily I do beseech the court."),
    ] * 3
)  # fmt: skip


def test_every_answer_is_in_its_passage_and_the_wrong_one_is_not_the_answer() -> None:
    items = make_items(PLAY, 100, seed=0, stride=1)
    assert {it.task for it in items} == set(TASKS)
    for it in items:
        speakers = [block.split(":\n")[0] for block in it.passage.split("\n\n")]
        assert it.answer in speakers and it.wrong != it.answer and it.wrong
        if it.task == "first_speaker":
            assert it.answer == speakers[0]
        elif it.task == "last_speaker":
            assert it.answer == speakers[-1]
        else:
            line = it.question.removeprefix('Who says "').removesuffix('"?')
            assert f"{it.answer}:\n{line}" in it.passage


def test_items_are_seeded_and_stride_one_gives_more() -> None:
    assert make_items(PLAY, 100, seed=3) == make_items(PLAY, 100, seed=3) != make_items(PLAY, 100, seed=4)
    assert len(make_items(PLAY, 1000, seed=0, stride=1)) > 2 * len(make_items(PLAY, 1000, seed=0))


def test_renamed_passages_draw_names_from_the_whole_cast() -> None:
    cast = {name for name, _ in speeches(PLAY)}
    items = make_items(PLAY, 1000, seed=0, stride=1, rename=2)
    assert {it.answer for it in items} <= cast
    lines = {line for _, line in speeches(PLAY)}
    assert any(  # the same line under another speaker than the play gives it: the answer must be read
        f"{name}:\n{line}" in it.passage and (name, line) not in speeches(PLAY)
        for it in items
        for name in cast
        for line in lines
    )


def test_look_alike_is_the_cast_name_sharing_the_longest_start() -> None:
    cast = sorted({"ANTONIO", "ANTIGONUS", "BASSANIO", "PORTIA", "NERISSA"})
    assert look_alike("ANTONIO", cast, {"ANTONIO"}) == "ANTIGONUS"
    assert look_alike("ANTONIO", cast, {"ANTONIO", "ANTIGONUS"}) is None  # no shared start left: no look-alike


def test_unknown_task_and_a_text_without_speeches_are_user_errors() -> None:
    with pytest.raises(UserError, match="unknown play task 'who_sings'"):
        make_items(PLAY, 10, seed=0, tasks=["who_sings"])
    with pytest.raises(UserError, match="too few speeches"):
        make_items("Once upon a time there was prose.", 10, seed=0)


def binomial_p(gained: int, lost: int) -> float:
    """The exact McNemar p-value written out: twice the smaller tail of Binomial(gained + lost, 1/2)."""
    n = gained + lost
    return min(1.0, 2 * sum(math.comb(n, k) * 0.5**n for k in range(min(gained, lost) + 1)))


@pytest.mark.parametrize("gained, lost", [(10, 2), (2, 10), (7, 7), (0, 0), (40, 21), (0, 6)])
def test_paired_change_counts_discordant_items_and_tests_them(gained: int, lost: int) -> None:
    rng = random.Random(gained * 100 + lost)
    pairs = [(False, True)] * gained + [(True, False)] * lost + [(True, True)] * 30 + [(False, False)] * 17
    rng.shuffle(pairs)
    change = paired_change([b for b, _ in pairs], [a for _, a in pairs])
    assert (change["gained"], change["lost"]) == (gained, lost)
    assert change["change"] == pytest.approx((gained - lost) / len(pairs))
    assert change["p_value"] == pytest.approx(binomial_p(gained, lost), rel=1e-12)
    if gained + lost:
        scipy_stats = pytest.importorskip("scipy.stats")
        expected = scipy_stats.binomtest(gained, gained + lost, 0.5).pvalue
        assert change["p_value"] == pytest.approx(expected, rel=1e-9)


def test_paired_change_values_and_line() -> None:
    change = paired_change([False] * 10 + [True] * 90, [True] * 10 + [False] * 2 + [True] * 88)
    assert change["p_value"] == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 0.0386: a real gain at the 5% level
    assert change_line({"stage": "sft", **change}) == (
        "+8.0 points vs sft (10 items gained, 2 lost; McNemar p = 0.039)"
    )
    with pytest.raises(ValueError, match="3 items before, 2 after"):
        paired_change([True] * 3, [True] * 2)
