"""Config schema, validation messages (file, line, key, problem) and command-line overrides."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from proxy.address import HostPort
from proxy.config import (
    COMMAND_LINE,
    Config,
    LimitsConfig,
    ListenerConfig,
    LogConfig,
    ShadowConfig,
    apply_overrides,
    check_complete,
    load_config,
    option_paths,
    parse_config,
    render_config,
)
from proxy.errors import ConfigError, InvalidValue, MemshadowError
from proxy.redis.url import RedisURL
from tests.support import ThrowawayCA

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = ROOT / "proxy" / "memshadow.yaml"  # the commented defaults, in the package
EXAMPLE = ROOT / "config" / "memshadow.yaml"  # an example of one's own, a real file


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "memshadow.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == path
    return info.value


# --- ConfigError itself ------------------------------------------------------------------------


def test_config_error_message_names_file_line_key_and_problem() -> None:
    err = ConfigError(
        "config/memshadow.yaml",
        "must be a number between 0 and 1, got 'abc'",
        line=12,
        key="shadow.sample_rate",
    )
    assert str(err) == (
        "config/memshadow.yaml:12: shadow.sample_rate: must be a number between 0 and 1, got 'abc'"
    )
    assert isinstance(err, MemshadowError)


def test_config_error_without_line_or_key() -> None:
    assert str(ConfigError("a.yaml", "cannot read", key="listen")) == "a.yaml: listen: cannot read"
    assert str(ConfigError("a.yaml", "cannot read")) == "a.yaml: cannot read"


def test_config_error_survives_pickling() -> None:
    err = ConfigError("a.yaml", "bad", line=3, key="log.level")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.file, copy.line, copy.key, copy.problem) == ("a.yaml", 3, "log.level", "bad")
    assert str(copy) == str(err)


def test_invalid_value_is_a_value_error_and_a_memshadow_error() -> None:
    with pytest.raises(ValueError):
        HostPort.parse("nope")
    with pytest.raises(MemshadowError):
        HostPort.parse("nope")


# --- defaults and the example file ---------------------------------------------------------------


def test_defaults() -> None:
    config = load_config(None)
    assert config.source == "defaults"
    assert config.listen == HostPort("127.0.0.1", 11311)
    assert config.memcached == HostPort("127.0.0.1", 11211)
    assert config.admin.listen == HostPort("127.0.0.1", 9180)
    assert config.shadow == ShadowConfig(redis=None, sample_rate=0.0)
    assert not config.shadow.enabled
    assert config.limits == LimitsConfig(
        max_line_bytes=2048,
        max_get_line_bytes=8 * 1024 * 1024,
        max_value_bytes=1048576 + 512,
        max_pending_requests=4096,
        write_buffer_high=256 * 1024,
        write_buffer_low=64 * 1024,
    )
    assert config.upstream_connect_timeout == 2.0
    assert config.shutdown_timeout == 10.0
    assert config.log == LogConfig(level="info", format="text")


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "~\n"])
def test_empty_file_means_defaults(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    config = load_config(path)
    assert config == Config()
    assert config.source == path


def test_empty_sections_mean_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "shadow:\nlimits:\nlog:\n")) == Config()


def test_the_defaults_file_loads_and_equals_the_defaults() -> None:
    config = load_config(str(DEFAULTS))
    assert config == Config()
    assert config.source == str(DEFAULTS)


def test_the_defaults_file_sets_every_option() -> None:
    tree = yaml.safe_load(DEFAULTS.read_text(encoding="utf-8"))
    for dotted in option_paths():
        node = tree
        for part in dotted.split("."):
            assert part in node, f"{dotted} is missing from {DEFAULTS.name}"
            node = node[part]


def test_the_example_is_a_file_of_its_own_not_the_defaults() -> None:
    # Editing the example (or a copy of it) must never edit the shipped defaults: no symlink.
    assert not EXAMPLE.is_symlink() and EXAMPLE.is_file()
    config = load_config(str(EXAMPLE))
    assert config.shadow.ramp.steps == (0.01, 0.05, 0.25, 1.0)
    assert config.shadow.redis is not None and config.shadow.sample_rate == 0.0
    assert load_config(str(DEFAULTS)) == Config()


def test_the_configuration_in_effect_prints_and_reads_back(tmp_path: Path) -> None:
    path = write(tmp_path, "shadow:\n  redis: redis://127.0.0.1:6379/3\n  ramp:\n"
                 "    steps: [0.01, 1.0]\n    hold: 2h\nlisteners:\n"
                 "  - {listen: 127.0.0.1:0, memcached: 10.0.0.1:11211, name: a}\n"
                 "admin:\n  token: hidden-t0ken\n")  # fmt: skip
    config = load_config(path)
    text = render_config(config)
    assert f"# From: {path}" in text
    assert "    steps: [0.01, 1.0]  # default: []" in text
    assert "    hold: 7200.0  # default: 900.0" in text
    assert "  # token: (set, not printed)" in text and "hidden-t0ken" not in text
    assert "  sample_rate: 0.0\n" in text  # a default, unmarked
    again = tmp_path / "again.yaml"
    again.write_text(text, encoding="utf-8")
    assert load_config(str(again)) == dataclasses.replace(
        config, admin=dataclasses.replace(config.admin, token=None)
    )


def test_the_defaults_file_comments_every_option() -> None:
    # Each option line is preceded by a comment line (or shares the comment of a pair).
    lines = DEFAULTS.read_text(encoding="utf-8").splitlines()
    for dotted in option_paths():
        leaf = dotted.rsplit(".", 1)[-1]
        index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{leaf}:"))
        above = [line.strip() for line in lines[max(0, index - 2) : index]]
        assert any(line.startswith("#") for line in above), f"{dotted} has no comment"


def test_full_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
listen: 0.0.0.0:21311
memcached: "[::1]:21211"
admin: localhost:0
upstream_connect_timeout: 0.5
shutdown_timeout: 0
shadow:
  redis: rediss://app:s%40cret@redis.example:6380/2
  sample_rate: 0.25
limits:
  max_line_bytes: 4KiB
  max_get_line_bytes: 1 MiB
  max_value_bytes: 2097152
  max_pending_requests: 16
  write_buffer_high: 1MiB
  write_buffer_low: 1MiB
log:
  level: DEBUG
  format: json
""",
    )
    config = load_config(path)
    assert config.listen == HostPort("0.0.0.0", 21311)
    assert config.memcached == HostPort("::1", 21211)
    assert config.admin.listen == HostPort("localhost", 0)
    assert config.upstream_connect_timeout == 0.5
    assert config.shutdown_timeout == 0.0
    assert config.shadow.redis == RedisURL(
        host="redis.example", port=6380, db=2, username="app", password="s@cret", tls=True
    )
    assert config.shadow.sample_rate == 0.25
    assert config.shadow.enabled
    assert config.limits == LimitsConfig(4096, 1 << 20, 2097152, 16, 1 << 20, 1 << 20)
    assert config.log == LogConfig(level="debug", format="json")


