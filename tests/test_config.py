"""One git config snapshot per process: multi-valued keys, precedence, and http.<url>.* matched
the way ``git config --get-urlmatch`` matches it, reaching the LFS client's HTTP session."""

import pytest

from git_theta.remote.batch import LfsClient
from git_theta.remote.endpoint import Endpoint
from git_theta.git.repo import Repo
from git_theta.config import Settings, config_key, forget, read_git_config, settings_for

HTTP_CONFIG = """
[http]
    sslVerify = true
    proxy = http://proxy.example:3128
[http "https://lfs.example.com"]
    sslVerify = false
[http "https://lfs.example.com/team/secure.git"]
    sslVerify = true
    sslCAInfo = /etc/team-ca.pem
[http "https://*.example.org"]
    sslVerify = false
[http "https://alice@git.example.net/"]
    sslVerify = false
[http "http://plain.example.com:8080/"]
    proxy = http://other-proxy:1
"""

URLS = [
    "https://lfs.example.com/info/lfs",
    "https://lfs.example.com/team/secure.git/info/lfs",
    "https://lfs.example.com/team/secure.gitx/info/lfs",
    "https://LFS.example.com:443/team/model.git/info/lfs",
    "http://lfs.example.com/info/lfs",
    "https://a.example.org/x.git/info/lfs",
    "https://a.b.example.org/x.git/info/lfs",
    "https://alice@git.example.net/x.git/info/lfs",
    "https://bob@git.example.net/x.git/info/lfs",
    "https://git.example.net/x.git/info/lfs",
    "http://plain.example.com:8080/r.git/info/lfs",
    "http://plain.example.com/r.git/info/lfs",
    "https://elsewhere.example/r.git/info/lfs",
]


@pytest.fixture
def http_repo(repo):
    with open(repo.path / ".git" / "config", "a") as handle:
        handle.write(HTTP_CONFIG)
    forget()
    yield Repo(repo.path)
    forget()


@pytest.mark.parametrize("name", ["sslVerify", "sslCAInfo", "proxy"])
def test_url_values_match_git_get_urlmatch(http_repo, repo, name):
    settings = settings_for(http_repo)
    for url in URLS:
        proc = repo.git("config", "--get-urlmatch", f"http.{name}", url, check=False)
        expected = proc.stdout.strip() or None
        assert settings.url_value("http", name, url) == expected, url


def test_the_url_specific_ssl_verify_reaches_the_http_session(http_repo, monkeypatch):
    monkeypatch.delenv("GIT_SSL_NO_VERIFY", raising=False)
    monkeypatch.delenv("GIT_SSL_CAINFO", raising=False)
    settings = settings_for(http_repo)

    def session(url):
        client = LfsClient(Endpoint("origin", "http", url=url), http_repo, settings)
        try:
            return client._session
        finally:
            client.close()

    assert session("https://lfs.example.com/team/model.git/info/lfs").verify is False
    secure = session("https://lfs.example.com/team/secure.git/info/lfs")
    assert secure.verify == "/etc/team-ca.pem"
    assert secure.proxies == {"http": "http://proxy.example:3128", "https": "http://proxy.example:3128"}
    assert session("https://elsewhere.example/r.git/info/lfs").verify is True
    monkeypatch.setenv("GIT_SSL_NO_VERIFY", "1")  # git's variable wins over config
    assert Settings(read_git_config(http_repo.cwd)).ssl_verify("https://lfs.example.com/team/secure.git") is False


def test_git_tls_settings_win_over_requests_ca_bundle(http_repo, monkeypatch):
    """requests would let REQUESTS_CA_BUNDLE replace the session's CA bundle; git's setting wins."""
    monkeypatch.delenv("GIT_SSL_NO_VERIFY", raising=False)
    monkeypatch.delenv("GIT_SSL_CAINFO", raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/elsewhere-ca.pem")
    settings = settings_for(http_repo)
    sent = {}

    class Sent(Exception):
        pass

    def request(url):
        client = LfsClient(Endpoint("origin", "http", url=url), http_repo, settings)

        def send(prepared, **kwargs):
            sent[url] = kwargs["verify"]
            raise Sent

        client._session.send = send
        try:
            with pytest.raises(Sent):
                client.batch("download", [])
        finally:
            client.close()
        return sent[url]

    assert request("https://lfs.example.com/team/secure.git/info/lfs") == "/etc/team-ca.pem"
    assert request("https://lfs.example.com/team/model.git/info/lfs") is False
    # no git setting: requests' own environment applies, as it would for any requests user
    assert request("https://elsewhere.example/r.git/info/lfs") == "/etc/elsewhere-ca.pem"


def test_snapshot_is_multi_valued_in_order_and_read_once(repo, monkeypatch):
    repo.git("config", "--add", "theta.merge.rule", "lm_head.* ours")
    repo.git("config", "--add", "theta.merge.rule", "* ties")
    repo.git("config", "remote.Upper.lfsurl", "https://u.example/x")
    repo.git("config", "theta.threads", "3")
    forget()
    r = Repo(repo.path)
    settings = settings_for(r)
    assert settings.values("theta.merge.rule") == ["lm_head.* ours", "* ties"]
    assert settings.value("theta.merge.rule") == "* ties"  # the last, as git config --get
    assert settings.value("remote.Upper.LFSURL") == "https://u.example/x"  # subsection keeps case
    assert settings.value("remote.upper.lfsurl") is None
    assert settings.get_int("threads") == 3
    monkeypatch.setenv("GIT_THETA_THREADS", "5")  # environment > config
    assert settings.get_int("threads") == 5
    assert Settings(settings._items, overrides={"threads": 7}).get_int("threads") == 7  # flag > env
    calls = []
    monkeypatch.setattr("git_theta.config.read_git_config", lambda cwd: calls.append(cwd) or [])
    settings_for(r), settings_for(Repo(repo.path))
    assert calls == []  # one read per process and repository


def test_keys_without_value_and_spelling():
    settings = Settings([("core.bare", None), ("http.https://h.example/.sslverify", "no")])
    assert settings.value("core.bare") == "true"
    assert settings.url_value("http", "sslVerify", "https://h.example/x") == "no"
    assert settings.ssl_verify("https://h.example/x") is False
    assert config_key("Remote.Origin.LfsUrl") == "remote.Origin.lfsurl"
    assert config_key("theta.memoryBudget") == "theta.memorybudget"


@pytest.mark.parametrize(
    "value, expected",
    [("512m", 512 << 20), ("48M", 48 << 20), ("2g", 2 << 30), ("64k", 64 << 10), ("1_000", 1000), ("0x10", 16)],
)
def test_integers_take_gits_unit_suffixes(value, expected):
    assert Settings([("theta.memorybudget", value)]).get_int("memoryBudget") == expected


@pytest.mark.parametrize("value", ["12q", "m", "lots", "1.5g"])
def test_an_integer_that_is_not_one_names_the_setting(value):
    from git_theta.errors import ConfigError

    with pytest.raises(ConfigError, match=r"theta\.memoryBudget must be an integer") as caught:
        Settings([("theta.memorybudget", value)]).get_int("memoryBudget")
    assert "k, m or g" in caught.value.hint
