"""The demo model's world: captions in the issue's words, exact ground truth, a held-out split training never sees."""

from __future__ import annotations

import random

import pytest

from darkroom.demo.reading import position_of, read_picture
from darkroom.demo.world import COLOURS, POSITIONS, SHAPES, Scene, held_out_scenes, is_held_out, vocabulary


def scene(**given: object) -> Scene:
    fields: dict[str, object] = {
        "shape": "circle",
        "colour": "red",
        "background": "blue",
        "count": 1,
        "size": "small",
        "size_said": False,
        "position": None,
        "centres": ((32.0, 32.0),),
    }
    return Scene(**{**fields, **given})  # type: ignore[arg-type]


def test_captions_read_like_the_issue_s_examples() -> None:
    two = scene(count=2, size_said=True, centres=((12.0, 12.0), (52.0, 52.0)))
    assert two.caption == "two small red circles on a blue background"
    star = scene(shape="star", colour="yellow", background="black", position="top left", size="large")
    assert star.caption == "a yellow star in the top left corner on a black background"
    assert scene(colour="orange", shape="ring", background="orange").caption.startswith("an orange ring on an orange")


def test_every_rendered_scene_reads_back_as_its_ground_truth() -> None:
    """The evaluation reads pixels; on the world's own pictures it must be exact, or its scores mean nothing."""
    rng = random.Random(7)
    for _ in range(150):
        truth = Scene.sample(rng)
        got = read_picture(truth.render())
        assert (got.background, got.colour, got.count) == (truth.background, truth.colour, truth.count), truth.caption
        if truth.position is not None:
            assert got.position == truth.position, truth.caption


def test_scenes_are_a_pure_function_of_the_seed() -> None:
    first = [Scene.sample(random.Random(3)) for _ in range(3)]
    assert first == [Scene.sample(random.Random(3)) for _ in range(3)]
    assert first[0].render().tobytes() == first[1].render().tobytes()


def test_held_out_combinations_never_appear_in_training() -> None:
    rng = random.Random(11)
    training = {(s.colour, s.shape, s.background) for s in (Scene.sample(rng) for _ in range(3000))}
    held = {(s.colour, s.shape, s.background) for s in held_out_scenes(200)}
    assert held and not training & held
    assert all(is_held_out(*combo) for combo in held)
    assert {c for c, _, _ in training} == set(COLOURS) == {b for _, _, b in training}
    assert {s for _, s, _ in training} == set(SHAPES)
    assert held_out_scenes(20) == held_out_scenes(20)  # the same evaluation set every time


@pytest.mark.parametrize(("fx", "fy", "name"), [(0.5, 0.5, "centre"), (0.2, 0.8, "bottom left"), (0.8, 0.5, "right")])
def test_position_bins(fx: float, fy: float, name: str) -> None:
    assert name in POSITIONS and position_of(fx, fy) == name


def test_the_demo_tokenizer_has_one_token_per_caption_word() -> None:
    from darkroom.demo.model import build_tokenizer

    tokenizer = build_tokenizer()
    for word in vocabulary():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = tokenizer("a zebra", add_special_tokens=False).input_ids  # unknown words still tokenize, letter by letter
    assert len(ids) > 2 and tokenizer.unk_token_id not in ids


def test_placed_scenes_are_one_shape_at_a_named_position_and_leave_the_default_draws_alone() -> None:
    rng = random.Random(5)
    placed = [Scene.sample(rng, placed=True) for _ in range(60)]
    assert all(s.count == 1 and s.position is not None for s in placed)
    assert {s.position for s in placed} == set(POSITIONS)
    assert not any(is_held_out(s.colour, s.shape, s.background) for s in placed)
    assert Scene.sample(random.Random(9), placed=False) == Scene.sample(random.Random(9))
