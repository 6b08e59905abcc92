"""Config: every key validated, all problems reported together, exit 78 from the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from wxtoken.config import load_config

from helpers import APPID, APPID2, CORPID, SECRET, run_cli

REPO = Path(__file__).resolve().parent.parent
GOOD_APP = f'[apps.main]\nappid = "{APPID}"\nsecret = "{SECRET}"\n'
COMP_APPID = "wx0c0c0c0c0c0c0c0c"  # an Open Platform's AppID has the same shape
COMP = f'[components.p]\ncomponent_appid = "{COMP_APPID}"\n'

# (name, config text, a fragment the one-line error must contain)
BROKEN = [
    ("toml syntax", "state_dir = \n", "invalid TOML"),
    ("no apps", 'state_dir = "/tmp/x"\n', "apps: at least one"),
    ("unknown top key", 'refresh_intervall = 10\n' + GOOD_APP, "refresh_intervall: unknown key"),
    ("unknown app key", GOOD_APP + 'secrte = "x"\n', "apps.main.secrte: unknown key"),
    ("relative state_dir", 'state_dir = "state"\n' + GOOD_APP, "state_dir: must be an absolute"),
    ("interval is a string", 'refresh_interval = "1h"\n' + GOOD_APP, "refresh_interval: must be"),
    ("negative renew_before", "renew_before = -5\n" + GOOD_APP, "renew_before: must be at least"),
    ("nan interval", "refresh_interval = nan\n" + GOOD_APP, "refresh_interval: must be at least"),
    ("infinite interval", "refresh_interval = inf\n" + GOOD_APP,
     "refresh_interval: must be at most"),
    ("NUL in a path", 'state_dir = "/var/\\u0000x"\n' + GOOD_APP,
     "state_dir: must not contain a NUL"),
    ("bad api_base", 'api_base = "ftp://x"\n' + GOOD_APP, "api_base: must be an http(s) URL"),
    ("missing ca_bundle", 'ca_bundle = "/nonexistent/ca.pem"\n' + GOOD_APP, "ca_bundle: no such"),
    ("bad log_format", 'log_format = "xml"\n' + GOOD_APP, "log_format: must be one of"),
    ("zero budget", "daily_budget = 0\n" + GOOD_APP, "daily_budget: must be at least 1"),
    ("float budget", "daily_budget = 1.5\n" + GOOD_APP, "daily_budget: must be an integer"),
    ("bad app name", f'[apps."my.app"]\nappid = "{APPID}"\nsecret = "x"\n', "apps.my.app: app"),
    ("no secret", f'[apps.main]\nappid = "{APPID}"\n', "apps.main.secret_*: exactly one"),
    ("two secrets", GOOD_APP + 'secret_env = "X"\n', "found secret_env, secret"),
    ("missing appid", '[apps.main]\nsecret = "x"\n', "apps.main.appid: is required"),
    ("bad api", GOOD_APP + 'api = "oauth"\n', "apps.main.api: must be one of"),
    ("wecom without agentid", f'[apps.w]\napi = "wecom"\ncorpid = "{CORPID}"\nsecret = "x"\n',
     "apps.w.agentid: is required"),
    ("secret file missing", f'[apps.main]\nappid = "{APPID}"\nsecret_file = "/nonexistent/s"\n',
     "apps.main.secret_file: cannot read '/nonexistent/s'"),
    ("secret env unset", f'[apps.main]\nappid = "{APPID}"\nsecret_env = "WXT_UNSET_VAR"\n',
     "environment variable WXT_UNSET_VAR is not set"),
    ("bad file_mode", GOOD_APP + 'file_mode = "0648"\n', "apps.main.file_mode: must be an octal"),
    ("world-writable mode", GOOD_APP + 'file_mode = "0666"\n', "must not be writable by others"),
    ("duplicate credentials", GOOD_APP + f'[apps.other]\nappid = "{APPID}"\nsecret = "y"\n',
     "apps.other: same token credentials as apps.main"),
    ("redis without url", "[redis]\nkey_prefix = \"x\"\n" + GOOD_APP, "redis.url: is required"),
    ("api_base with a broken IPv6 host", 'api_base = "http://[::1"\n' + GOOD_APP,
     "api_base: must be an http(s) URL"),
    ("api_base with a port out of range", 'api_base = "http://127.0.0.1:99999"\n' + GOOD_APP,
     "api_base: port 99999 is out of range"),
    ("api_base with port 0", 'api_base = "http://127.0.0.1:0"\n' + GOOD_APP,
     "api_base: port 0 is out of range"),
    ("quota_watch not a list", GOOD_APP + 'quota_watch = "/cgi-bin/token"\n',
     "apps.main.quota_watch: must be a list of API paths"),
    ("quota_watch with a URL", GOOD_APP + 'quota_watch = ["https://h/cgi-bin/x?a=1"]\n',
     "apps.main.quota_watch: 'https://h/cgi-bin/x?a=1' is not an API path"),
    ("quota_watch with dots", GOOD_APP + 'quota_watch = ["/cgi-bin/../x"]\n',
     "is not an API path"),
    ("quota_watch with a newline", GOOD_APP + 'quota_watch = ["/cgi-bin/token\\n"]\n',
     "is not an API path"),
    ("component without appid", '[components.p]\nsecret = "s"\nmsg_token = "t"\n'
     'encoding_aes_key = "' + "a" * 43 + '"\n', "components.p.component_appid: is required"),
    ("component without msg_token", COMP + 'secret = "s"\nencoding_aes_key = "' + "a" * 43
     + '"\n', "components.p.msg_token_*: exactly one"),
    ("component aes key", COMP + 'secret = "s"\nmsg_token = "t"\nencoding_aes_key = "short"\n',
     "components.p.encoding_aes_key: must be the 43 characters"),
    ("component without secret off the fleet", COMP + 'msg_token = "t"\nencoding_aes_key = "'
     + "a" * 43 + '"\n', "components.p.secret_*: exactly one of"),
    ("fleet follower component without msg_token", '[redis]\nurl = "redis://h/0"\n' + COMP
     + 'encoding_aes_key = "' + "a" * 43 + '"\n', "components.p.msg_token_*: exactly one"),
    ("bad callback_listen", 'callback_listen = "8089"\n' + GOOD_APP,
     'callback_listen: must be "host:port"'),
    # '²'.isdigit() is true and int('²') raises: one line, no traceback
    ("callback_listen with a superscript port", 'callback_listen = "127.0.0.1:²"\n' + GOOD_APP,
     'callback_listen: must be "host:port"'),
    ("redis db a superscript", '[redis]\nurl = "redis://127.0.0.1:6390/²"\n' + GOOD_APP,
     "redis.url: "),
    ("redis sentinel port a superscript", '[redis]\nurl = "redis://127.0.0.1/0"\n'
     'sentinels = ["127.0.0.1:²"]\nservice_name = "m"\n' + GOOD_APP, "redis.sentinels: "),
    ("quota_watch twice", GOOD_APP + 'quota_watch = ["/cgi-bin/token", "/cgi-bin/token"]\n',
     "apps.main.quota_watch: lists a path twice"),
    ("quota_watch for WeCom", f'[apps.w]\napi = "wecom"\ncorpid = "{CORPID}"\nagentid = 1\n'
     'secret = "x"\nquota_watch = ["/cgi-bin/token"]\n', "apps.w.quota_watch: WeCom has no"),
    # ids: "wx" + 16 lowercase hex digits (a WeCom corpid "ww" or "wx"); WeChat answers 40013
    ("appid with a trailing space", f'[apps.main]\nappid = "{APPID} "\nsecret = "x"\n',
     f"apps.main.appid: '{APPID} ' has spaces around it"),
    ("appid with a leading space", f'[apps.main]\nappid = " {APPID}"\nsecret = "x"\n',
     f"apps.main.appid: ' {APPID}' has spaces around it"),
    ("a trailing space does not pass as another app", GOOD_APP + f'[apps.other]\nappid = '
     f'"{APPID} "\nsecret = "y"\n', f"apps.other.appid: '{APPID} ' has spaces around it"),
    ("an original ID", '[apps.main]\nappid = "gh_0123456789ab"\nsecret = "x"\n',
     "apps.main.appid: 'gh_0123456789ab' is the account's original ID (原始ID), not its AppID"),
    ("an appid too short", '[apps.main]\nappid = "wx123"\nsecret = "x"\n',
     'apps.main.appid: must be "wx" followed by 16 lowercase hex digits (the AppID on the '
     "开发 → 基本配置 page), not 'wx123'"),
    ("an appid in capitals", '[apps.main]\nappid = "WX11111111111111AB"\nsecret = "x"\n',
     "apps.main.appid: must be \"wx\" followed by 16 lowercase hex digits"),
    ("an appid that is not hex", '[apps.main]\nappid = "wx00000000demo0001"\nsecret = "x"\n',
     "apps.main.appid: must be \"wx\" followed by 16 lowercase hex digits"),
    ("an empty appid", '[apps.main]\nappid = ""\nsecret = "x"\n',
     "apps.main.appid: must be a non-empty string"),
    ("a corpid of another shape", '[apps.w]\napi = "wecom"\ncorpid = "ww1"\nagentid = 1\n'
     'secret = "x"\n', 'apps.w.corpid: must be "ww" or "wx" followed by 16 lowercase hex digits'),
    ("a corpid with a space", f'[apps.w]\napi = "wecom"\ncorpid = "{CORPID} "\nagentid = 1\n'
     'secret = "x"\n', f"apps.w.corpid: '{CORPID} ' has spaces around it"),
    ("a component_appid of another shape", '[components.p]\ncomponent_appid = "wxcomponent"\n'
     'secret = "s"\nmsg_token = "t"\nencoding_aes_key = "' + "a" * 43 + '"\n',
     'components.p.component_appid: must be "wx" followed by 16 lowercase hex digits'),
    ("a component's original ID", '[components.p]\ncomponent_appid = "gh_0123456789ab"\n'
     'secret = "s"\nmsg_token = "t"\nencoding_aes_key = "' + "a" * 43 + '"\n',
     "components.p.component_appid: 'gh_0123456789ab' is the account's original ID"),
    ("secret_file is a directory", f'[apps.main]\nappid = "{APPID}"\nsecret_file = "/"\n',
     "apps.main.secret_file: cannot read '/': Is a directory"),
]


@pytest.mark.parametrize(("name", "text", "fragment"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_exits_78_with_one_line_and_no_traceback(
        tmp_path: Path, name: str, text: str, fragment: str) -> None:
    """Each broken config: exit 78, exactly one line naming the file, key and problem."""
    path = tmp_path / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("CREDENTIALS_DIRECTORY",)}
    for command in ("check-config", "run"):
        result = run_cli(command, "--config", str(path), env=env)
        assert result.returncode == 78, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"wxtoken: {path}: ")
        assert fragment in lines[0]
        assert "Traceback" not in result.stderr and result.stdout == ""


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    """Several mistakes in one file produce one line each, in one run."""
    path = tmp_path / "config.toml"
    path.write_text('refresh_interval = "x"\nlog_format = "xml"\nbogus = 1\n'
                    f'[apps.main]\nappid = "{APPID}"\n')
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 4
    for key in ("bogus:", "refresh_interval:", "log_format:", "apps.main.secret_*:"):
        assert any(f": {key}" in line for line in lines), key


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist exits 78 naming the file."""
    result = run_cli("status", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 78
    assert result.stderr.strip() == f"wxtoken: {tmp_path / 'nope.toml'}: cannot read config: " \
                                    "No such file or directory"


def test_wxtoken_config_env_var_sets_the_default_path(tmp_path: Path) -> None:
    """$WXTOKEN_CONFIG is used when --config is not given."""
    path = tmp_path / "c.toml"
    path.write_text(GOOD_APP)
    path.chmod(0o600)
    result = run_cli("check-config", env={"WXTOKEN_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert f"# {path}: OK" in result.stdout


def test_secret_sources_resolve_and_are_masked_by_check_config(tmp_path: Path) -> None:
    """secret_file, secret_env and secret_credential all resolve; check-config never prints them."""
    secret_file = tmp_path / "main.secret"
    secret_file.write_text("file-s3cr3t-value-123\n")
    secret_file.chmod(0o600)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "cred").write_text("credential-s3cr3t-value-456")
    path = tmp_path / "config.toml"
    path.write_text(
        f'[apps.a]\nappid = "{APPID}"\nsecret_file = "{secret_file}"\n'
        f'[apps.b]\nappid = "{APPID2}"\nsecret_env = "WXT_SECRET_B"\n'
        f'[apps.c]\nappid = "wx0000000000000003"\nsecret_credential = "cred"\n'
        f'[apps.d]\napi = "wecom"\ncorpid = "{CORPID}"\nagentid = 1000002\n'
        'secret = "inline-s3cr3t-7"\n')
    path.chmod(0o600)
    env = {"WXT_SECRET_B": "env-s3cr3t-value-789", "CREDENTIALS_DIRECTORY": str(creds)}
    os.environ.update(env)
    try:
        config = load_config(str(path))
    finally:
        for key in env:
            del os.environ[key]
    secrets = {a.name: a.secret for a in config.apps}
    assert secrets == {"a": "file-s3cr3t-value-123", "b": "env-s3cr3t-value-789",
                       "c": "credential-s3cr3t-value-456", "d": "inline-s3cr3t-7"}
    assert config.app("d").agentid == "1000002" and config.app("d").api == "wecom"
    assert config.warnings == ()  # inline secret in a 0600 file: no warning
    result = run_cli("check-config", "--config", str(path), env=env)
    assert result.returncode == 0, result.stderr
    for secret in secrets.values():
        assert secret not in result.stdout + result.stderr
    assert f"from secret_file={secret_file}" in result.stdout
    assert all(a.secret not in repr(a) for a in config.apps)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644], ids=["0640", "0604", "0644"])
