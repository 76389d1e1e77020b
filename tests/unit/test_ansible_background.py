"""A playbook started beside other work (`ansible.start_playbook`), as a release stages beside
preflight: its output is held until it is waited for, a failure names the task, and leaving the
block early (an error, an interrupt) stops it. Real ansible-playbook against localhost."""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest

from opsbook.core.inventory import Env
from opsbook.engines import ansible


@pytest.fixture
def local_env(tmp_path, monkeypatch):
    inv = tmp_path / "inv"
    (inv / "group_vars" / "all").mkdir(parents=True)
    (inv / "hosts.yml").write_text("all:\n  hosts:\n    here:\n      ansible_connection: local\n"
                                  "      ansible_python_interpreter: '{{ ansible_playbook_python }}'\n")
    (inv / "group_vars" / "all" / "main.yml").write_text("opsbook_env_kind: lab\n")
    books = tmp_path / "playbooks"
    books.mkdir()
    monkeypatch.setattr(ansible, "PLAYBOOKS", books)
    return Env("bgtest", path=inv), books, tmp_path


def _book(books, name: str, tasks: str) -> str:
    (books / name).write_text(f"- name: Test play\n  hosts: all\n  gather_facts: false\n  tasks:\n{tasks}")
    return name


def test_output_is_held_until_waited_for_and_shown_then(local_env, capsys):
    env, books, tmp = local_env
    book = _book(books, "ok.yml", "    - name: Leave a mark\n      ansible.builtin.command: touch "
                                  f"{tmp / 'mark'}\n      args:\n        creates: {tmp / 'mark'}\n")
    with ansible.start_playbook(env, book, what="marking") as run:
        deadline = time.monotonic() + 60
        while run.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "Leave a mark" not in capsys.readouterr().out   # nothing interleaves with other work
        run.wait()
    assert "TASK [Leave a mark]" in capsys.readouterr().out
    assert (tmp / "mark").exists()
    assert run.seconds is not None
    assert run.seconds > 0


def test_a_failure_names_the_task_and_host(local_env):
    env, books, _tmp = local_env
    book = _book(books, "fail.yml", "    - name: Refuse on purpose\n      ansible.builtin.fail:\n"
                                    "        msg: no thanks\n")
    with pytest.raises(ansible.PlaybookFailed, match=r"(?s)staging failed on bgtest.*Refuse on purpose.*here"), \
            ansible.start_playbook(env, book, what="staging") as run:
        run.wait()


def test_leaving_the_block_early_stops_it(local_env):
    env, books, tmp = local_env
    # A sleep no other process on the machine runs (pgrep below looks at every process).
    sleep = f"sleep 300.{uuid.uuid4().int % 10**9:09d}"
    book = _book(books, "slow.yml", f"    - name: Sleep\n      ansible.builtin.command: {sleep}\n"
                                    f"      changed_when: false\n    - name: Never reached\n"
                                    f"      ansible.builtin.command: touch {tmp / 'late'}\n"
                                    f"      args:\n        creates: {tmp / 'late'}\n")
    started: list[ansible.Background] = []

    def interrupted_meanwhile() -> None:
        with ansible.start_playbook(env, book, what="sleeping") as run:
            started.append(run)
            time.sleep(2)
            raise KeyboardInterrupt   # as a Ctrl-C during preflight would

    with pytest.raises(KeyboardInterrupt):
        interrupted_meanwhile()
    run = started[0]
    assert run.proc.poll() is not None, "ansible-playbook outlived the block"
    time.sleep(0.5)
    assert subprocess.run(["pgrep", "-f", sleep], capture_output=True, check=False).returncode != 0
    assert not (tmp / "late").exists()


def test_a_watched_playbook_opsbook_stops_shows_one_line_for_its_shutdown_output(local_env, capsys):
    env, books, _tmp = local_env
    sleep = f"sleep 300.{uuid.uuid4().int % 10**9:09d}"
    book = _book(books, "watched.yml", f"    - name: Sleep while watched\n      ansible.builtin.command: {sleep}\n"
                                       f"      changed_when: false\n")
    with ansible.start_playbook(env, book, what="switching", echo=True) as run:
        deadline = time.monotonic() + 60
        while subprocess.run(["pgrep", "-f", sleep], capture_output=True, check=False).returncode != 0:
            assert time.monotonic() < deadline, "the task never started"
            time.sleep(0.1)
        run.stop_in_order()
        assert run.proc.poll() is not None
    out = capsys.readouterr().out.splitlines()
    assert any("TASK [Sleep while watched]" in line for line in out)   # shown as it came, before the stop
    summary = [line for line in out if "ansible-playbook stopped by opsbook" in line]
    assert len(summary) == 1, out
    assert summary[0].startswith("[opsbook] switching: ")
    # What Ansible printed while it shut down is in that line only, not echoed on lines of its own.
    assert not [line for line in out if line.startswith("[ERROR]")], out
    assert "line(s) of its output after the stop not shown, the last: " in summary[0]
