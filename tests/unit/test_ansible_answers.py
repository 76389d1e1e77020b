"""Reading an ad hoc run's answers (opsbook.engines.ansible.read_answers, what `raw` returns), from the
real output of Ansible's json callback on this machine (localhost, local connection)."""

from __future__ import annotations

import subprocess

import pytest

from opsbook.core.paths import ROOT
from opsbook.engines.ansible import ansible_env, read_answers


def _adhoc(command: str, **extra_env: str) -> str:
    env = {**ansible_env(), "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1", "ANSIBLE_STDOUT_CALLBACK": "json", **extra_env}
    return subprocess.run(["ansible", "-i", "localhost,", "localhost", "-c", "local", "-m", "ansible.builtin.raw",
                           "-a", command], cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                          timeout=120).stdout


@pytest.mark.parametrize("callbacks", ["", "ansible.posix.profile_tasks"], ids=["plain", "profile_tasks-enabled"])
def test_each_host_gets_its_exit_code_and_output_whatever_callback_the_operator_enabled(callbacks):
    stdout = _adhoc("echo answered; exit 3", **({"ANSIBLE_CALLBACKS_ENABLED": callbacks} if callbacks else {}))
    if callbacks:
        assert "TASKS RECAP" in stdout[stdout.rindex("}"):], stdout[-500:]   # profile_tasks' recap follows the JSON
    answers = read_answers(stdout, ["localhost", "elsewhere"])
    assert answers["localhost"] is not None, stdout[-2000:]
    assert answers["localhost"][0] == 3
    assert answers["localhost"][1].strip() == "answered"
    assert answers["elsewhere"] is None


def test_output_with_no_json_is_no_answer():
    assert read_answers("ERROR! the inventory could not be parsed\n", ["app1"]) == {"app1": None}
