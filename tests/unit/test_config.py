from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest
from sqlalchemy import text

from orchestra.config import ModelSettings, ProviderSettings, Settings
from orchestra.config_file import load
from orchestra.db import Database
from orchestra.db.engine import check_url
from orchestra.db.schema import LATEST, upgrade
from orchestra.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load(None, env={})
    assert settings == Settings()
    assert settings.database.url == "sqlite+aiosqlite:///orchestra.db"
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8000)


def test_shipped_orchestra_toml_lists_every_setting_with_its_default() -> None:
    shipped = REPO / "orchestra.toml"
    assert load(shipped, env={}) == Settings()
    text = shipped.read_text()
    data = tomllib.loads(text)
    for section in msgspec.structs.fields(Settings):
        if section.name == "schedules":
            # None by default, and a `schedules = []` line would forbid the [[schedules]]
            # tables appended to the file: shown as a comment (see the next test).
            assert "#   [[schedules]]" in text and "schedules" not in data
            continue
        assert section.name in data, f"[{section.name}] missing from orchestra.toml"
        if not isinstance(section.type, type) or not issubclass(section.type, msgspec.Struct):
            continue  # a table of named entries, e.g. [models."NAME"]; checked below
        for key in msgspec.structs.fields(section.type):
            assert key.name in data[section.name], f"{section.name}.{key.name} missing"


def test_the_schedule_example_of_the_docs_appended_to_the_shipped_file_loads(
    tmp_path: Path,
) -> None:
    """orchestra.toml says to append schedules at its end; docs/schedules.md shows one."""
    docs = (REPO / "docs" / "schedules.md").read_text()
    example = docs.split("## In orchestra.toml", 1)[1].split("```toml\n", 1)[1].split("```")[0]
    assert example.startswith("[[schedules]]")
    file = tmp_path / "orchestra.toml"
    file.write_text((REPO / "orchestra.toml").read_text() + "\n" + example)
    settings = load(file, env={})
    [schedule] = settings.schedules
    assert (schedule.name, schedule.template, schedule.cron) == (
        "nightly-digest",
        "summarize",
        "30 2 * * *",
    )
    assert settings.webhooks == Settings().webhooks  # the last table is still whole


def test_shipped_orchestra_toml_shows_every_provider_and_model_setting() -> None:
    text = (REPO / "orchestra.toml").read_text()
    listed = {k for table in tomllib.loads(text)["providers"].values() for k in table}
    assert {f.name for f in msgspec.structs.fields(ProviderSettings)} <= listed
    for key in msgspec.structs.fields(ModelSettings):
        assert f"{key.name} = " in text, f"models: {key.name} not shown"


def test_file_values_and_environment_overrides(tmp_path: Path) -> None:
    file = tmp_path / "o.toml"
    file.write_text("[server]\nport = 7000\n[workers]\nconcurrency = 2\n")
    env = {
        "ORCHESTRA_SERVER__PORT": "9000",
        "ORCHESTRA_TEMPLATES__DIRS": '["/a", "/b"]',
        "ORCHESTRA_PROVIDERS__EMBEDDED__ENABLED": "false",
        "ORCHESTRA_MODELS__FAST": '["ollama/qwen2.5"]',
    }
    settings = load(file, env=env)
    assert settings.server.port == 9000
    assert settings.workers.concurrency == 2
    assert settings.templates.dirs == ["/a", "/b"]
    assert settings.providers["embedded"].enabled is False
    assert settings.chain("fast") == ["ollama/qwen2.5"]
    assert settings.chain("default") == ["ollama/llama3.2", "embedded/smollm2"]


