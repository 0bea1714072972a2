"""The command as a user runs it: flags, exit codes, --config.check, --demo, graceful shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args, env=None, timeout=30):
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url, deadline=20.0):
    end = time.monotonic() + deadline
    last = None
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read().decode()
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {deadline}s: {last}")


def test_help_and_version():
    assert run("--help").returncode == 0
    result = run("--version")
    assert result.returncode == 0 and "0.1.0" in result.stdout


def test_unknown_flag_exits_2():
    result = run("--no-such-flag")
    assert result.returncode == 2 and "--no-such-flag" in result.stderr


def test_bad_listen_address_exits_2():
    result = run("--demo", "--web.listen-address", "nonsense")
    assert result.returncode == 2 and "--web.listen-address" in result.stderr


def test_config_check_ok(tmp_path):
    config = tmp_path / "config.yml"
    config.write_text(
        textwrap.dedent(
            """
            estates:
              - name: contoso
                configmgr:
                  connection_string: "DRIVER={SQLite3};Database=/nonexistent.sqlite"
                  intune_collection_ids: [PS100012]
            """
        )
    )
    result = run("--config.check", "--config.file", str(config))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_config_check_lists_every_problem_without_secrets(tmp_path):
    config = tmp_path / "config.yml"
    config.write_text(
        textwrap.dedent(
            """
            refresh_interval: 5 minutes
            estates:
              - name: contoso
                active_directory:
                  url: ldaps://dc01:636
                  bind_user: svc
                  bind_password: VerySecretPassword1
                  search_bases: [DC=contoso,DC=com]
                  tiemout: 10s
                entra:
                  tenant_id: t
                  client_id: c
                  client_secret: ${MISSING_SECRET}
            """
        )
    )
    env_free = {k: v for k, v in os.environ.items() if k != "MISSING_SECRET"}
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--config.check", "--config.file", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env_free,
        timeout=30,
    )
    assert result.returncode == 2
    assert "refresh_interval: not a valid duration '5 minutes'" in result.stderr
    assert "estates[0].active_directory.tiemout: unknown key (did you mean 'timeout'?)" in result.stderr
    assert "estates[0].entra.client_secret: environment variable MISSING_SECRET is not set" in result.stderr
    assert "VerySecretPassword1" not in result.stderr + result.stdout


def test_bad_config_without_check_also_exits_2(tmp_path):
    config = tmp_path / "config.yml"
    config.write_text("estates: []\n")
    result = run("--config.file", str(config), "--web.listen-address", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "estates: must be a non-empty list" in result.stderr


def test_missing_config_file_exits_2(tmp_path):
    result = run("--config.file", str(tmp_path / "nope.yml"))
    assert result.returncode == 2 and "file not found" in result.stderr


def test_importing_the_cli_and_demo_loads_no_backend_library():
    code = "import sys, exporter.cli, exporter.demo; print(sorted(m for m in ('pyodbc','ldap3','msal') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert result.stdout.strip() == "[]", result.stderr


def test_demo_serves_all_stages_and_shuts_down_on_sigterm():
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter",
            "--demo",
            "--web.listen-address",
            f"127.0.0.1:{port}",
            "--log.format",
            "json",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        started = time.monotonic()
        wait_for(f"http://127.0.0.1:{port}/-/ready")
        assert time.monotonic() - started < 15
        text = wait_for(f"http://127.0.0.1:{port}/metrics")
        for stage in (
            "ad_created",
            "entra_synced",
            "cm_discovered",
            "in_intune_collection",
            "connector_synced",
            "intune_enabled",
        ):
            assert f'intune_provisioning_users{{estate="contoso",provisioning_stage="{stage}"}}' in text
        assert 'intune_exporter_source_up{estate="contoso",source="ad"} 1.0' in text
        assert "intune_exporter_build_info{version=" in text
        assert 'intune_license_consumed_units{estate="contoso",sku="INTUNE_A",sku_name="Intune"}' in text
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert '"msg": "stopped"' in err


def test_config_check_builds_clients_and_reports_bad_certificate(tmp_path):
    not_a_key = tmp_path / "app.pem"
    not_a_key.write_text("this is not a PEM file\n")
    config = tmp_path / "config.yml"
    config.write_text(
        textwrap.dedent(
            f"""
            estates:
              - name: contoso
                entra:
                  tenant_id: 11111111-1111-1111-1111-111111111111
                  client_id: 22222222-2222-2222-2222-222222222222
                  certificate_file: {not_a_key}
                  certificate_thumbprint: 0123456789ABCDEF0123456789ABCDEF01234567
            """
        )
    )
    result = run("--config.check", "--config.file", str(config))
    assert result.returncode == 2
    assert "certificate_file" in result.stderr and "private key" in result.stderr


# ------------------------------------------------------------------------ config errors
VALID_ESTATE = """
estates:
  - name: contoso
    configmgr:
      connection_string: "DRIVER={SQLite3};Database=/nonexistent.sqlite"
      intune_collection_ids: [PS100012]
