"""Batch handlers without a server: their settings, how a file's batch handler is found, the list check."""

from __future__ import annotations

import pytest
from kre_helpers import services_settings

from kre_runner.config import ConfigError
from kre_runner.context import Context
from kre_runner.handler import load_user_code
from kre_runner.node.batching import _check, current_tracking_ids, in_batch_handler


def test_batch_settings_default_and_parse():
    assert (services_settings().batch_size, services_settings().batch_wait) == (32, 0.005)
    settings = services_settings(KRT_BATCH_SIZE="64", KRT_BATCH_WAIT_MS="2.5")
    assert (settings.batch_size, settings.batch_wait) == (64, 0.0025)
    assert services_settings(KRT_BATCH_WAIT_MS="0").batch_wait == 0


@pytest.mark.parametrize(("name", "value"), [("KRT_BATCH_SIZE", "0"), ("KRT_BATCH_SIZE", "many"),
                                             ("KRT_BATCH_WAIT_MS", "-1"), ("KRT_BATCH_WAIT_MS", "inf")])
def test_bad_batch_settings_are_named_with_an_example(name, value):
    with pytest.raises(ConfigError) as caught:
        services_settings(**{name: value})
    [problem] = caught.value.problems
    assert problem.startswith(f"{name}={value!r} is invalid") and f"e.g. {name}=" in problem


def test_a_file_with_handler_batch_is_a_batch_handler(tmp_path):
    (tmp_path / "model.py").write_text("def handler(ctx, data): ...\ndef handler_batch(ctx, batch): ...\n")
    code = load_user_code(tmp_path, "model.py")
    assert code.batch and code.handler.__name__ == "handler_batch"
    plain = load_user_code(tmp_path, "model.py:handler")  # named explicitly: the per-message handler
    assert not plain.batch and plain.handler.__name__ == "handler"


def test_the_decorator_marks_a_named_function_as_a_batch_handler(tmp_path):
    (tmp_path / "model.py").write_text("from kre_runner import batch_handler\n\n"
                                       "@batch_handler\nasync def predict(ctx, batch): ...\n"
                                       "def handler(ctx, data): ...\n")
    code = load_user_code(tmp_path, "model.py:predict")
    assert code.batch and code.handler_is_async
    assert not load_user_code(tmp_path, "model.py").batch  # no handler_batch: the plain handler


def test_the_list_check_says_what_was_wrong():
    assert _check([1, 2], 2) is None and _check((1, 2), 2) is None
    assert _check([1], 2) == "batch handler returned 1 results for 2 inputs"
    assert _check(None, 2) == "batch handler returned NoneType; expected a list with one result per input (2)"


def test_batch_tracking_ids_outside_a_batch_handler_raise():
    assert not in_batch_handler()
    with pytest.raises(RuntimeError, match="within a batch handler"):
        current_tracking_ids()
    with pytest.raises(RuntimeError, match="only available while a batch is being handled"):
        Context(base_path=".", logger=None).batch_tracking_ids()  # type: ignore[arg-type]


async def test_each_output_of_a_batch_gets_its_own_elapsed_time_point_spanning_the_call(tmp_path):
    import logging
    from types import SimpleNamespace

    from kre_helpers import Response, request_envelope

    from kre_runner.node.batching import Batcher
    from kre_runner.node.credits import Credits
    from kre_runner.node.envelope import TrackingClock
    from kre_runner.node.outcome import Outcomes
    from kre_runner.node.settlement import Job

    (tmp_path / "model.py").write_text("async def handler_batch(ctx, batch):\n"
                                       "    return [RESULTS.pop(0) for _ in batch]\n")
    code = load_user_code(tmp_path, "model.py")
    module = code.handler.__globals__
    module["RESULTS"] = [Response(greeting="a"), ValueError("bad b"), None]
    settings = services_settings()
    log = logging.getLogger("test")
    clock = TrackingClock()
    points: list[tuple[str, float, float]] = []

    class _Settlement:  # only its set of held jobs is used by _call
        jobs: set[Job] = set()  # noqa: RUF012

    # The pipeline's steps a batch call uses: its clock, and the elapsed point it records per output.
    pipeline = SimpleNamespace(clock=clock, open=None, publish=None, drop_reference=None, internal_error=None,
                               record=lambda envelope, start, end: points.append((envelope.tracking_id, start, end)))
    batcher = Batcher(settings, code, Context(base_path=tmp_path, logger=log), log, pipeline=pipeline,  # type: ignore[arg-type]
                      outcomes=Outcomes(settings, clock, log), settlement=_Settlement(),  # type: ignore[arg-type]
                      credits=Credits(8), pull=None)  # type: ignore[arg-type]
    batch = []
    for seq, name in enumerate("abc", 1):
        job = Job(f"$JS.ACK.s.c.1.{seq}.{seq}.0.0", f"node:s:{seq}", 0.0)
        job.envelope = request_envelope(name, tracking_id=f"t-{name}")
        batch.append(job)
    outcomes = await batcher._call(batch)
    assert [tracking_id for tracking_id, _, _ in points] == ["t-a", "t-c"]  # not for the failed input
    assert len({(start, end) for _, start, end in points}) == 1  # each spans the one batch call
    assert outcomes[0] is not None and outcomes[0][0] == settings.output_subject
    assert outcomes[1] is not None and outcomes[1][0] == settings.output_subject  # errors: no entrypoint set
    assert outcomes[2] is None  # filtered