def test_unquoted_exponent_is_a_number(tmp_path: Path) -> None:
    # PyYAML resolves 1e-3 to a string; an unquoted number should still work.
    path = write(tmp_path, "shadow:\n  redis: redis://r\n  sample_rate: 1e-3\n")
    assert load_config(path).shadow.sample_rate == 0.001


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().listen = HostPort("h", 1)  # type: ignore[misc]


# --- every error a user can trigger in a file ------------------------------------------------


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    err = error_of(tmp_path, "listen: 127.0.0.1:1\nshadow:\n  sample_rat: 0.1\n")
    assert (err.line, err.key) == (3, "shadow.sample_rat")
    assert err.problem == "unknown option 'sample_rat' (did you mean 'shadow.sample_rate'?)"
    assert str(err) == (
        f"{err.file}:3: shadow.sample_rat: unknown option 'sample_rat' "
        "(did you mean 'shadow.sample_rate'?)"
    )


def test_unknown_top_level_key_suggests_the_closest(tmp_path: Path) -> None:
    err = error_of(tmp_path, "\nmemcache: 127.0.0.1:11211\n")
    assert (err.line, err.key) == (2, "memcache")
    assert "did you mean 'memcached'?" in err.problem


def test_key_in_the_wrong_section_names_the_right_one(tmp_path: Path) -> None:
    err = error_of(tmp_path, "sample_rate: 0.1\n")
    assert err.key == "sample_rate"
    assert "did you mean 'shadow.sample_rate'?" in err.problem


def test_unknown_key_without_a_close_match_lists_valid_keys(tmp_path: Path) -> None:
    err = error_of(tmp_path, "log:\n  colour: yes\n")
    assert (err.line, err.key) == (2, "log.colour")
    assert err.problem == "unknown option 'colour'; valid options here: level, format"


def test_every_error_of_a_file_is_reported_in_file_order(tmp_path: Path) -> None:
    err = error_of(
        tmp_path,
        "listen: nowhere\nshadow:\n  sample_rat: 0.1\n  queue_size: -3\nlog:\n  level: loud\n",
    )
    assert (err.line, err.key) == (1, "listen")  # the first one, as before
    assert [(e.line, e.key) for e in err.more] == [
        (3, "shadow.sample_rat"),
        (4, "shadow.queue_size"),
        (6, "log.level"),
    ]
    lines = str(err).splitlines()
    assert len(lines) == 4 and all(line.startswith(f"{err.file}:") for line in lines)
    assert str(pickle.loads(pickle.dumps(err))) == str(err)  # all of them survive pickling


