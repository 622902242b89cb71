"""The systemd units: the single `stuck-runs.service` and the per-table template
`stuck-runs@.service` (SPEC §11) both pass `systemd-analyze verify` and `security`, and the
template is the single unit, directive for directive, but for what names its instance."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

ANALYZE = "/usr/bin/systemd-analyze"
SINGLE = REPO / "systemd" / "stuck-runs.service"
TEMPLATE = REPO / "systemd" / "stuck-runs@.service"
WEB = REPO / "systemd" / "stuck-runs-web.service"
UNITS = pytest.mark.parametrize("unit", [SINGLE, TEMPLATE, WEB], ids=lambda path: path.name)
# What the web unit may say otherwise than the daemon's: what it is, what it runs, its own
# settings, and no watchdog (serve has no scheduler loop to feed one).
WEB_OWN = {
    ("Unit", "Description"),
    ("Service", "EnvironmentFile"),
    ("Service", "ExecStart"),
    ("Service", "WatchdogSec"),
}
# The only directives in which an instance differs from the single unit.
PER_INSTANCE = {("Unit", "Description"), ("Service", "EnvironmentFile")}
# Host paths a unit writes or claims: a fixed name would be shared by every instance.
HOST_STATE = ("PIDFile", "RuntimeDirectory", "StateDirectory", "CacheDirectory", "LogsDirectory", "ReadWritePaths")
MAX_EXPOSURE = 1.5

Directive = tuple[str, str, str]  # (section, key, value), in file order


@pytest.fixture
def analyze() -> str:
    if not os.path.exists(ANALYZE):
        pytest.skip("systemd-analyze is not installed here")
    return ANALYZE


def directives(unit: Path) -> list[Directive]:
    """Every `Key=value` of `unit` in order, repeated keys kept (SystemCallFilter= is one list
    built line by line); comments and blank lines dropped."""
    found: list[Directive] = []
    section = ""
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{unit.name}: continuation lines are not parsed here: {line}"
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def values(unit: Path, section: str, key: str) -> list[str]:
    return [value for sec, k, value in directives(unit) if (sec, k) == (section, key)]


def verify_problems(analyze: str, unit: Path) -> list[str]:
    """What `systemd-analyze verify` objects to in `unit`, less the one thing a test host cannot
    satisfy: the ExecStart binary of an installation (/opt/stuck-runs) being absent."""
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    binary = next(value for _, key, value in directives(unit) if key == "ExecStart").split()[0]
    absent = re.compile(rf"\S+\.service: Command {re.escape(binary)} is not executable: No such file or directory")
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    problems = [line for line in lines if os.path.exists(binary) or not absent.fullmatch(line)]
    if result.returncode != 0 and len(problems) == len(lines):
        problems.append(f"systemd-analyze verify exited {result.returncode}")
    return problems


def exposure(analyze: str, unit: Path) -> float:
    result = subprocess.run(
        [analyze, "security", "--offline=true", f"--threshold={MAX_EXPOSURE * 10:.0f}", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    overall = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert overall, result.stdout[-2000:]
    return float(overall.group(1))


@UNITS
def test_the_unit_passes_systemd_analyze_verify(analyze, unit):
    assert verify_problems(analyze, unit) == []


@pytest.mark.parametrize(
    "breakage",
    [
        ("NoNewPrivileges=yes", "NoNewPrivilege=yes"),
        ("Type=notify", "Type=notifyy"),
        ("WatchdogSec=60s", "WatchdogSec=a minute"),
        ("[Service]", "[Servic]"),
    ],
    ids=["misspelled directive", "bad value", "bad duration", "misspelled section"],
)
def test_verify_catches_a_broken_unit(analyze, tmp_path, breakage):
    """The filter for the absent binary lets nothing else through."""
    good, bad = breakage
    broken = tmp_path / TEMPLATE.name
    text = TEMPLATE.read_text()
    assert good in text
    broken.write_text(text.replace(good, bad, 1))
    assert verify_problems(analyze, broken) != []


@UNITS
def test_the_unit_is_hardened_to_an_exposure_of_at_most_1_5(analyze, unit):
    assert exposure(analyze, unit) <= MAX_EXPOSURE


def test_the_template_reads_the_env_file_of_its_instance():
    assert values(TEMPLATE, "Service", "EnvironmentFile") == ["/etc/stuck-runs/%i.env"]
    assert "%i" in values(TEMPLATE, "Unit", "Description")[0]


def test_the_template_is_the_single_unit_but_for_its_instance():
    """Hardening, Type=notify, the watchdog, timeouts and restarts cannot drift apart."""

    def shared(unit: Path) -> list[Directive]:
        return [d for d in directives(unit) if d[:2] not in PER_INSTANCE]

    assert shared(TEMPLATE) == shared(SINGLE)
    for section, key in PER_INSTANCE:
        assert len(values(SINGLE, section, key)) == len(values(TEMPLATE, section, key)) == 1


def test_instances_share_no_host_state():
    for _, key, value in directives(TEMPLATE):
        assert key not in HOST_STATE or "%i" in value, f"every instance would share {key}={value}"


def test_the_web_unit_is_hardened_as_the_daemon_s_is():
    def shared(unit: Path) -> list[Directive]:
        return [d for d in directives(unit) if d[:2] not in WEB_OWN]

    assert shared(WEB) == shared(SINGLE)
    assert values(WEB, "Service", "ExecStart") == ["/opt/stuck-runs/.venv/bin/stuck-runs serve"]
    assert values(WEB, "Service", "WatchdogSec") == []
