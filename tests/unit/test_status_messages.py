"""What `status` and `doctor` say about running runs that cannot be timed."""

from jobs.status import untimed_message


def test_untimed_runs_are_counted_in_plain_words():
    assert untimed_message(1) == (
        "1 running run has no started_at (nor heartbeat): the checker can never find it stuck"
    )
    assert untimed_message(3).startswith("3 running runs have no started_at")
