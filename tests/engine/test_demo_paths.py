"""Demo nodes write only inside KEEL_DATA_DIR."""

import os

import pytest

from workflows.definitions.registry import PermanentError
from workflows.nodes.demo import _data_path


@pytest.mark.parametrize(
    "given", ["", ".", "/etc/passwd", "../outside.csv", "a/../../outside.csv", "link/escape.csv"]
)
def test_a_path_outside_the_data_dir_is_refused(given, settings, tmp_path):
    settings.KEEL_DATA_DIR = tmp_path / "data"
    settings.KEEL_DATA_DIR.mkdir()
    os.symlink(tmp_path, settings.KEEL_DATA_DIR / "link")  # leads out of it

    with pytest.raises(PermanentError, match="must name a file inside KEEL_DATA_DIR"):
        _data_path(given)


def test_a_path_inside_is_given_under_the_data_dir(settings, tmp_path):
    settings.KEEL_DATA_DIR = tmp_path / "data"

    assert _data_path("inbox/orders.csv") == tmp_path / "data" / "inbox" / "orders.csv"
