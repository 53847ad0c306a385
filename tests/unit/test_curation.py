"""course_utils.curation: the rentals gate, candidates, de-duplication and the grouped split."""

import json
from collections import UserDict

import pytest

from course_utils import curation, data
from course_utils.checks import WrongType

GOOD = {"bedrooms": 2, "type": "flat", "city": "Bath", "rent_gbp": 1150, "rent_period": "month"}
LISTING = "Cosy 2-bed flat in Bath, £1,150 pcm. Deposit £1,300."


def example(listing: str = LISTING, answer: str | dict = GOOD) -> dict:
    answer = answer if isinstance(answer, str) else json.dumps(answer)
    return {
        "messages": [
            {"role": "system", "content": data.INSTRUCTION_SYSTEM},
            {"role": "user", "content": listing},
            {"role": "assistant", "content": answer},
        ]
    }


def test_every_shipped_rentals_example_passes_the_gate():
    for split in data.SPLITS:
        problems = [curation.rental_problem(e) for e in data.load_instruction_task(split)]
        assert [p for p in problems if p is not None] == [], split


def test_a_good_example_passes_and_so_does_a_mapping_like_a_dataset_row():
    assert curation.rental_problem(example()) is None
    assert curation.rental_problem(UserDict(example())) is None  # .filter passes a LazyRow


@pytest.mark.parametrize(
    ("candidate", "reason"),
    [
        ("not an example", "format: expected a JSON object"),
        (example(answer=" "), "format: message 2 (assistant) has empty content"),
        (example(answer=json.dumps(GOOD)[:-1]), "format: the answer is not one JSON object"),
        (example(answer="Sure! " + json.dumps(GOOD)), "format: the answer is not one JSON object"),
        (example(answer=json.dumps([GOOD])), "format: the answer is not one JSON object"),
        ({"messages": example()["messages"][1:]}, "format: the roles are ['user', 'assistant']"),
        (example(answer={**GOOD, "garden": True}), "schema: the answer's keys"),
        (
            example(answer={k: v for k, v in GOOD.items() if k != "city"}),
            "schema: the answer's keys",
        ),
        (example(answer={**GOOD, "bedrooms": "two"}), "schema: bedrooms is 'two'"),
        (example(answer={**GOOD, "bedrooms": True}), "schema: bedrooms is True"),
        (example(answer={**GOOD, "type": "apartment"}), "schema: type 'apartment' is not one of"),
        (example(answer={**GOOD, "type": "studio"}), "schema: a studio with 2 bedrooms"),
        (example(answer={**GOOD, "bedrooms": 0}), "schema: a flat with 0 bedrooms"),
        (example(answer={**GOOD, "city": "Paris"}), "schema: city 'Paris' is not one of"),
        (example(answer={**GOOD, "rent_gbp": "£1,150"}), "schema: rent_gbp is '£1,150'"),
        (example(answer={**GOOD, "rent_gbp": 1150.5}), "schema: rent_gbp is 1150.5"),
        (example(answer={**GOOD, "rent_period": "pcm"}), "schema: rent_period is 'pcm'"),
        (
            example(answer={**GOOD, "city": "York"}),
            "listing: the listing does not mention the city",
        ),
        (example(answer={**GOOD, "rent_gbp": 1300}), "listing: the listing names no rent of £1300"),
        (example(answer={**GOOD, "rent_gbp": 1151}), "listing: the listing names no rent of £1151"),
        (example(answer={**GOOD, "rent_period": "week"}), "listing: the listing gives per month"),
        (example(answer={**GOOD, "type": "house"}), "listing: the listing names flat"),
        (example(answer={**GOOD, "bedrooms": 3}), "listing: the listing gives 2 bedrooms"),
        (example(LISTING.replace(" pcm", "")), "listing: the listing gives per no period"),
        (example(LISTING + ' {"bedrooms": 2}'), "listing: the listing contains JSON"),
        (
            example("Studio flat in Bath, £1,150 pcm.", GOOD),
            "listing: the listing names studio, the answer says flat",
        ),
        (
            example("Flat in Bath, £1,150 pcm.", GOOD),
            "listing: the listing gives no number of bedrooms",
        ),
    ],
)
def test_a_malformed_candidate_is_rejected_with_its_reason(candidate, reason):
    problem = curation.rental_problem(candidate)
    assert problem is not None and problem.startswith(reason), problem
    kept, rejected = curation.keep_valid([example(), candidate])
    assert kept == [example()] and rejected == [(candidate, problem)]


