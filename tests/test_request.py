import os

import pytest

from vibatch.errors import BadJobId, MissingWorkdir, ResourceRequestError, UnknownUser
from vibatch.core.request import (check_job_id, make_request, parse_cpu_list, parse_memory_mb,
                             resolve_user)


@pytest.mark.parametrize("job_id", ["123", "123_4", "123.4", "123[4].server.example", "12.0",
                                    "run-1-abc"])
def test_good_job_ids(job_id):
    assert check_job_id(job_id) == job_id


@pytest.mark.parametrize("job_id, why", [
    ("a/b", "'/'"), ("..", "'..'"), ("a..b", "'..'"), ("a\nb", "control"), ("a\x00b", "control"),
    ("", "empty"), ("-x", "starting with"), ("a b", "use letters"), ("x" * 200, "at most 128"),
])
def test_bad_job_ids(job_id, why):
    with pytest.raises(BadJobId, match=why):
        check_job_id(job_id)


@pytest.mark.parametrize("text, mb", [("512", 512), ("512M", 512), ("2G", 2048), ("2GiB", 2048),
                                      ("1048576K", 1024), ("1t", 1048576)])
def test_memory(text, mb):
    assert parse_memory_mb(text) == mb


@pytest.mark.parametrize("text", ["", "abc", "-1G", "0", "12X", "1.5G"])
def test_bad_memory(text):
    with pytest.raises(ResourceRequestError, match="invalid memory amount"):
        parse_memory_mb(text)


def test_cpu_lists():
    assert parse_cpu_list("0-2,5") == (0, 1, 2, 5)
    assert parse_cpu_list("3") == (3,)
    for bad in ("2-1", "a", "1,,2", "-3"):
        with pytest.raises(ResourceRequestError):
            parse_cpu_list(bad)


def test_users():
    assert resolve_user("nobody").uid == 65534
    assert resolve_user("65534").name == "nobody"
    with pytest.raises(UnknownUser, match="does not exist"):
        resolve_user("no-such-user-xyz")
    with pytest.raises(UnknownUser, match="never runs a job as root"):
        resolve_user("root")


def test_make_request_checks(tmp_path):
    wd = str(tmp_path)
    r = make_request("7", "nobody", 2, 512, "img", wd + "/", cpus=[3, 2])
    assert r.workdir == wd and r.cpus == (2, 3)
    # root does not test existence (an oracle below others' 0700 directories): the prologue
    # does, as the job's user (share.check_as_user: test_share, test_vm_lifecycle)
    assert make_request("7", "nobody", 1, 512, "img", wd + "/missing").workdir == wd + "/missing"
    with pytest.raises(MissingWorkdir, match="not an absolute path"):
        make_request("7", "nobody", 1, 512, "img", "relative")
    with pytest.raises(MissingWorkdir, match="system directory"):
        make_request("7", "nobody", 1, 512, "img", "/etc")
    with pytest.raises(ResourceRequestError, match="gave 1 CPU ids"):
        make_request("7", "nobody", 2, 512, "img", wd, cpus=[1])
    with pytest.raises(ResourceRequestError, match="at least 1"):
        make_request("7", "nobody", 0, 512, "img", wd)
    assert os.path.isdir(wd)
