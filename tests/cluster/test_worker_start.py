"""An embedded cluster's workers start from the forkserver that imported torch once (``bb.connect()``'s
default), unless the user chose Dask's start method themselves."""

import dask

import bloombee_nb as bb


def _imported():
    import sys

    return {"torch": "torch" in sys.modules}


def test_embedded_workers_find_torch_imported_before_any_span_loads():
    with bb.connect(n_workers=2) as cluster:
        seen = cluster.client.run(_imported)
    assert len(seen) == 2 and all(s["torch"] for s in seen.values()), seen


def test_a_start_method_the_user_configured_wins():
    with dask.config.set({"distributed.worker.multiprocessing-method": "spawn"}):
        with bb.connect(n_workers=1) as cluster:
            seen = cluster.client.run(_imported)
    assert [s["torch"] for s in seen.values()] == [False], seen  # spawned: nothing imported torch yet
