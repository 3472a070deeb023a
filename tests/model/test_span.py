"""SpanRunner in one process: the stage's state machine, exactness of split spans, bad input."""

import pytest
import torch

from bloombee_nb.errors import SessionLengthError, SessionLimitError, ShapeMismatchError, UnknownSessionError
from bloombee_nb.model.span import SpanRunner
from tests.conftest import padded_batch
from tests.helpers import positions


@pytest.fixture(scope="module")
def spans(checkpoints):
    p = checkpoints["llama"]
    return [SpanRunner(p, 0, 2), SpanRunner(p, 2, 5)]


def run(spans, sid, h, pos, mask):
    for s in spans:
        h = s.forward(sid, h, pos, mask)
    return h


def test_split_spans_equal_full_model_through_prefill_crop_and_decode(spans, reference):
    ref = reference["llama"]
    ids, mask = padded_batch([6, 3, 5])
    for s in spans:
        s.open("a", 3, 32)
    emb = ref.model.embed_tokens
    h = run(spans, "a", emb(ids), positions(mask), mask)
    want = ref.model(ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
    torch.testing.assert_close(ref.model.norm(h), want, rtol=0, atol=0)
    # roll back 2 positions, then re-run them: identical to never having rolled back
    for s in spans:
        s.rollback("a", ids.shape[1] - 2)
    h2 = run(spans, "a", emb(ids[:, -2:]), positions(mask)[:, -2:], mask[:, -2:])
    torch.testing.assert_close(ref.model.norm(h2), want[:, -2:], rtol=1e-6, atol=1e-6)
    for s in spans:
        s.close("a")


def test_bad_input_leaves_other_sessions_untouched(spans, reference):
    s0 = spans[0]
    ids, mask = padded_batch([4])
    h = reference["llama"].model.embed_tokens(ids)
    s0.open("good", 1, 8)
    s0.open("victim", 1, 8)
    good_out = s0.forward("good", h, positions(mask), mask)
    bad = [
        (h.to(torch.float16), ShapeMismatchError, "float32"),
        (h[..., :10], ShapeMismatchError, "hidden=64"),
        (torch.cat([h, h]), ShapeMismatchError, "batch=1"),
        (h.new_zeros(1, 0, 64), ShapeMismatchError, "tokens>=1"),
    ]
    for x, err, match in bad:
        with pytest.raises(err, match=match):
            s0.forward("victim", x, positions(mask)[:, : x.shape[1]], mask[:, : x.shape[1]])
    with pytest.raises(ShapeMismatchError, match="position_ids"):
        s0.forward("victim", h, positions(mask).int(), mask)
    with pytest.raises(UnknownSessionError, match="open a new inference session"):
        s0.forward("nobody", h, positions(mask), mask)
    s0.forward("victim", h, positions(mask), mask)  # 4 of 8 positions used
    with pytest.raises(SessionLengthError, match="max_length=8"):
        s0.forward("victim", torch.cat([h, h], 1), positions(mask).repeat(1, 2), mask.repeat(1, 2))
    assert s0.sessions["victim"].length == 4  # the failed step changed nothing
    # the other session is unaffected: a second identical session gives the same output
    s0.open("again", 1, 8)
    torch.testing.assert_close(s0.forward("again", h, positions(mask), mask), good_out, rtol=0, atol=0)
    for sid in ("good", "victim", "again"):
        s0.close(sid)
    with pytest.raises(UnknownSessionError):
        s0.forward("good", h, positions(mask), mask)


def test_memory_reservation_and_session_limits(checkpoints):
    s = SpanRunner(checkpoints["llama"], 0, 1, max_kv_bytes=64 * 1024, max_sessions=2)
    per_token = s.kv_bytes_per_token  # 2 (K,V) * 1 layer * 2 kv heads * 16 dims * 4 bytes = 256
    assert per_token == 256
    s.open("a", 2, 64)  # 32 KiB
    with pytest.raises(SessionLimitError, match="cannot reserve"):
        s.open("b", 2, 128)  # 64 KiB more does not fit
    s.open("b", 1, 64)
    with pytest.raises(SessionLimitError, match="already serve 2 sessions"):
        s.open("c", 1, 1)
    with pytest.raises(SessionLimitError, match="already open"):
        s.open("a", 1, 1)
    s.close("a")
    s.open("c", 2, 64)
    assert s.info()["reserved_kv_bytes"] == 48 * 1024
