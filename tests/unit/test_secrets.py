"""The one secret mask: every form a secret takes in a message is replaced, whatever its length."""

from __future__ import annotations

import json
import threading
import urllib.parse

import pytest

from exporter.secrets import MASK, SHORT, SecretMask, derived_forms


def test_masks_the_secret_and_the_forms_libraries_turn_it_into():
    secret = 'p@ss} w"rd\\1'
    mask = SecretMask([secret])
    texts = [
        f"password {secret} rejected",
        "DRIVER={x};PWD={" + secret.replace("}", "}}") + "}",  # the ODBC braced form
        "https://svc:" + urllib.parse.quote(secret, safe="") + "@host/",
        "body=" + urllib.parse.quote_plus(secret),
        json.dumps({"password": secret}),
        repr({"password": secret}),
    ]
    for text in texts:
        masked = mask.mask(text)
        assert MASK in masked, text
        for form in derived_forms(secret):
            assert form not in masked, (text, form, masked)


def test_longest_first_so_a_secret_containing_another_is_masked_whole():
    mask = SecretMask(["abcdefgh", "abcdefgh-and-more"])
    assert mask.mask("x abcdefgh-and-more y") == f"x {MASK} y"


def test_one_pass_never_masks_the_mask_text():
    mask = SecretMask(["secret", "<secret>x"])
    assert mask.mask("a secret b") == f"a {MASK} b"
    assert mask.mask("<secret>x") == MASK


@pytest.mark.parametrize("secret", ["x", "ab", "pwd", "1234", "short7!"])
def test_short_secrets_are_masked_where_they_stand_alone(secret):
    assert len(secret) < SHORT
    mask = SecretMask([secret])
    for text in (f"PWD={secret};", f"password '{secret}'", f"user:{secret}@host", secret, f"[{secret}]"):
        assert secret not in mask.mask(text).replace(MASK, ""), text
    # ...but not inside a longer word, which would garble every line and hint at the letters.
    word = f"zz{secret}zz"
    assert mask.mask(word) == word


def test_long_secrets_are_masked_even_inside_words():
    mask = SecretMask(["correct-horse"])
    assert mask.mask("xxcorrect-horsexx") == f"xx{MASK}xx"


def test_empty_values_are_ignored_and_an_empty_mask_changes_nothing():
    mask = SecretMask(["", ""])
    assert len(mask) == 0
    assert mask.mask("nothing to hide") == "nothing to hide"


def test_secrets_added_later_are_masked_too():
    mask = SecretMask(["first-secret"])
    mask.add(["second-secret"])
    assert mask.mask("first-secret second-secret") == f"{MASK} {MASK}"
    assert "second" not in repr(mask)


def test_concurrent_use_while_adding():
    mask = SecretMask(["base-secret-value"])
    errors: list[str] = []

    def scrub() -> None:
        for _ in range(2000):
            if "base-secret-value" in mask.mask("base-secret-value"):
                errors.append("leak")

    threads = [threading.Thread(target=scrub) for _ in range(4)]
    for thread in threads:
        thread.start()
    for index in range(200):
        mask.add([f"added-secret-{index}"])
    for thread in threads:
        thread.join()
    assert errors == []
