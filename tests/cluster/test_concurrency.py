"""Many users at once on one cluster: every session's greedy output is exact, and closing them frees
every stage's KV reservation (no leaked caches)."""

from concurrent.futures import ThreadPoolExecutor

import torch

from tests.conftest import padded_batch
from tests.helpers import distributed


def test_concurrent_sessions_are_exact_and_leave_nothing_behind(cluster, checkpoints, reference):
    with distributed(checkpoints["llama"], cluster, spans=[(0, 2), (2, 4), (4, 5)]) as model:
        jobs = [padded_batch([n], seed=n) for n in (3, 9, 14, 5, 21, 7, 11, 2)]
        want = [reference["llama"].generate(ids, attention_mask=m, max_new_tokens=6 + i % 3, do_sample=False,
                                            pad_token_id=0) for i, (ids, m) in enumerate(jobs)]

        def run(i):
            ids, m = jobs[i]
            return model.generate(ids, attention_mask=m, max_new_tokens=6 + i % 3, do_sample=False, pad_token_id=0)

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(run, range(len(jobs))))
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        for info in model.chain.info():
            assert info["sessions"] == 0 and info["reserved_kv_bytes"] == 0, info