def test_v1_ollama_table_is_the_provider_named_ollama(tmp_path: Path) -> None:
    file = tmp_path / "v1.toml"
    file.write_text('[ollama]\nurl = "http://gpu:11434"\ntimeout = 60\n')
    settings = load(file, env={})
    ollama = settings.providers["ollama"]
    assert (ollama.kind, ollama.url, ollama.timeout) == ("ollama", "http://gpu:11434", 60)
    assert settings.providers["embedded"].enabled  # the built-ins stay
    env = load(None, env={"ORCHESTRA_OLLAMA__URL": "http://env:1", "ORCHESTRA_CONFIG": ""})
    assert env.providers["ollama"].url == "http://env:1"
    file.write_text('[ollama]\nurl = "http://a:1"\n[providers.ollama]\nurl = "http://b:1"\n')
    with pytest.raises(ConfigError, match="both set"):
        load(file, env={})


def test_providers_and_model_chains(tmp_path: Path) -> None:
    file = tmp_path / "p.toml"
    file.write_text(
        '[providers.vllm]\nkind = "openai"\nurl = "http://gpu:8000/v1"\n'
        'api_key_env = "VLLM_KEY"\nmax_concurrency = 8\n'
        '[models]\ndefault = ["vllm/qwen", "embedded/smollm2"]\n'
        '[models.fast]\nchain = ["ollama/qwen2.5:0.5b"]\nmax_concurrency = 2\n'
    )
    settings = load(file, env={})
    assert settings.providers["vllm"].kind == "openai"
    assert list(settings.providers) == ["ollama", "embedded", "vllm"]
    assert settings.chain("default") == ["vllm/qwen", "embedded/smollm2"]
    assert settings.chain("fast") == ["ollama/qwen2.5:0.5b"]
    assert settings.model_limit("fast") == 2
    assert settings.chain("llama3.2") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[providers.x]\nurl = "http://h"\n', "providers.x.kind: required, but not set"),
        (
            '[providers.x]\nkind = "grpc"\n',
            "providers.x.kind: invalid enum value 'grpc' "
            "(expected one of ollama, openai, embedded)",
        ),
        ('[providers.x]\nkind = "openai"\n', "providers.x.url: expected a URL for this kind"),
        ('[providers.ollama]\nmodel_path = "/m.gguf"\n', "providers.ollama.model_path"),
        ('[models]\ndefault = ["nowhere/llama3.2"]\n', "models.default: expected"),
        ('[models]\ndefault = ["llama3.2"]\n', "models.default: expected"),
        ("[providers.ollama]\ntimout = 3\n", "providers.ollama.timout: unknown setting"),
    ],
)
def test_bad_provider_settings_are_named(tmp_path: Path, text: str, expected: str) -> None:
    file = tmp_path / "bad.toml"
    file.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(file, env={})
    assert expected.lower() in info.value.message.lower()


def test_per_model_limits(tmp_path: Path) -> None:
    file = tmp_path / "m.toml"
    file.write_text('[models."llama3.2"]\nmax_concurrency = 1\n')
    settings = load(file, env={})
    assert settings.model_limit("llama3.2") == 1
    assert settings.model_limit("qwen2.5") == 0
    file.write_text('[models."llama3.2"]\nmax_concurency = 1\n')
    with pytest.raises(ConfigError, match=r"models\.llama3\.2\.max_concurency: unknown setting"):
        load(file, env={})