def test_inline_secret_in_a_config_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    """An inline secret in a config that anyone but its owner can read (e.g. the readers'
    group, as in the installed root:wxtoken 0640 layout): exit 78 naming the key."""
    path = tmp_path / "config.toml"
    path.write_text(GOOD_APP)
    path.chmod(mode)
    for command in ("check-config", "run"):
        result = run_cli(command, "--config", str(path))
        assert result.returncode == 78, result.stderr
        assert result.stderr.strip() == (
            f"wxtoken: {path}: apps.main.secret: an inline secret in a config file that "
            f"others can read (mode {mode:04o}); use secret_credential, secret_file or "
            "secret_env, or make the file readable by its owner only")


def test_config_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    """A config file in another encoding: exit 78, one line, no traceback."""
    path = tmp_path / "config.toml"
    path.write_bytes(GOOD_APP.encode() + b'# caf\xe9 latin-1\n')
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 78 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"wxtoken: {path}: the config is not UTF-8 text"


def test_defaults_match_the_contract(tmp_path: Path) -> None:
    """Unset keys take PRODUCT.md's defaults."""
    path = tmp_path / "config.toml"
    path.write_text(GOOD_APP)
    path.chmod(0o600)
    c = load_config(str(path))
    assert (c.state_dir, c.refresh_interval, c.renew_before, c.log_format) == (
        "/var/lib/wxtoken", 3600.0, 300.0, "auto")
    assert c.control_socket == "/run/wxtoken/control.sock" and c.metrics_file is None
    assert c.apps[0].api == "token" and c.apps[0].file_mode == 0o640


