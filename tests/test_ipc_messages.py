"""The ipc backend's error messages, from the EpError records its kernels write (no GPU needed:
the records are made up here). Each must name the rank at fault and what went wrong."""
from moe_ext import _ipc


def _backend(rank=0, ranks=(4, 5)):
    b = object.__new__(_ipc.IpcBackend)  # no buffers, no stream: only what _message reads
    b.ranks, b.rank, b._timeout = list(ranks), rank, 5.0
    return b


def _mismatch(field, value, mine):
    return _ipc._MISMATCH, 1, _ipc._FIELDS.index(field), 0, value, mine


def test_timeout_names_the_missing_rank_and_phase():
    msg = _backend()._message(_ipc._TIMEOUT, 1, 0, 2, 0, 0)
    assert "timed out after 5 s in the token phase waiting for global rank 5 (rank 1 of the group [4, 5])" in msg
    assert "close()" in msg


def test_disagreement_names_the_field_and_both_values():
    msg = _backend()._message(*_mismatch("row_bytes", 256, 128))
    assert "disagree on row_bytes: global rank 5 (rank 1 of the group [4, 5]) has 256, global rank 4 128" in msg


def test_kinds_of_call():
    b = _backend()
    peer = "global rank 5 (rank 1 of the group [4, 5])"
    # a peer announced invalid inputs, while this rank made a real call or asked to grow
    for mine in (_ipc._REAL, _ipc._GROW):
        assert f"{peer} passed invalid inputs" in b._message(*_mismatch("bad_input", _ipc._BAD_INPUT, mine))
    # one rank asked to grow the buffers, the other made a call that fits them
    msg = b._message(*_mismatch("bad_input", _ipc._GROW, _ipc._REAL))
    assert f"{peer} had to grow the buffers for this call while this rank did not" in msg
    msg = b._message(*_mismatch("bad_input", _ipc._REAL, _ipc._GROW))
    assert f"this rank had to grow the buffers for this call while {peer} did not" in msg
    assert "max_tokens, hidden size" in msg


def test_out_of_step():
    assert "another dispatch/combine call" in _backend()._message(*_mismatch("seq", 9, 8))