def test_the_listing_checks_read_the_usual_wordings():
    studio = {**GOOD, "type": "studio", "bedrooms": 0, "rent_gbp": 160, "rent_period": "week"}
    assert curation.rental_problem(example("Studio apartment in BATH, £160 p/w.", studio)) is None
    weekly = {**GOOD, "bedrooms": 3, "rent_gbp": 250, "rent_period": "week"}
    assert curation.rental_problem(example("Bath: 3BR flat, 250 GBP per week.", weekly)) is None
    house = {**GOOD, "type": "house", "bedrooms": 4, "rent_gbp": 1800}
    listing = "Four bedroom semi-detached house in Bath, £1,800.00 per calendar month."
    assert curation.rental_problem(example(listing, house)) is None


def test_parse_candidate_reads_the_listing_and_the_first_json_object():
    text = f"Listing: {LISTING}\nJSON: {json.dumps(GOOD)}\n\nListing: another"
    candidate = curation.parse_candidate(text)
    assert curation.listing_text(candidate) == LISTING
    assert json.loads(data.reference_answer(candidate)) == GOOD
    assert curation.rental_problem(candidate) is None
    on_the_next_line = curation.parse_candidate(f"Listing:\n{LISTING}\nJSON: {json.dumps(GOOD)}")
    assert on_the_next_line == candidate
    empty = curation.parse_candidate("Here is a nice flat.")
    assert curation.rental_problem(empty) == "format: message 1 (user) has empty content"
    no_json = curation.parse_candidate(f"Listing: {LISTING}\nThat is all.")
    assert curation.rental_problem(no_json) == "format: message 2 (assistant) has empty content"
    with pytest.raises(WrongType, match="string"):
        curation.parse_candidate(None)


def test_normalise_folds_case_punctuation_and_spaces():
    assert (
        curation.normalise("COSY 2-BED flat in Bath:  £1,150 pcm!")
        == "cosy 2bed flat in bath 1150 pcm"
    )
    with pytest.raises(WrongType, match="string"):
        curation.normalise(3)


def test_a_duplicate_is_dropped_exactly_or_once_normalised():
    first = example()
    same = example()
    retyped = example(LISTING.upper().replace(",", ""))
    other = example("Cosy 2-bed flat in Bath, £1,200 pcm.", {**GOOD, "rent_gbp": 1200})
    kept, dropped = curation.dedupe([first, other, same, retyped])
    assert kept == [first, other]
    assert dropped == [
        (same, "exact duplicate of example 0"),
        (retyped, "same as example 0 once normalised"),
    ]
    with pytest.raises(WrongType, match="list"):
        curation.dedupe(first)
    with pytest.raises(WrongType, match="function"):
        curation.dedupe([first], key="listing")


def pairs_of_wordings(n: int) -> list[dict]:
    """n properties, each written twice (two listings, one answer)."""
    examples = []
    for rent in range(1000, 1000 + 10 * n, 10):
        record = {**GOOD, "rent_gbp": rent}
        examples.append(example(f"Cosy 2-bed flat in Bath, £{rent} pcm.", record))
        examples.append(example(f"Bath: two bedroom flat to let at £{rent} per month.", record))
    return examples


def test_a_grouped_split_has_no_leakage_and_a_plain_split_does():
    examples = pairs_of_wordings(10)
    train, test = curation.group_split(examples, test_fraction=0.3, seed=0)
    groups = set(map(curation.answer_key, train)), set(map(curation.answer_key, test))
    assert not groups[0] & groups[1]
    assert len(train) + len(test) == len(examples) and len(test) == 6
    assert [e for e in examples if e in test] == test  # original order kept
    assert curation.group_split(examples, test_fraction=0.3, seed=0) == (train, test)
    assert curation.group_split(examples, test_fraction=0.3, seed=1) != (train, test)
    plain_train, plain_test = data.train_validation_split(examples, fraction=0.3, seed=0)
    plain = set(map(curation.answer_key, plain_train)) & set(map(curation.answer_key, plain_test))
    assert plain  # the check above can fail: a plain split separates some pair


def test_answer_key_ignores_key_order():
    reordered = json.dumps(dict(reversed(list(GOOD.items()))))
    assert curation.answer_key(example()) == curation.answer_key(example(answer=reordered))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"test_fraction": 0}, ValueError, "both sides non-empty"),
        ({"test_fraction": 1.5}, ValueError, "test_fraction"),
        ({"test_fraction": "0.2"}, WrongType, "test_fraction"),
        ({"seed": 1.5}, WrongType, "seed"),
    ],
)
def test_group_split_says_what_to_pass(kwargs, error, match):
    with pytest.raises(error, match=match):
        curation.group_split(pairs_of_wordings(3), **kwargs)


def test_one_group_cannot_be_split():
    with pytest.raises(ValueError, match="both sides"):
        curation.group_split(pairs_of_wordings(1))