def test_example_config_documents_every_key_and_is_valid(tmp_path: Path) -> None:
    """config.example.toml parses (secrets from env) and mentions every key the parser knows."""
    from wxtoken.config import APP_KEYS, COMPONENT_KEYS, TOP_KEYS
    from wxtoken.redis_config import REDIS_KEYS
    text = (REPO / "config.example.toml").read_text()
    for key in TOP_KEYS | APP_KEYS | REDIS_KEYS:
        assert f"{key} =" in text or f"[{key}" in text, key
    for key in COMPONENT_KEYS:
        assert key in text, key
    config = load_config(str(REPO / "config.example.toml"), resolve_secrets=False)
    assert [a.name for a in config.apps] == ["main"]  # one Official Account; the rest commented
    assert config.redis is None  # the fleet table is shown commented out


REDIS_BROKEN = [
    ("no url", '[redis]\nkey_prefix = "x"\n', "redis.url: is required"),
    ("bad scheme", '[redis]\nurl = "http://h:6379"\n', "redis.url: must be a redis://"),
    ("bad port", '[redis]\nurl = "redis://h:70000/0"\n', "redis.url: port 70000 is out"),
    ("password twice", '[redis]\nurl = "redis://:pw@h/0"\npassword_env = "HOME"\n',
     "redis.url: has a password, and so does password_env: keep one"),
    ("sentinel format", '[redis]\nurl = "redis:///0"\nsentinels = ["h"]\n'
     'service_name = "m"\n', "redis.sentinels: must be \"host:port\""),
    ("sentinels without name", '[redis]\nurl = "redis:///0"\nsentinels = ["h:26379"]\n',
     "redis.service_name: is required with sentinels"),
    ("lease too long", '[redis]\nurl = "redis://h/0"\nlease_timeout = 300\n',
     "redis.lease_timeout: must lie between"),
    ("lease too short", '[redis]\nurl = "redis://h/0"\nlease_timeout = 5\n',
     "redis.lease_timeout: must lie between the upstream call's deadline (20 s)"),
    ("unknown mirror", '[redis]\nurl = "redis://h/0"\nmirror = ["easywechat"]\n',
     "redis.mirror: must be a list of one of wechatpy, wxjava, silenceper"),
    ("prefix with a brace", '[redis]\nurl = "redis://h/0"\nkey_prefix = "a{b"\n',
     "redis.key_prefix: must not contain braces"),
    ("unknown key", '[redis]\nurl = "redis://h/0"\ndb = 2\n', "redis.db: unknown key"),
    ("query options", '[redis]\nurl = "rediss://h/0?ssl_cert_reqs=none"\n',
     "redis.url: takes no query options"),
    ("db not a number", '[redis]\nurl = "redis://h/notadb"\n',
     "redis.url: the db must be a number, not 'notadb'"),
    ("unix db", '[redis]\nurl = "unix:///run/redis.sock?db=abc"\n',
     "redis.url: a unix:// URL takes only ?db=<number>"),
    ("a typo hides the password", '[redis]\nurl = "redsi://u:s3cr3t-pw@h/0"\n',
     "redis.url: must be a redis://, rediss:// or unix:// URL, not 'redsi://u:***@h/0'"),
]


