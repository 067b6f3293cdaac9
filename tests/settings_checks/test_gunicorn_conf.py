"""config/gunicorn.conf.py: the settings gunicorn reads, and its hook."""

import gc
import runpy
from pathlib import Path

CONF = Path(__file__).resolve().parents[2] / "config" / "gunicorn.conf.py"


def test_a_worker_freezes_what_it_built_at_start():
    conf = runpy.run_path(str(CONF))
    assert gc.get_freeze_count() == 0
    try:
        conf["post_worker_init"](worker=None)
        assert gc.get_freeze_count() > 0, "startup objects left out of later collections"
    finally:
        gc.unfreeze()
    assert conf["worker_class"] == "gthread"
