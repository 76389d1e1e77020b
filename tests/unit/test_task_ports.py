"""--port of `invoke notebook` and `invoke records.serve`: a port number or nothing; anything else is
refused with a sentence before anything starts (it was a traceback from bind())."""

import pytest
from invoke.exceptions import Exit

from tasks import local_port


@pytest.mark.parametrize("value", ["-1", "0", "65536", "99999", "abc", "80.5"])
def test_a_port_that_is_not_one_is_refused(value):
    with pytest.raises(Exit) as e:
        local_port(value)
    assert e.value.code == 1
    assert "Nothing was started" in e.value.message


def test_ports_and_the_default_pass():
    assert local_port(None) is None
    assert local_port("8888") == 8888
    assert local_port(1) == 1