@pytest.mark.parametrize(("name", "text", "fragment"), REDIS_BROKEN,
                         ids=[b[0] for b in REDIS_BROKEN])
def test_a_broken_redis_table_exits_78_naming_the_key(tmp_path: Path, name: str, text: str,
                                                      fragment: str) -> None:
    """Each broken [redis] value: exit 78, one line naming the key."""
    path = tmp_path / "config.toml"
    path.write_text(text + GOOD_APP)
    path.chmod(0o600)
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 78, (name, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines


def test_a_password_in_the_redis_url_follows_the_inline_secret_rule(tmp_path: Path) -> None:
    """A password inside the Redis URL is refused when others can read the config."""
    path = tmp_path / "config.toml"
    path.write_text('[redis]\nurl = "redis://wxtoken:s3cr3t-redis@h:6379/0"\n'
                    f'[apps.main]\nappid = "{APPID}"\nsecret_env = "HOME"\n')
    path.chmod(0o640)
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 78
    assert result.stderr.strip() == (
        f"wxtoken: {path}: redis.url: an inline password in a config file that others can "
        "read (mode 0640); use password_credential, password_file or password_env, or make "
        "the file readable by its owner only")
    path.chmod(0o600)
    ok = run_cli("check-config", "--config", str(path))
    assert ok.returncode == 0 and "s3cr3t-redis" not in ok.stdout


def test_an_app_without_a_secret_is_a_follower_only_in_the_fleet_mode(tmp_path: Path) -> None:
    """No secret source: an error on one host, a follower (no secret needed) on a fleet."""
    path = tmp_path / "config.toml"
    path.write_text(f'[apps.main]\nappid = "{APPID}"\n')
    path.chmod(0o600)
    assert run_cli("check-config", "--config", str(path)).returncode == 78
    path.write_text(f'[redis]\nurl = "redis://127.0.0.1:1/0"\n[apps.main]\nappid = "{APPID}"\n')
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "# no secret: this host follows the app (fleet mode)" in result.stdout
    assert load_config(str(path)).app("main").follower


def test_quota_watch_without_metrics_file_is_a_warning(tmp_path: Path) -> None:
    """quota_watch exports to metrics_file: without one check-config says it has no effect."""
    config = tmp_path / "c.toml"
    config.write_text(GOOD_APP + 'quota_watch = ["/cgi-bin/token"]\n')
    config.chmod(0o600)
    out = run_cli("check-config", "--config", str(config))
    assert out.returncode == 0
    assert f"wxtoken: warning: {config}: apps.main.quota_watch: has no effect without " \
        "metrics_file" in out.stderr
    assert 'quota_watch = ["/cgi-bin/token"]' in out.stdout


SECRET_FILES = [  # every secret that may come from a file, one rule
    ("apps.main.secret_file", "secret", '[apps.main]\nappid = "' + APPID
     + '"\nsecret_file = "{f}"\n'),
    ("redis.password_file", "password", '[redis]\nurl = "redis://h/0"\npassword_file = "{f}"\n'
     + GOOD_APP),
    ("components.p.msg_token_file", "msg_token", 'callback_listen = "127.0.0.1:8089"\n' + COMP
     + 'secret = "s"\nmsg_token_file = "{f}"\nencoding_aes_key = "' + "a" * 43 + '"\n'),
]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o444], ids=["0640", "0604", "0444"])
@pytest.mark.parametrize(("key", "kind", "text"), SECRET_FILES, ids=[s[0] for s in SECRET_FILES])
def test_a_secret_file_others_can_read_is_refused(tmp_path: Path, mode: int, key: str, kind: str,
                                                  text: str) -> None:
    """A secret in a file that others than its owner can read (the token readers' group, or
    everyone) is refused like an inline secret in such a config: exit 78, one line naming the
    key and the file. Owner-only (0600, 0400) passes."""
    secret = tmp_path / "the.secret"
    secret.write_text("file-s3cr3t-0123\n")
    secret.chmod(mode)
    path = tmp_path / "config.toml"
    path.write_text(text.replace("{f}", str(secret)))
    path.chmod(0o600)
    for command in ("check-config", "run"):
        result = run_cli(command, "--config", str(path))
        assert result.returncode == 78, result.stderr
        assert result.stderr.strip() == (
            f"wxtoken: {path}: {key}: {secret} is readable by others than its owner (mode "
            f"{mode:04o}); make it readable by its owner only (the daemon's user: chmod 0600), "
            f"or use {kind}_credential")
    for private in (0o600, 0o400):
        secret.chmod(private)
        ok = run_cli("check-config", "--config", str(path))
        assert ok.returncode == 0 and ok.stderr == "", ok.stderr