def test_duplicate_key(tmp_path: Path) -> None:
    err = error_of(tmp_path, "listen: 127.0.0.1:1\n\nlisten: 127.0.0.1:2\n")
    assert (err.line, err.key) == (3, "listen")
    assert err.problem == "given twice (first on line 1)"


@pytest.mark.parametrize(
    ("text", "line", "key", "problem"),
    [
        (
            "shadow:\n  sample_rate: abc\n",
            2,
            "shadow.sample_rate",
            "must be a number between 0 and 1, got 'abc'",
        ),
        (
            "shadow:\n  sample_rate: 1.5\n",
            2,
            "shadow.sample_rate",
            "must be a number between 0 and 1, got 1.5",
        ),
        (
            "shadow:\n  sample_rate: -0.1\n",
            2,
            "shadow.sample_rate",
            "must be a number between 0 and 1, got -0.1",
        ),
        (
            "shadow:\n  sample_rate: .nan\n",
            2,
            "shadow.sample_rate",
            "must be a number between 0 and 1, got .nan",
        ),
        (
            "shadow:\n  sample_rate: true\n",
            2,
            "shadow.sample_rate",
            "must be a number between 0 and 1, got true (a boolean)",
        ),
        (
            "shadow:\n  sample_rate: '0.5'\n",
            2,
            "shadow.sample_rate",
            "must be a number between 0 and 1, got '0.5'",
        ),
        (
            "listen: [127.0.0.1, 11311]\n",
            1,
            "listen",
            "must be HOST:PORT, e.g. 127.0.0.1:11211; got a list",
        ),
        ("listen:\n", 1, "listen", "must be HOST:PORT, e.g. 127.0.0.1:11211; got nothing (null)"),
        ("shadow: yes\n", 1, "shadow", "must be a mapping of options, got yes (a boolean)"),
        ("- listen\n", 1, "top level", "must be a mapping of options, got a list"),
        (
            "limits:\n  max_line_bytes: lots\n",
            2,
            "limits.max_line_bytes",
            "must be a positive number of bytes, e.g. 65536 or 64KiB; got 'lots'",
        ),
        (
            "limits:\n  max_value_bytes: 0\n",
            2,
            "limits.max_value_bytes",
            "must be a positive number of bytes, e.g. 65536 or 64KiB; got 0",
        ),
        (
            "limits:\n  max_value_bytes: 1.5\n",
            2,
            "limits.max_value_bytes",
            "must be a positive number of bytes, e.g. 65536 or 64KiB; got 1.5",
        ),
        (
            "limits:\n  max_pending_requests: 0\n",
            2,
            "limits.max_pending_requests",
            "must be a whole number above zero, got 0",
        ),
        (
            "limits:\n  max_line_bytes: 1\n  write_buffer_high: 1KiB\n",
            3,  # write_buffer_low keeps its default, so the option the file sets is blamed
            "limits.write_buffer_high",
            "write_buffer_low (65536) must not exceed write_buffer_high (1024)",
        ),
        (
            "limits:\n  write_buffer_low: 2MiB\n  write_buffer_high: 1MiB\n",
            2,
            "limits.write_buffer_low",
            "write_buffer_low (2097152) must not exceed write_buffer_high (1048576)",
        ),
        (
            "limits:\n  max_line_bytes: 4096\n  max_get_line_bytes: 1024\n",
            3,
            "limits.max_get_line_bytes",
            "max_get_line_bytes (1024) must be at least max_line_bytes (4096)",
        ),
        (
            "upstream_connect_timeout: 0\n",
            1,
            "upstream_connect_timeout",
            "must be a number of seconds, more than zero; got 0",
        ),
        (
            "shutdown_timeout: -1\n",
            1,
            "shutdown_timeout",
            "must be a number of seconds, zero or more; got -1",
        ),
        (
            "shutdown_timeout: soon\n",
            1,
            "shutdown_timeout",
            "must be a number of seconds, zero or more; got 'soon'",
        ),
        (
            "log:\n  level: warn\n",
            2,
            "log.level",
            "must be one of debug, info, warning, error, critical; got 'warn' "
            "(did you mean 'warning'?)",
        ),
        ("log:\n  format: xml\n", 2, "log.format", "must be one of text, json; got 'xml'"),
        (
            "log:\n  level: 3\n",
            2,
            "log.level",
            "must be one of debug, info, warning, error, critical; got 3",
        ),
        (
            "shadow:\n  worker: thread\n",
            2,
            "shadow.worker",
            "must be one of process, inline; got 'thread'",
        ),
        (
            "shadow:\n  worker_nice: 20\n",
            2,
            "shadow.worker_nice",
            "must be a whole number from 0 to 19, got 20",
        ),
        (
            "shadow:\n  worker_nice: -5\n",
            2,
            "shadow.worker_nice",
            "must be a whole number from 0 to 19, got -5",
        ),
        ("1: x\n", 1, "top level", "option names must be plain words"),
        ("shutdown_timeout: !!float soon\n", 1, "shutdown_timeout", "'soon' is not a valid float"),
    ],
)
def test_wrong_values(tmp_path: Path, text: str, line: int, key: str, problem: str) -> None:
    err = error_of(tmp_path, text)
    assert (err.line, err.key, err.problem) == (line, key, problem)
    assert str(err) == f"{err.file}:{line}: {key}: {problem}"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (":11311", "missing host in ':11311'; expected HOST:PORT, e.g. 127.0.0.1:11211"),
        ("localhost", "expected HOST:PORT, got 'localhost'"),
        ("11311", "expected HOST:PORT, got '11311'"),
        ("'localhost:'", "port must be a number between 0 and 65535, got ''"),
        ("localhost:http", "port must be a number between 0 and 65535, got 'http'"),
        ("localhost:65536", "port must be a number between 0 and 65535, got '65536'"),
        ("localhost:-1", "port must be a number between 0 and 65535, got '-1'"),
        ("::1:11311", "IPv6 addresses must be in brackets, e.g. [::1]:11211; got '::1:11311'"),
        ("'[::1:11311'", "missing ']' in '[::1:11311'; expected [IPV6]:PORT"),
        ("'[::1]11311'", "expected [IPV6]:PORT, got '[::1]11311'"),
        ("'[localhost]:1'", "brackets are only for IPv6 addresses, got '[localhost]:1'"),
        ("'[fe80::zz]:1'", "invalid IPv6 address 'fe80::zz'"),
        ("bad host:1", "invalid host name 'bad host'"),
        ("-dash:1", "invalid host name '-dash'"),
    ],
)
def test_bad_host_port(tmp_path: Path, value: str, problem: str) -> None:
    err = error_of(tmp_path, f"log:\n  level: info\nlisten: {value}\n")
    assert (err.line, err.key, err.problem) == (3, "listen", problem)


