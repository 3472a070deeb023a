"""Running a tutorial executes the whole notebook with a real kernel (minutes each): those tests are
``slow``; the checks of the committed files stay in the quick loop. (A hook rather than a marker in
test_tutorials.py, which another change owns right now; it may move there.)"""

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith("tests/tutorials/") and item.originalname == "test_runs_top_to_bottom":
            item.add_marker(pytest.mark.slow)
