"""The tiny text-to-video recipe's data: moving digits with captions naming digit and motion,
some (digit, motion) pairs held out of the training split."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("decord")

from ditx.modalities.video.moving_digits import (  # noqa: E402
    CAPTION_WORDS,
    HELD_OUT_PAIRS,
    MOTION_PHRASES,
    MOTIONS,
    SUBJECTS,
    MovingDigitsTextDataset,
    caption_for,
    parse_caption,
    parse_pairs,
    render_moving_digits,
)


def test_every_caption_parses_back_to_its_digit_and_motion():
    rng = np.random.default_rng(0)
    seen = set()
    for digit in range(10):
        for motion in MOTIONS:
            for _ in range(40):
                caption = caption_for(digit, motion, rng)
                seen.add(caption)
                assert parse_caption(caption) == (digit, motion), caption
                assert set(caption.split()) <= set(CAPTION_WORDS)
    assert len(seen) == 10 * 4 * len(SUBJECTS) * 2  # every phrasing is drawn
    assert parse_caption("a dog running") == (None, None)
    assert parse_caption("a 3 and a 5 moving up and down") == (None, "vertical")


def test_held_out_pairs_are_checked():
    assert parse_pairs(["0 circle", "9 horizontal"]) == {(0, "circle"), (9, "horizontal")}
    with pytest.raises(ValueError, match="'12 circle' must be '<digit 0-9> <motion>'"):
        parse_pairs(["12 circle"])
    with pytest.raises(ValueError, match="'3 zigzag'"):
        parse_pairs(["3 zigzag"])
    assert all(len(phrases) == 2 for phrases in MOTION_PHRASES.values())


def test_excluded_pairs_are_never_rendered():
    exclude = parse_pairs(HELD_OUT_PAIRS)
    clips, labels, motions = render_moving_digits(400, 4, 24, 10, "train", 0, exclude=exclude)
    assert not {(int(y), m) for y, m in zip(labels, motions)} & exclude
    assert {m for m in motions} == set(MOTIONS)  # every motion is still trained on
    _, plain_labels, _ = render_moving_digits(400, 4, 24, 10, "train", 0)
    assert np.array_equal(labels, plain_labels)  # the same digits, drawn before any motion


def test_items_carry_captions_of_their_own_digit_and_the_train_split_holds_no_held_out_pair(tmp_path):
    kwargs = dict(root=str(tmp_path / "md"), num_frames=4, size=24, num_clips_train=60, num_clips_test=40,
                  cache_dir=str(tmp_path / "cache"))  # fmt: skip
    train = MovingDigitsTextDataset(split="train", **kwargs)
    test = MovingDigitsTextDataset(split="test", **kwargs)
    assert train.held_out_pairs == parse_pairs(HELD_OUT_PAIRS) and len(train.captions) == 60
    pairs = set()
    for ds in (train, test):
        for i in range(len(ds)):
            item = ds[i]
            digit, motion = parse_caption(item["caption"])
            assert digit == item["y"] and item["caption"] == ds.captions[i]
            pairs.add((ds.split, digit, motion))
    assert not {(d, m) for split, d, m in pairs if split == "train"} & train.held_out_pairs
    # the captions' motions are the rendered ones: the clips on disk came from the same draws
    _, labels, motions = render_moving_digits(40, 4, 24, 10, "test", 0)
    assert sorted(parse_caption(c) for c in test.captions) == sorted(zip(labels.tolist(), motions))
    assert "moving_digits" in train.cache_key() and train.cache_key()["moving_digits"]["captions"] is True