def test_port_zero_only_for_listening_addresses(tmp_path: Path) -> None:
    assert (
        load_config(write(tmp_path, "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n")).listen.port == 0
    )
    err = error_of(tmp_path, "memcached: 127.0.0.1:0\n")
    assert (err.key, err.problem) == (
        "memcached",
        "port must be a number between 1 and 65535, got '0'",
    )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("http://localhost:6379", "scheme must be redis:// or rediss://, got 'http://'"),
        ("localhost:6379", "expected a URL like redis://HOST:PORT/DB, got 'localhost:6379'"),
        ("redis://", "missing host in 'redis://'"),
        ("redis://:6379", "missing host in 'redis://:6379'"),
        ("redis://h:99999", "port must be a number between 1 and 65535, got '99999'"),
        ("redis://h:0", "port must be a number between 1 and 65535, got '0'"),
        ("redis://h:port", "port must be a number between 1 and 65535, got 'port'"),
        ("redis://h/db1", "database must be a number, as in redis://HOST:PORT/0; got '/db1'"),
        ("redis://h/1/2", "database must be a number, as in redis://HOST:PORT/0; got '/1/2'"),
        ("redis://h/0?timeout=1", "query parameters are not supported, got '?timeout=1'"),
        ("redis://h/0#x", "fragments are not supported, got '#x'"),
        (
            "redis://user@h",
            "the Redis URL names the user 'user' but no password is given: put it in the "
            "URL, in shadow.redis_password_file or in MEMSHADOW_REDIS_PASSWORD",
        ),
        ("redis://bad_host!:1", "invalid host name 'bad_host!'"),
        ("redis://u:hunter2@:6379", "missing host in 'redis://***@:6379'"),
        (
            "redis://alice:hunter2/x@h:6379/0",
            "the URL 'redis://***@h:6379/0' has an '@' after a '/', '?' or '#': percent-encode "
            "those characters in the user name or password (%2F, %3F, %23)",
        ),
        (
            "redis://:hun?ter2@h",
            "the URL 'redis://***@h' has an '@' after a '/', '?' or '#': percent-encode those "
            "characters in the user name or password (%2F, %3F, %23)",
        ),
        ("[1, 2]", "must be a redis:// URL or null, got a list"),
    ],
)
def test_bad_redis_url(tmp_path: Path, value: str, problem: str) -> None:
    err = error_of(tmp_path, f"shadow:\n  redis: {value}\n")
    assert (err.line, err.key, err.problem) == (2, "shadow.redis", problem)
    assert "hunter2" not in str(err)