def test_a_secret_file_that_is_a_directory_names_the_path(tmp_path: Path) -> None:
    """secret_file naming a directory: the one line names the path, not a file descriptor."""
    path = tmp_path / "config.toml"
    path.write_text(f'[apps.main]\nappid = "{APPID}"\nsecret_file = "{tmp_path}"\n')
    path.chmod(0o600)
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 78
    assert result.stderr.strip() == (f"wxtoken: {path}: apps.main.secret_file: cannot read "
                                     f"'{tmp_path}': Is a directory")


def test_a_config_starting_with_a_utf8_bom_is_read(tmp_path: Path) -> None:
    """Windows editors (Notepad) save UTF-8 with a byte order mark: it is accepted."""
    path = tmp_path / "config.toml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD_APP.encode())
    path.chmod(0o600)
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert load_config(str(path)).app("main").appid == APPID


def test_check_config_prints_an_apps_tickets(tmp_path: Path) -> None:
    """check-config shows each app's tickets when it has some."""
    path = tmp_path / "config.toml"
    path.write_text(GOOD_APP + 'tickets = ["jsapi", "wx_card"]\n'
                    f'[apps.mini]\nappid = "{APPID2}"\nsecret = "{SECRET}-2"\n')
    path.chmod(0o600)
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    main, mini = result.stdout.split("[apps.main]")[1].split("[apps.mini]")
    assert 'tickets = ["jsapi", "wx_card"]' in main and "tickets" not in mini