def test_orchestra_config_variable_picks_the_file(tmp_path: Path) -> None:
    file = tmp_path / "x.toml"
    file.write_text("[server]\nport = 7123\n")
    assert load(None, env={"ORCHESTRA_CONFIG": str(file)}).server.port == 7123


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nprot = 1\n", "server.prot: unknown setting"),
        ("[sever]\nport = 1\n", "sever: unknown setting"),
        ('[server]\nport = "high"\n', "server.port: expected int, got str"),
        ("[workers]\nconcurrency = 0\n", "workers.concurrency: expected an integer >= 1"),
        # A tiny hang timeout would kill a process its beats could not keep up with.
        ("[server]\nhang_timeout = 0.01\n", "server.hang_timeout: expected 0 (never) or at least"),
        ("[server\n", "invalid TOML"),
        # A time past what a date holds: every cached step failed (ttl), every retention run.
        ("[cache]\nttl = inf\n", "cache.ttl: expected a number of seconds of at most 1000 y"),
        ("[cache]\nttl = 1e11\n", "cache.ttl: expected a number of seconds of at most 1000 y"),
        ("[retention]\ndays = inf\n", "retention.days: expected a number of days of at most"),
        ("[retention]\ndays = 1e6\n", "retention.days: expected a number of days of at most"),
        ("[ui]\nsession_hours = 1e9\n", "ui.session_hours: expected a number of hours of at"),
        # A login that lasted no time sent each page back to the login form, saying nothing.
        ("[ui]\nsession_hours = 0\n", "ui.session_hours: expected at least a minute (0.0167)"),
        ("[ui]\nsession_hours = -5\n", "ui.session_hours: expected at least a minute"),
        ("[workers]\nlease_seconds = inf\n", "workers.lease_seconds: expected a number of s"),
        ("[providers.ollama]\ntimeout = inf\n", "providers.ollama.timeout: expected a number"),
        ("[database]\nmin_free_mb = inf\n", "database.min_free_mb: expected a finite number"),
        ("[scheduler]\ngrace = nan\n", "scheduler.grace: expected a number of seconds of at"),
        # The loop wakes a moment after each tick: every tick was recorded as missed.
        ("[scheduler]\ngrace = 0\n", "scheduler.grace: expected at least 1 second"),
        ("[scheduler]\ngrace = 0.05\n", "scheduler.grace: expected at least 1 second"),
        # It started, and every call failed at run time.
        ('[providers.ollama]\nurl = "not-a-url"\n', "providers.ollama.url: expected an http"),
        ('[providers.ollama]\nurl = "ftp://h:1"\n', "providers.ollama.url: expected an http"),
        ('[providers.ollama]\nurl = "http://"\n', "providers.ollama.url: expected an http"),
        ('[providers.ollama]\nurl = "http://:11434"\n', "providers.ollama.url: expected an h"),
        ('[providers.ollama]\nurl = "http://h:abc/"\n', "providers.ollama.url: expected an h"),
        ('[providers.ollama]\nurl = "http://[::1:11434"\n', "providers.ollama.url: expected an"),
        ('[providers.ollama]\nurl = "https://h/v1#x"\n', "providers.ollama.url: expected an h"),
        # httpx sends the URL's user as Basic auth, over the key's Bearer: the key never went.
        (
            '[providers.x]\nkind = "openai"\nurl = "https://u:p@h/v1"\napi_key_env = "K"\n',
            "providers.x.url: expected no user:password@ in the url when api_key_env is set",
        ),
    ],
)
def test_bad_file_names_file_key_and_expectation(tmp_path: Path, text: str, expected: str) -> None:
    file = tmp_path / "bad.toml"
    file.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(file, env={})
    assert str(file) in info.value.message
    assert expected in info.value.message
    assert "\n" not in info.value.message


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(None, env={"ORCHESTRA_SERVER__PORT": "ninety", "ORCHESTRA_CONFIG": ""})
    assert "ORCHESTRA_SERVER__PORT" in info.value.message
    assert "server.port" in info.value.message


def test_of_two_environment_overrides_the_bad_one_is_named(tmp_path: Path) -> None:
    """Each provider was checked strictly, so the first holding any string from the
    environment ("5") was blamed, not the one that was wrong."""
    file = tmp_path / "e.toml"
    file.write_text("")
    env = {
        "ORCHESTRA_PROVIDERS__OLLAMA__TIMEOUT": "5",
        "ORCHESTRA_PROVIDERS__EMBEDDED__THREADS": "abc",
    }
    with pytest.raises(ConfigError) as info:
        load(file, env=env)
    assert "ORCHESTRA_PROVIDERS__EMBEDDED__THREADS" in info.value.message, info.value.message
    assert "providers.embedded.threads" in info.value.message