def test_bad_yaml_syntax_names_the_line(tmp_path: Path) -> None:
    err = error_of(tmp_path, "listen: 127.0.0.1:1\nshadow:\n  redis: [\n")
    assert err.line == 4
    assert err.key == ""
    assert err.problem.startswith("invalid YAML: ")
    assert str(err).startswith(f"{err.file}:4: invalid YAML: ")


def test_yaml_mapping_error_names_the_line(tmp_path: Path) -> None:
    err = error_of(tmp_path, "listen: 127.0.0.1:1\nlog: level: info\n")
    assert err.line == 2
    assert err.problem == "invalid YAML: mapping values are not allowed here"


def test_yaml_tab_indentation(tmp_path: Path) -> None:
    err = error_of(tmp_path, "log:\n\tlevel: info\n")
    assert err.line == 2
    assert "invalid YAML" in err.problem


def test_two_documents_are_an_error(tmp_path: Path) -> None:
    err = error_of(tmp_path, "listen: 127.0.0.1:1\n---\nlisten: 127.0.0.1:2\n")
    assert err.line == 2
    assert "expected a single document" in err.problem


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read config file: No such file or directory"
    assert info.value.line is None


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert str(info.value) == f"{tmp_path}: cannot read config file: Is a directory"


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"listen: caf\xe9:1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert "not UTF-8" in info.value.problem


def test_parse_config_names_the_given_source() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("log: {level: loud}\n", source="<inline>")
    assert str(info.value).startswith("<inline>:1: log.level: must be one of")


# --- HostPort and RedisURL -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "rendered"),
    [
        ("127.0.0.1:11211", HostPort("127.0.0.1", 11211), "127.0.0.1:11211"),
        ("localhost:1", HostPort("localhost", 1), "localhost:1"),
        (" cache-1.example.com:65535 ", HostPort("cache-1.example.com", 65535), None),
        ("[::1]:11311", HostPort("::1", 11311), "[::1]:11311"),
        ("[::]:0", HostPort("::", 0), "[::]:0"),
    ],
)
def test_host_port_round_trip(text: str, expected: HostPort, rendered: str | None) -> None:
    parsed = HostPort.parse(text, allow_port_zero=True)
    assert parsed == expected
    assert str(parsed) == (rendered or text.strip())
    assert HostPort.parse(str(parsed), allow_port_zero=True) == parsed


def test_host_port_rejects_port_zero_by_default() -> None:
    with pytest.raises(InvalidValue, match="between 1 and 65535"):
        HostPort.parse("h:0")


def test_redis_url_defaults_and_rendering() -> None:
    url = RedisURL.parse("redis://cache")
    assert url == RedisURL(host="cache", port=6379, db=0, username=None, password=None, tls=False)
    assert url.to_url() == "redis://cache:6379/0"
    ipv6 = RedisURL.parse("rediss://[::1]:6380/5")
    assert (ipv6.host, ipv6.port, ipv6.db, ipv6.tls) == ("::1", 6380, 5, True)
    assert str(ipv6) == "rediss://[::1]:6380/5"


def test_redis_url_password_is_hidden_from_str_and_repr() -> None:
    url = RedisURL.parse("redis://user:p%40ss%2Fword@h:1/3")
    assert (url.username, url.password) == ("user", "p@ss/word")
    assert str(url) == "redis://user:***@h:1/3"
    assert "p@ss" not in repr(url)
    assert url.to_url() == "redis://user:p%40ss%2Fword@h:1/3"
    assert RedisURL.parse(url.to_url()) == url


def test_redis_url_password_without_user() -> None:
    url = RedisURL.parse("redis://:secret@h")
    assert (url.username, url.password) == (None, "secret")
    assert url.to_url() == "redis://:secret@h:6379/0"
    assert RedisURL.parse(url.to_url()) == url


# --- command-line overrides ------------------------------------------------------------------


def test_overrides_replace_file_values(tmp_path: Path) -> None:
    base = load_config(
        write(tmp_path, "listen: 127.0.0.1:1\nshadow:\n  sample_rate: 0.5\nlog:\n  level: debug\n")
    )
    config = apply_overrides(
        base,
        listen="0.0.0.0:2",
        memcached="[::1]:3",
        redis="redis://r:4/1",
        sample_rate="0.125",
        admin="127.0.0.1:0",
    )
    assert config.listen == HostPort("0.0.0.0", 2)
    assert config.memcached == HostPort("::1", 3)
    assert config.admin.listen == HostPort("127.0.0.1", 0)
    assert config.shadow == ShadowConfig(redis=RedisURL("r", 4, 1), sample_rate=0.125)
    assert config.log.level == "debug"  # untouched options keep the file's value
    assert config.source == base.source


def test_no_overrides_returns_an_equal_config() -> None:
    base = Config()
    assert apply_overrides(base) == base