def test_a_wecom_corpid_may_start_with_wx(tmp_path: Path) -> None:
    """Older WeCom corpids start with "wx": accepted like "ww"."""
    path = tmp_path / "config.toml"
    path.write_text(f'[apps.w]\napi = "wecom"\ncorpid = "wx{CORPID[2:]}"\nagentid = 1\n'
                    f'secret = "{SECRET}"\n')
    path.chmod(0o600)
    assert load_config(str(path)).app("w").appid == "wx" + CORPID[2:]


def test_a_missing_control_socket_directory_is_warned_about(tmp_path: Path) -> None:
    """control_socket in a directory that does not exist (or is a file): check-config warns
    (the daemon creates the socket, not its directory); an existing directory and the unit's
    RuntimeDirectory (/run/wxtoken, which systemd creates at start) are fine."""
    path = tmp_path / "config.toml"
    cases = {
        str(tmp_path / "nope" / "c.sock"): f"the directory {tmp_path / 'nope'} does not exist",
        str(path / "c.sock"): f"{path} is not a directory",
        str(tmp_path / "c.sock"): None,
        "/run/wxtoken/control.sock": None,
    }
    for sock, problem in cases.items():
        path.write_text(f'control_socket = "{sock}"\n' + GOOD_APP)
        path.chmod(0o600)
        result = run_cli("check-config", "--config", str(path))
        assert result.returncode == 0, result.stderr
        if problem is None:
            assert result.stderr == "", result.stderr
            assert load_config(str(path)).warnings == ()
        else:
            assert result.stderr.startswith(
                f"wxtoken: warning: {path}: control_socket: {problem}"), result.stderr
            assert len(result.stderr.splitlines()) == 1
