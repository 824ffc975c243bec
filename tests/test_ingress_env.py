"""The HAProxy ingress's environment: a private folder for its admin socket, a patient start.

Serve writes HAProxy's admin socket with ``mode 666 level admin``; in Serve's default
``/tmp/haproxy-serve`` any local user could drive it. ``python -m jobs.environment`` puts
every HAProxy file in a folder only its owner may enter, and gives the HTTP front time to
start on a busy machine before the controller replaces it.
"""

from __future__ import annotations

import os
import stat

import pytest

from serve_app import environment


def test_haproxy_files_go_to_a_private_folder():
    env = environment.ingress_env("haproxy")
    folder = environment.private_folder()
    for name in ("RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC",
                 "RAY_SERVE_HAPROXY_SERVER_STATE_FILE", "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"):
        assert os.path.dirname(env[name]) == folder, name
    info = os.lstat(folder)
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == os.getuid()
    # Serve's unix socket paths (a 56-character subfolder + /metrics.sock) stay in bounds
    assert len(folder) <= environment.HAPROXY_FOLDER_MAX


def test_a_folder_that_is_not_ours_is_refused(tmp_path):
    # a link planted where the folder goes (another user's trick) is refused, not used
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.symlink(target, tmp_path / "planted")
    with pytest.raises(ValueError, match="is not a folder of this user"):
        environment.private_folder(str(tmp_path / "planted"))


def test_every_mode_gives_the_front_time_to_start():
    for mode in environment.Ingress:
        env = environment.ingress_env(mode)
        ready = float(env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"])
        period = float(env["RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S"])
        timeout = float(env["RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"])
        # three missed checks (Serve's fixed threshold) take minutes: Serve's defaults
        # (5 s ready check, 10 s health check) replaced a slow-starting front after 15 s
        assert 3 * ready >= 120 and 3 * max(period, timeout) >= 120
        # Ray's workers (the front and the replicas) at the priority of the work beside them
        assert env["RAY_worker_niceness"] == "0"