def test_sample_rate_override_accepts_a_float() -> None:
    assert apply_overrides(Config(), sample_rate=1.0).shadow.sample_rate == 1.0


def test_empty_redis_override_turns_shadowing_off() -> None:
    base = apply_overrides(Config(), redis="redis://r", sample_rate="1")
    assert base.shadow.enabled
    config = apply_overrides(base, redis="")
    assert config.shadow.redis is None
    assert not config.shadow.enabled


def test_rate_without_redis_is_allowed_but_disabled() -> None:
    config = apply_overrides(Config(), sample_rate="0.5")
    assert config.shadow.sample_rate == 0.5
    assert not config.shadow.enabled


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            {"sample_rate": "abc"},
            "command line: --sample-rate: must be a number between 0 and 1, got 'abc'",
        ),
        (
            {"sample_rate": "2"},
            "command line: --sample-rate: must be a number between 0 and 1, got '2'",
        ),
        (
            {"sample_rate": "nan"},
            "command line: --sample-rate: must be a number between 0 and 1, got 'nan'",
        ),
        (
            {"listen": ":11311"},
            "command line: --listen: missing host in ':11311'; expected HOST:PORT, "
            "e.g. 127.0.0.1:11211",
        ),
        (
            {"memcached": "127.0.0.1:0"},
            "command line: --memcached: port must be a number between 1 and 65535, got '0'",
        ),
        ({"admin": "localhost"}, "command line: --admin: expected HOST:PORT, got 'localhost'"),
        (
            {"redis": "http://x"},
            "command line: --redis: scheme must be redis:// or rediss://, got 'http://'",
        ),
    ],
)
def test_bad_override_names_the_flag(flags: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), **flags)
    assert str(info.value) == message
    assert info.value.file == COMMAND_LINE
    assert info.value.key.startswith("--")


# --- shadow.redis_cluster ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "mode"), [("auto", "auto"), ("true", "true"), ("no", "false")])
def test_redis_cluster_is_auto_true_or_false(tmp_path: Path, text: str, mode: str) -> None:
    config = load_config(write(tmp_path, f"shadow:\n  redis_cluster: {text}\n"))
    assert config.shadow.redis_cluster == mode
    assert Config().shadow.redis_cluster == "auto"


def test_redis_cluster_refuses_anything_else(tmp_path: Path) -> None:
    err = error_of(tmp_path, "shadow:\n  redis_cluster: sometimes\n")
    assert err.key == "shadow.redis_cluster"
    assert "must be auto, true or false" in str(err)


def test_a_forced_cluster_needs_database_0(tmp_path: Path) -> None:
    text = "shadow:\n  redis: redis://cache:6379/2\n  redis_cluster: true\n"
    config = load_config(write(tmp_path, text))
    with pytest.raises(ConfigError) as info:
        check_complete(config)
    assert info.value.key == "shadow.redis"
    assert "database 0 only" in str(info.value)


# --- listeners ---------------------------------------------------------------------------------


def test_listeners_give_one_listen_address_per_memcached(tmp_path: Path) -> None:
    text = (
        "listeners:\n"
        "  - {listen: 0.0.0.0:11311, memcached: 10.0.0.1:11211, name: cache-a}\n"
        "  - listen: 0.0.0.0:11312\n"
        "    memcached: 10.0.0.2:11211\n"
    )
    config = load_config(write(tmp_path, text))
    assert [(str(b.listen), str(b.memcached), b.label) for b in config.backends] == [
        ("0.0.0.0:11311", "10.0.0.1:11211", "cache-a"),
        ("0.0.0.0:11312", "10.0.0.2:11211", "10.0.0.2:11211"),
    ]
    assert Config().backends == (ListenerConfig(Config().listen, Config().memcached),)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("listeners: 127.0.0.1:1\n", "must be a list"),
        ("listeners:\n  - {listen: 127.0.0.1:1}\n", "entry 1: memcached missing"),
        (
            "listeners:\n  - {listen: 127.0.0.1:1, memcached: x:1, port: 3}\n",
            "unknown option 'port'",
        ),
        ("listeners:\n  - {listen: nope, memcached: x:1}\n", "entry 1:"),
        (
            "listeners:\n  - {listen: 127.0.0.1:1, memcached: a:1}\n"
            "  - {listen: 127.0.0.1:1, memcached: b:1}\n",
            "listen address 127.0.0.1:1 is given twice",
        ),
        (
            "listeners:\n  - {listen: 127.0.0.1:1, memcached: a:1, name: x}\n"
            "  - {listen: 127.0.0.1:2, memcached: b:1, name: x}\n",
            "name x is given twice",
        ),
    ],
)
def test_bad_listeners_are_named(tmp_path: Path, text: str, problem: str) -> None:
    err = error_of(tmp_path, text)
    assert err.key == "listeners"
    assert problem in str(err)