"""


def check(tmp_path, text: str | bytes, *extra: str):
    config = tmp_path / "config.yml"
    if isinstance(text, bytes):
        config.write_bytes(text)
    else:
        config.write_text(text)
    return run("--config.check", "--config.file", str(config), *extra)


def assert_usage_error(result, *expected: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    for text in expected:
        assert text in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("refresh_interval: 300y\n" + VALID_ESTATE, "refresh_interval: must be at most 7d, got 300y"),
        (
            VALID_ESTATE + "      query_timeout: 100000000000000000d\n",
            "estates[0].configmgr.query_timeout: must be at most 1d, got 100000000000000000d",
        ),
        (
            "refresh_interval: 5m\nrefresh_interval: 1m\n" + VALID_ESTATE,
            "refresh_interval: duplicate key (lines 1 and 2)",
        ),
        ("- estates\n- refresh_interval\n", "top level: must be a mapping, got a list"),
        ("state_file: ''\n" + VALID_ESTATE, "state_file: must not be empty"),
        (b"refresh_interval: 5m\xe9\n", "is not UTF-8 text (byte 0xe9 at line 1, column 21)"),
        ("estates: []\n".encode("utf-16"), "is UTF-16 text; save it as UTF-8"),
        (bytes(range(256)), "is not UTF-8 text"),
    ],
)
def test_bad_config_files_exit_2_naming_the_key(tmp_path, text, expected):
    assert_usage_error(check(tmp_path, text), expected)


def test_overflowing_timeout_is_refused_before_serving(tmp_path):
    config = tmp_path / "config.yml"
    config.write_text(VALID_ESTATE.replace("    configmgr:", "    configmgr:\n      query_timeout: 300y"))
    result = run("--config.file", str(config), "--web.listen-address", f"127.0.0.1:{free_port()}")
    assert_usage_error(result, "estates[0].configmgr.query_timeout: must be at most 1d, got 300y")


@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "binary"])
def test_secret_file_that_is_no_text_file_exits_2_without_blocking(tmp_path, special):
    if special == "fifo":
        os.mkfifo(tmp_path / "fifo")
    if special == "binary":
        (tmp_path / "binary").write_bytes(b"\xff\xfe\x00\x01garbage")
    text = VALID_ESTATE.replace(
        "intune_collection_ids", f"password_file: {special}\n      intune_collection_ids"
    )
    result = check(tmp_path, text)
    message = "binary is UTF-16 text" if special == "binary" else f"not a regular file: {special}"
    assert_usage_error(result, f"estates[0].configmgr.password_file: {message}")


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf", "0", "-1", "1e300"])
def test_demo_time_scale_must_be_a_sane_positive_number(scale):
    result = run("--demo", f"--demo.time-scale={scale}", "--web.listen-address", f"127.0.0.1:{free_port()}")
    assert_usage_error(result, "--demo.time-scale: must be a number greater than 0")


def test_sigterm_taken_by_another_thread_still_stops_the_exporter():
    # The kernel may hand a process-directed SIGTERM to any thread; Python runs the handler in the
    # main thread only, which a signal taken elsewhere does not wake. Here it is sent to a thread of
    # the exporter's process on purpose (pthread_kill), two seconds after the start.
    port = free_port()
    script = (
        "import signal, sys, threading, time\n"
        "from exporter.cli import main\n"
        "def poke():\n"
        "    time.sleep(2.0)\n"
        "    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)\n"
        "threading.Thread(target=poke, daemon=True).start()\n"
        f"sys.exit(main(['--demo', '--web.listen-address', '127.0.0.1:{port}']))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its demo child holds the pipes too: kill them together
    )
    try:
        _out, err = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=10)
        raise AssertionError(
            "the exporter ignored a SIGTERM taken by a thread other than the main one"
        ) from None
    assert process.returncode == 0, err
    assert "received SIGTERM" in err and "stopped" in err
