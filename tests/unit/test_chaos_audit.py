"""The chaos auditor's checks of the fleets (SPEC §12) find what they are meant to find."""

from __future__ import annotations

import json

from chaos.audit import Audit, Disruptions, _check_deliveries, _check_workers


def receiver_log(tmp_path, *lines):
    path = tmp_path / "receiver.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_clean_deliveries_pass(tmp_path):
    log = receiver_log(
        tmp_path,
        {"key": "a", "answer": "hang:2", "at": 10.0},
        {"key": "a", "answer": "ok", "at": 12.5},  # after the daemon gave up (1 s) and waited
        {"event": "completed", "id": "a"},
    )
    result = Audit()
    _check_deliveries(result, {"a": "completed"}, log)
    assert result.violations == []


def delivery(key, answer, at, pid=101):
    return {"key": key, "answer": answer, "at": at, "headers": {"user-agent": f"stuck-runs (host; pid {pid})"}}


# The violation names the retry and, for a report read without the trial's files, its deliveries.
TWICE = "retries delivered twice at once: ['a']; a's deliveries (at, answer, pid): [(10.0, 'hang:2', 101), (10.4, 'ok', 102)]"


def test_two_deliveries_of_one_retry_at_once_are_a_violation(tmp_path):
    log = receiver_log(tmp_path, delivery("a", "hang:2", 10.0), delivery("a", "ok", 10.4, pid=102))
    result = Audit()
    _check_deliveries(result, {"a": "completed"}, log)
    assert result.violations == [TWICE]


def test_a_second_delivery_after_the_first_ones_process_was_killed_is_no_violation(tmp_path):
    log = receiver_log(tmp_path, delivery("a", "hang:2", 10.0), delivery("a", "ok", 10.4, pid=102))
    killed, other = Audit(), Audit()
    _check_deliveries(killed, {"a": "completed"}, log, disruptions=Disruptions(killed=frozenset({101})))
    _check_deliveries(other, {"a": "completed"}, log, disruptions=Disruptions(killed=frozenset({102})))
    assert killed.violations == [] and other.violations == [TWICE]


def test_a_second_delivery_across_a_database_restart_is_no_violation(tmp_path):
    log = receiver_log(tmp_path, delivery("a", "hang:2", 10.0), delivery("a", "ok", 10.9, pid=102))
    during, before = Audit(), Audit()
    _check_deliveries(during, {"a": "completed"}, log, disruptions=Disruptions(restarts=((10.2, 10.8),)))
    _check_deliveries(before, {"a": "completed"}, log, disruptions=Disruptions(restarts=((5.0, 6.0),)))
    assert during.violations == [] and before.violations == [TWICE.replace("10.4", "10.9")]


def test_a_retry_the_fleet_took_delivered_again_while_its_process_lived_is_a_violation(tmp_path):
    log = receiver_log(tmp_path, delivery("a", "ok", 10.0), delivery("a", "ok", 30.0), delivery("b", "ok", 10.0))
    result = Audit()
    _check_deliveries(result, {"a": "completed", "b": "completed"}, log)
    assert result.violations == [
        "retries the fleet took delivered again, their process alive: ['a'];"
        " a's deliveries (at, answer, pid): [(10.0, 'ok', 101), (30.0, 'ok', 101)]"
    ]
    # Its process killed before the confirm: the lease ran out and another delivered it, as it must.
    killed = Audit()
    _check_deliveries(
        killed, {"a": "completed", "b": "completed"}, log, disruptions=Disruptions(killed=frozenset({101}))
    )
    assert killed.violations == []


def test_an_acknowledged_delivery_that_never_ended_is_lost(tmp_path):
    log = receiver_log(tmp_path, {"key": "a", "answer": "ok", "at": 1.0}, {"key": "b", "answer": "503", "at": 1.0})
    result = Audit()
    _check_deliveries(result, {"a": "running", "b": "pending_retry"}, log)
    assert result.violations == ["acknowledged deliveries lost (not ended): [('a', 'running')]"]


def test_a_completion_the_receiver_wrote_then_overwritten_is_a_violation(tmp_path):
    log = receiver_log(tmp_path, {"key": "a", "answer": "ok", "at": 1.0}, {"event": "completed", "id": "a"})
    result = Audit()
    _check_deliveries(result, {"a": "failed"}, log)
    assert result.violations == ["completions the receiver's fleet wrote were overwritten: ['a']"]


def test_workers_taking_one_retry_twice_or_losing_one_are_violations(tmp_path):
    first, second = tmp_path / "w0.log", tmp_path / "w1.log"
    first.write_text("claimed a 1\nended a completed\nclaimed b 1\n")
    second.write_text("claimed a 2\nclaimed c 2\nended c completed\n")
    result = Audit()
    _check_workers(result, {"a": "completed", "b": "running", "c": "failed"}, [first, second])
    assert result.violations == [
        "retries taken by two workers: ['a']",
        "retries workers took were lost (not ended): [('b', 'running')]",
        "completions a worker wrote were overwritten: ['c']",
    ]


def answered(n, at):
    return {"event": "answered", "n": n, "at": at}


def test_a_retry_whose_2xx_never_went_out_in_full_may_be_delivered_again(tmp_path):
    """The receiver logged its 2xx, then died before the answer was out (the monkey's kill -9): the
    daemon learnt nothing, put the retry back and delivered it again with its key, as §12 has it.
    Only a 2xx that went out in full, within the daemon's timeout of its arrival, was taken."""
    first, again = {**delivery("a", "ok", 10.0), "n": "7-1"}, {**delivery("a", "ok", 17.0), "n": "8-0"}
    cut = receiver_log(tmp_path, first, again, answered("8-0", 17.01))
    result = Audit()
    _check_deliveries(result, {"a": "completed"}, cut)
    assert result.violations == []
    late = receiver_log(tmp_path, first, answered("7-1", 11.5), again, answered("8-0", 17.01))
    result = Audit()
    _check_deliveries(result, {"a": "completed"}, late)
    assert result.violations == []  # out in full after the daemon's 1 s: it had given up
    taken = receiver_log(tmp_path, first, answered("7-1", 10.01), again, answered("8-0", 17.01))
    result = Audit()
    _check_deliveries(result, {"a": "completed"}, taken)
    assert result.violations == [
        "retries the fleet took delivered again, their process alive: ['a'];"
        " a's deliveries (at, answer, pid): [(10.0, 'ok', 101), (17.0, 'ok', 101)]"
    ]