def test_listeners_exclude_listen_and_memcached(tmp_path: Path) -> None:
    text = "memcached: 10.0.0.9:11211\nlisteners:\n  - {listen: 127.0.0.1:1, memcached: a:1}\n"
    err = error_of(tmp_path, text)
    assert "either listeners" in str(err)


# --- workers ---------------------------------------------------------------------------------


def test_workers_take_a_number_or_auto(tmp_path: Path) -> None:
    from proxy.config import usable_cores

    path = tmp_path / "w.yaml"
    path.write_text("workers: 3\n")
    assert load_config(str(path)).workers == 3
    path.write_text("workers: auto\n")
    assert load_config(str(path)).workers == min(64, usable_cores())
    assert load_config(None).workers == 1


@pytest.mark.parametrize("value", ["0", "65", "two", "1.5", "-1"])
def test_workers_out_of_range_are_named(tmp_path: Path, value: str) -> None:
    err = error_of(tmp_path, f"workers: {value}\n")
    assert err.key == "workers"
    assert "auto or a whole number from 1 to 64" in err.problem


def test_workers_refuse_an_inline_shadow_and_a_replayed_flush(tmp_path: Path) -> None:
    err = error_of(tmp_path, "workers: 2\nshadow:\n  worker: inline\n")
    assert err.key == "workers" and "shadow.worker: process" in err.problem
    err = error_of(tmp_path, "workers: 2\nshadow:\n  replay_flush_all: true\n")
    assert err.key == "workers" and "replay_flush_all needs workers: 1" in err.problem


def test_the_workers_flag_overrides_the_file(tmp_path: Path) -> None:
    from proxy.config import apply_overrides

    config = apply_overrides(load_config(write(tmp_path, "workers: 3\n")), workers="2")
    assert config.workers == 2
    with pytest.raises(ConfigError) as info:
        apply_overrides(config, workers="0")
    assert info.value.key == "--workers"


# --- secrets and TLS files for Redis ---------------------------------------------------------


@pytest.fixture
def no_password_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMSHADOW_REDIS_PASSWORD", raising=False)


@pytest.fixture
def pki(tmp_path: Path) -> tuple[ThrowawayCA, Path, Path]:
    ca = ThrowawayCA(tmp_path)
    return (ca, *ca.issue("memshadow"))


def shadow_yaml(redis: str, **options: object) -> str:
    lines = [f"  redis: {redis}", *(f"  {name}: {value}" for name, value in options.items())]
    return "shadow:\n" + "\n".join(lines) + "\n"


@pytest.mark.usefixtures("no_password_env")
def test_the_redis_password_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("p@ss word\n")
    path = write(tmp_path, shadow_yaml("redis://alice@cache:6380/0", redis_password_file=secret))
    url = load_config(path).shadow.redis
    assert url is not None
    assert (url.username, url.password) == ("alice", "p@ss word")
    assert "p@ss" not in str(url) and "p@ss" not in repr(load_config(path))
    # Read again (a reload): the same config, so nothing to restart.
    assert load_config(path) == load_config(path)
    # --redis gets it too.
    flagged = apply_overrides(load_config(path), redis="redis://bob@other:6379")
    assert flagged.shadow.redis is not None and flagged.shadow.redis.password == "p@ss word"


def test_the_redis_password_from_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "password"
    secret.write_text("from-file")
    monkeypatch.setenv("MEMSHADOW_REDIS_PASSWORD", "from-env")
    for text in (
        shadow_yaml("redis://cache", redis_password_file=secret),
        shadow_yaml("redis://:in-url@cache"),
    ):
        url = load_config(write(tmp_path, text)).shadow.redis
        assert url is not None and url.password == "from-env"


@pytest.mark.usefixtures("no_password_env")
@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read '{path}': No such file or directory"),
        ("", "'{path}' is empty"),
        ("\n", "'{path}' is empty"),
        ("hunter2\nhunter3\n", "'{path}' holds more than one line; a password is one line"),
        ("x" * 5000, "'{path}' holds over 4096 bytes: not a password file"),
    ],
)
def test_a_bad_password_file_is_named_never_shown(
    tmp_path: Path, content: str | None, problem: str
) -> None:
    secret = tmp_path / "password"
    if content is not None:
        secret.write_text(content)
    err = error_of(tmp_path, shadow_yaml("redis://cache", redis_password_file=secret))
    assert (err.line, err.key, err.problem) == (
        3,
        "shadow.redis_password_file",
        problem.format(path=secret),
    )
    assert "hunter" not in str(err)


