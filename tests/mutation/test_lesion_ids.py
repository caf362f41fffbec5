"""A request's lesion ids (service/core/lesions.py, lesion_ids_from_json): what is accepted, what is
refused and with which message, and the NFC normalisation that makes two spellings one lesion."""

from __future__ import annotations

import json

import pytest

from service.core.errors import LesionIdsError
from service.core.lesions import MAX_LESION_ID, lesion_ids_from_json


def test_no_lesion_ids_means_no_grouping():
    assert lesion_ids_from_json(None, 2) is None
    assert lesion_ids_from_json("", 2) is None
    assert lesion_ids_from_json("  \n", 2) is None


def test_lesion_ids_one_per_image_strings_or_null():
    assert lesion_ids_from_json('["L1", null, "l1"]', 3) == ["L1", None, "l1"]  # case matters
    assert lesion_ids_from_json(json.dumps(["x" * MAX_LESION_ID]), 1) == ["x" * MAX_LESION_ID]
    assert lesion_ids_from_json("[]", 0) == []


def test_canonically_equal_spellings_are_one_lesion():
    assert lesion_ids_from_json(json.dumps(["e\u0301", "\u00e9"]), 2) == ["\u00e9", "\u00e9"]


@pytest.mark.parametrize(
    "raw, n",
    [
        ('["a", "b"]', 3),  # one id per image
        ('["a", "b"]', 1),
        ('{"a": 1}', 1),
        ('"a"', 1),
        ("not json", 1),
        ("1" * 5000, 1),  # an integer of thousands of digits
        ("[" * 100_000, 1),  # nesting too deep
        ('[""]', 1),  # empty id
        (json.dumps(["x" * (MAX_LESION_ID + 1)]), 1),
        ('["a\\nb"]', 1),  # not printable
        ("[1]", 1),
        ('[["a"]]', 1),
    ],
)
def test_malformed_lesion_ids_are_refused_with_the_rule(raw, n):
    with pytest.raises(LesionIdsError) as caught:
        lesion_ids_from_json(raw, n)
    assert str(caught.value) == (
        f"lesion_ids must be a JSON list with one lesion id per image ({n} images): a string of 1 to "
        f"{MAX_LESION_ID} printable characters, or null for an image of no lesion named"
    )


def test_an_id_longer_than_the_limit_once_normalised_is_refused():
    """U+0958 is 1 character, 2 in NFC: 128 of them pass the first check and are refused after."""
    raw = json.dumps(["\u0958" * MAX_LESION_ID])
    with pytest.raises(LesionIdsError, match=f"an id is over {MAX_LESION_ID} characters once normalised"):
        lesion_ids_from_json(raw, 1)
    assert lesion_ids_from_json(json.dumps(["\u0958" * (MAX_LESION_ID // 2)]), 1) == ["\u0915\u093c" * 64]
