"""What `status` and `doctor` say about running runs that cannot be timed: a count that agrees
with its words, for any count, and the very line the README shows."""

import re

from hypothesis import example, given
from hypothesis import strategies as st

from jobs.status import untimed_message
from tests.conftest import REPO


@given(st.integers(min_value=1, max_value=10**7))
@example(1)
@example(2)
def test_the_count_leads_and_the_words_agree_with_it(count):
    message = untimed_message(count)
    one = count == 1
    assert message.startswith(f"{count} running {'run has' if one else 'runs have'} no started_at (nor heartbeat)")
    assert message.endswith(f"the checker can never find {'it' if one else 'them'} stuck")  # why it matters


def test_the_readme_shows_what_doctor_says():
    shown = re.findall(r"✗ untimed runs: ((\d+) running .*?) → ", (REPO / "README.md").read_text())
    assert shown  # the README's sample of `doctor` has the line
    for line, count in shown:
        assert line == untimed_message(int(count))
