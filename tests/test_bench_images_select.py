"""`bench images objectives=[...]` selects which objective presets run (names checked before any training)."""

import pytest

from shortcut_policy import cli
from shortcut_policy.bench.images import DEFAULTS, image_selection


def test_selection_order_unknown_and_empty():
    s = {**DEFAULTS, "select": ["meanflow", "shortcut", "meanflow"], "num_steps": 77}
    assert [n for n, _ in image_selection(s)] == ["meanflow", "shortcut"]
    cons = dict(image_selection({**s, "select": "consistency"}))["consistency"]
    assert cons["total_steps"] == 77  # the consistency schedule spans the bench's budget
    with pytest.raises(ValueError, match="unknown objective.*valid"):
        image_selection({**s, "select": ["shortcut", "nope"]})
    with pytest.raises(ValueError, match="empty"):
        image_selection({**s, "select": []})


def test_cli_shorthand_maps_objectives_to_images_select():
    assert cli.bench_shorthand("images", ["objectives=[shortcut,meanflow]"]) == [
        "what=images",
        "images.select=[shortcut,meanflow]",
    ]