def test_an_environment_override_reaches_a_named_entry_whatever_its_case(tmp_path: Path) -> None:
    """``[providers.GPU]`` is ORCHESTRA_PROVIDERS__GPU__…: variables are upper case; it made
    a provider ``gpu`` of its own, without a kind."""
    file = tmp_path / "p.toml"
    file.write_text('[providers.GPU]\nkind = "ollama"\nurl = "http://gpu:11434"\n')
    settings = load(file, env={"ORCHESTRA_PROVIDERS__GPU__TIMEOUT": "5"})
    assert settings.providers["GPU"].timeout == 5 and "gpu" not in settings.providers


def test_an_environment_override_of_a_model_keeps_its_chain(tmp_path: Path) -> None:
    """``fast = ["ollama/llama3.2"]`` with ORCHESTRA_MODELS__FAST__MAX_CONCURRENCY=1: the
    list was replaced by the variable's table, and ``fast`` stopped naming its chain."""
    file = tmp_path / "m.toml"
    file.write_text('[models]\nfast = ["ollama/llama3.2"]\n')
    settings = load(file, env={"ORCHESTRA_MODELS__FAST__MAX_CONCURRENCY": "1"})
    assert settings.chain("fast") == ["ollama/llama3.2"]
    fast = settings.models["fast"]
    assert isinstance(fast, ModelSettings) and fast.max_concurrency == 1


def test_a_built_in_model_name_keeps_its_chain_when_another_key_of_it_is_set(
    tmp_path: Path,
) -> None:
    """``[models.default] max_concurrency = 1`` (or its variable) left ``default`` without a
    chain: every task naming no model had none (review)."""
    built_in = Settings().chain("default")
    assert built_in
    file = tmp_path / "d.toml"
    file.write_text("[models.default]\nmax_concurrency = 1\n")
    for settings in (
        load(file, env={}),
        load(None, env={"ORCHESTRA_MODELS__DEFAULT__MAX_CONCURRENCY": "1", "ORCHESTRA_CONFIG": ""}),
    ):
        assert settings.chain("default") == built_in
        assert settings.model_limit("default") == 1


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "missing.toml", env={})
    assert "missing.toml: cannot read the settings file" in info.value.message


def test_serve_with_bad_config_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    file = tmp_path / "bad.toml"
    file.write_text('[server]\nport = "x"\n')
    done = subprocess.run(
        [sys.executable, "-m", "orchestra", "serve", "--config", str(file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"Error: {file}: server.port: expected int, got str"]


def test_serve_refuses_a_scheduler_grace_that_would_count_every_tick_as_missed(
    tmp_path: Path,
) -> None:
    """``grace = 0`` started, and no schedule ever fired: the loop wakes a few ms after each
    tick, and every tick was past the grace, recorded as missed."""
    file = tmp_path / "orchestra.toml"
    db = f"sqlite+aiosqlite:///{tmp_path / 'o.db'}"  # were it to start: nothing shared
    file.write_text(f'[server]\nport = 0\n[database]\nurl = "{db}"\n[scheduler]\ngrace = 0\n')
    done = subprocess.run(
        [sys.executable, "-m", "orchestra", "serve", "--config", str(file)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Error: {file}: scheduler.grace: "), lines


async def test_a_sqlite_path_starting_with_a_tilde_is_in_the_home_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """As in a shell: not a folder named ``~`` in the current one; for the writer and the
    reads alike (the reads' engine was given the URL as written, which SQLite does not
    expand)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    url = "sqlite+aiosqlite:///~/data/o.db"
    assert check_url(url) == tmp_path / "home" / "data" / "o.db"
    database = Database(url)
    try:
        await upgrade(database)
        async with database.read() as conn:
            version = (await conn.execute(text("SELECT max(version) FROM schema_version"))).scalar()
        assert version == LATEST
    finally:
        await database.close()
    assert not (tmp_path / "~").exists()


def test_a_word_setting_out_of_its_choices_names_them() -> None:
    with pytest.raises(ConfigError) as caught:
        load(env={"ORCHESTRA_LOGGING__LEVEL": "DEBUG"})
    assert "logging.level: invalid enum value 'DEBUG'" in str(caught.value)
    assert "(expected one of debug, info, warning, error)" in str(caught.value)
