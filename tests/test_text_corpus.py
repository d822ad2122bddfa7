"""The offline text corpus (stdlib docstrings) is real, deterministic and split cleanly."""
from soniq.demos.text_corpus import train_heldout_split


def test_split_is_deterministic_disjoint_and_sentence_like():
    train, held = train_heldout_split(max_modules=60)
    assert (train, held) == train_heldout_split(max_modules=60)
    assert len(train) > 100 and len(held) > 10
    assert not set(train) & set(held)
    for s in train[:200] + held[:50]:
        assert 40 <= len(s) <= 300 and s[0].isupper() and s[-1] in ".!?"