@pytest.mark.usefixtures("no_password_env")
def test_a_password_in_two_places_or_none_for_a_user(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("hunter2")
    err = error_of(tmp_path, shadow_yaml("redis://:hunter3@cache", redis_password_file=secret))
    assert err.key == "shadow.redis_password_file"
    assert err.problem.startswith("the Redis URL and shadow.redis_password_file both give")
    assert "hunter" not in str(err)
    err = error_of(tmp_path, shadow_yaml("redis://alice@cache"))
    assert err.key == "shadow.redis"
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), redis="redis://alice@cache")
    assert info.value.key == "--redis" and "no password is given" in info.value.problem


def test_tls_files_go_into_the_url(tmp_path: Path, pki: tuple[ThrowawayCA, Path, Path]) -> None:
    ca, cert, key = pki
    path = write(
        tmp_path,
        shadow_yaml(
            "rediss://cache:6380/0",
            redis_tls_ca_file=ca.cert,
            redis_tls_cert_file=cert,
            redis_tls_key_file=key,
        ),
    )
    url = load_config(path).shadow.redis
    assert url is not None
    assert (url.tls_ca_file, url.tls_cert_file, url.tls_key_file) == (
        str(ca.cert),
        str(cert),
        str(key),
    )
    assert RedisURL.parse(url.to_url(), options=True) == url
    context = url.tls_context()
    assert context is not None and context.check_hostname
    assert len(context.get_ca_certs()) == 1  # this CA only, not the system's


@pytest.mark.parametrize(
    ("yaml_of", "key", "problem"),
    [
        (
            lambda ca, cert, key: shadow_yaml("redis://cache", redis_tls_ca_file=ca),
            "shadow.redis_tls_ca_file",
            "shadow.redis_tls_ca_file applies to TLS only, and the Redis URL is redis://: use "
            "rediss:// (or remove the TLS options)",
        ),
        (
            lambda ca, cert, key: shadow_yaml("rediss://cache", redis_tls_ca_file=key),
            "shadow.redis_tls_ca_file",
            "holds no usable CA certificate (PEM)",
        ),
        (
            lambda ca, cert, key: shadow_yaml("rediss://cache", redis_tls_key_file=key),
            "shadow.redis_tls_key_file",
            "shadow.redis_tls_key_file is set without shadow.redis_tls_cert_file",
        ),
        (
            lambda ca, cert, key: shadow_yaml(
                "rediss://cache", redis_tls_cert_file=cert, redis_tls_key_file=ca
            ),
            "shadow.redis_tls_cert_file",
            "shadow.redis_tls_cert_file cannot be loaded",
        ),
        (
            lambda ca, cert, key: shadow_yaml("rediss://cache", redis_tls_cert_file="/nope.pem"),
            "shadow.redis_tls_cert_file",
            "cannot read '/nope.pem': No such file or directory",
        ),
    ],
)
def test_bad_tls_files(
    tmp_path: Path,
    pki: tuple[ThrowawayCA, Path, Path],
    yaml_of: Callable[[Path, Path, Path], str],
    key: str,
    problem: str,
) -> None:
    ca, cert, private = pki
    err = error_of(tmp_path, yaml_of(ca.cert, cert, private))
    assert err.key == key
    assert problem in err.problem


def test_the_environment_password_is_one_line_and_needs_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "password"
    secret.write_text("from-file")
    monkeypatch.setenv("MEMSHADOW_REDIS_PASSWORD", "from-env\n")  # as --from-file keeps it
    # It wins over the URL and the file together (no "given twice" then).
    text = shadow_yaml("redis://alice:in-url@cache", redis_password_file=secret)
    url = load_config(write(tmp_path, text)).shadow.redis
    assert url is not None and (url.username, url.password) == ("alice", "from-env")
    monkeypatch.setenv("MEMSHADOW_REDIS_PASSWORD", "two\nlines")
    err = error_of(tmp_path, shadow_yaml("redis://cache"))
    assert err.key == "shadow.redis"
    assert (
        err.problem == "MEMSHADOW_REDIS_PASSWORD holds more than one line; a password is one line"
    )
    assert "two" not in str(err)


def test_a_user_without_a_password_keeps_the_user_in_the_url() -> None:
    url = RedisURL("cache", username="alice")
    assert url.to_url() == str(url) == "redis://alice@cache:6379/0"
    assert RedisURL.parse(url.to_url()) == url


def test_an_encrypted_client_key_is_refused_at_once(tmp_path: Path) -> None:
    ca = ThrowawayCA(tmp_path)
    cert, key = ca.issue("memshadow")
    locked = tmp_path / "locked.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:pp", "-out", str(locked)],
        check=True,
        capture_output=True,
    )
    text = shadow_yaml("rediss://cache", redis_tls_cert_file=cert, redis_tls_key_file=locked)
    err = error_of(tmp_path, text)
    assert err.key == "shadow.redis_tls_cert_file"
    assert "the client key is encrypted" in err.problem
