"""The resources of a running service, owned by the app's lifespan.

Everything is opened in :meth:`Runtime.lifespan` and closed in ``finally`` blocks in reverse
order: database, then the shared HTTP client, then the worker pool. The lifespan starts with
:func:`prepare` (load the template files, upgrade the database, know the stored template
versions, maybe make the first admin key), each done once, before the server accepts a
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from orchestra import logs, upkeep
from orchestra.api.auth import Gatekeeper
from orchestra.api.sse import Frames
from orchestra.api.stream_slots import StreamSlots
from orchestra.auth import ApiKey, bootstrap_key, is_loopback
from orchestra.batches import BatchService
from orchestra.bulk import BulkService
from orchestra.catalog import TemplateCatalog, parse_elsewhere
from orchestra.config import Settings
from orchestra.db import Database, TaskStore
from orchestra.db.batches import BatchStore
from orchestra.db.cache import CacheStore
from orchestra.db.failures import warn_when_low
from orchestra.db.keys import KeyStore
from orchestra.db.overview import DashboardStore
from orchestra.db.schedules import ScheduleStore
from orchestra.db.schema import upgrade
from orchestra.db.sessions import SessionStore
from orchestra.db.templates import TemplateStore
from orchestra.db.webhooks import WebhookStore
from orchestra.errors import ConfigError, OrchestraError, StorageError, TemplateError
from orchestra.feed import EventFeed
from orchestra.llm.cache import AnswerCache
from orchestra.llm.embedded import warn_unserved
from orchestra.llm.providers import build_providers
from orchestra.llm.router import Router
from orchestra.llm.transport import model_client
from orchestra.notify import TaskSignals
from orchestra.runner import Runner
from orchestra.scheduler import ScheduleLoop, ScheduleService
from orchestra.shared_read import DATABASE_ANSWER_SECONDS, SharedReads
from orchestra.tasks import TaskService
from orchestra.templating.isolation import Renderer
from orchestra.templating.registry import TemplateRegistry
from orchestra.webhook_sender import WebhookSender
from orchestra.webhooks import WebhookService
from orchestra.worker import WorkerPool

log = logs.get("orchestra.runtime")


class NotStarted(RuntimeError):
    """The service is used before its lifespan started it."""


#: Shows the admin key a first start made (its token, this once).
ShowKey = Callable[[ApiKey, str], None]


class Runtime:
    """Holds what the lifespan opened; the controllers reach services through it.

    ``show_key``: when given, a first start beyond loopback makes an admin key
    (:func:`~orchestra.auth.bootstrap_key`) and passes it here, as ``orchestra serve`` does.
    """

    def __init__(
        self,
        settings: Settings,
        registry: TemplateRegistry,
        env: Mapping[str, str],
        *,
        show_key: ShowKey | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.env = env
        self.show_key = show_key
        #: What stopped the lifespan from starting (ConfigError, TemplateError): the server
        #: only learns that startup failed, so ``orchestra serve`` prints this.
        self.startup_error: OrchestraError | None = None
        #: A stop was asked for (:meth:`request_stop`).
        self.stopping = False
        #: Requests the database refused: logged once, then every 10 s while they go on
        #: (with how many); an outage under load made a warning per request (16 a second).
        self.refused = logs.Outage(
            logs.get("orchestra.api"), "api.storage_failed", every=10.0, ends_after=10.0
        )
        #: Scrapes that found the task counts unreadable: a line an outage (and a minute);
        #: ``metrics.counts_recovered`` when they read again.
        self.unscraped = logs.Outage(logs.get("orchestra.metrics"), "metrics.counts_failed")
        #: The task counts a scrape reads, shared by scrapes meanwhile and waited for a
        #: bounded time (a database that does not answer is ``orchestra_database_up 0``).
        self.scraped_counts = SharedReads(DATABASE_ANSWER_SECONDS)
        #: Event streams each API key holds open (``[auth] max_streams_per_key``).
        self.streams = StreamSlots(settings.auth.max_streams_per_key)
        self._db: Database | None = None
        self._tasks: TaskService | None = None
        self._router: Router | None = None
        self._pool: WorkerPool | None = None
        self._signals: TaskSignals | None = None
        self._catalog: TemplateCatalog | None = None
        self._gatekeeper: Gatekeeper | None = None
        self._keys: KeyStore | None = None
        self._dashboard: DashboardStore | None = None
        self._sessions: SessionStore | None = None
        self._bulk: BulkService | None = None
        self._schedules: ScheduleService | None = None
        self._webhooks: WebhookService | None = None
        self._feed: EventFeed | None = None
        #: The event streams' encoded frames, shared by their followers.
        self.frames = Frames()

    @property
    def db(self) -> Database:
        if self._db is None:
            raise NotStarted()
        return self._db

    @property
    def feed(self) -> EventFeed:
        """The one reader of every task's events that every event stream follows."""
        if self._feed is None:
            raise NotStarted()
        return self._feed

    @property
    def tasks(self) -> TaskService:
        if self._tasks is None:
            raise NotStarted()
        return self._tasks

    @property
    def router(self) -> Router:
        if self._router is None:
            raise NotStarted()
        return self._router

    @property
    def pool(self) -> WorkerPool | None:
        return self._pool

    @property
    def gatekeeper(self) -> Gatekeeper:
        """Checks API keys (available while the service runs)."""
        if self._gatekeeper is None:
            raise RuntimeError("the service is not running")
        return self._gatekeeper

    @property
    def keys(self) -> KeyStore:
        """API keys (the dashboard's key pages)."""
        if self._keys is None:
            raise NotStarted()
        return self._keys

    @property
    def dashboard(self) -> DashboardStore:
        """The dashboard's reads: counts, overview, filtered pages."""
        if self._dashboard is None:
            raise NotStarted()
        return self._dashboard

    @property
    def bulk(self) -> BulkService:
        """Cancel or retry many tasks at once (the dashboard's bulk actions)."""
        if self._bulk is None:
            raise NotStarted()
        return self._bulk

    @property
    def batches(self) -> BatchService:
        """Batches over datasets (a view over the store, the tasks and the bulk actions)."""
        return BatchService(
            BatchStore(self.db),
            self.tasks,
            self.bulk,
            lease_seconds=self.settings.workers.lease_seconds,
        )

    @property
    def webhooks(self) -> WebhookService:
        """Webhook subscriptions and their deliveries."""
        if self._webhooks is None:
            raise NotStarted()
        return self._webhooks

    @property
    def schedules(self) -> ScheduleService:
        """Schedules: tasks submitted on a cron expression or every so often."""
        if self._schedules is None:
            raise NotStarted()
        return self._schedules

    @property
    def sessions(self) -> SessionStore:
        """Dashboard login sessions."""
        if self._sessions is None:
            raise NotStarted()
        return self._sessions

    @property
    def catalog(self) -> TemplateCatalog:
        if self._catalog is None:
            raise NotStarted()
        return self._catalog

    def reload_templates(self) -> None:
        """Read the template files again (SIGHUP); on problems, log them and keep the old set."""
        if self._catalog is None:
            return
        try:
            self._catalog.reload()
        except TemplateError as exc:
            log.error("templates.reload_failed", problems=[str(p) for p in exc.problems])
        except Exception:  # a bug must not escape the signal handler: the old set stays
            log.exception("templates.reload_failed")

    def request_stop(self, *, hurry: bool = False) -> None:
        """Stop claiming tasks now, and answer the requests waiting for a task's end
        (called when SIGTERM/SIGINT arrives); ``hurry`` (a second Ctrl-C): hand back the
        running tasks now, without waiting for ``shutdown_grace``."""
        self.stopping = True
        if self._pool is not None:
            if hurry:
                self._pool.hurry()
            else:
                self._pool.request_stop()
        if self._signals is not None:
            self._signals.stop()
        if self._feed is not None:
            self._feed.close()

    @property
    def owner(self) -> str:
        """This process's worker pool's name ("": it runs no workers)."""
        return self._pool.owner if self._pool is not None else ""

    async def rescue(self, owner: str, cause: str) -> None:
        """Another process of this service died (``cause``): return its worker pool's
        (``owner``) tasks to the queue now, not when their leases expire."""
        wake = self._pool.notify if self._pool is not None else (lambda: None)
        await upkeep.rescue(self.tasks.store, owner, cause, wake)

    @contextmanager
    def _startup_failure(self) -> Iterator[None]:
        """Keep an error that stops startup, for the CLI to print (uvicorn only exits)."""
        try:
            yield
        except OrchestraError as exc:
            self.startup_error = exc
            raise

    @asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
        """Open everything, start the workers; on exit, stop and close in reverse order."""
        s = self.settings
        with self._startup_failure():
            db = _open(s)
        renderer = Renderer(s.limits)  # its processes start when first needed
        try:
            catalog = TemplateCatalog(
                self.registry,
                TemplateStore(db),
                s.limits,
                parse=functools.partial(parse_elsewhere, renderer),
            )
            with self._startup_failure():
                made = await prepare(db, catalog, s, bootstrap=self.show_key is not None)
            if made is not None and self.show_key is not None:
                self.show_key(*made)
            self._keys = KeyStore(db)
            self._gatekeeper = Gatekeeper(self._keys, s.auth, loopback=is_loopback(s.server.host))
            if s.auth.rate_limit_per_minute:  # it counts a key only once it knows the keys
                with contextlib.suppress(StorageError):  # the first request reads them again
                    await self._gatekeeper.keys()
            self._dashboard = DashboardStore(db)
            self._sessions = SessionStore(db)
            self._catalog = catalog
            # One client for every model call; it honours the proxies named in the environment
            # (one it cannot use, as SOCKS without its extra, stops the start like a setting).
            with self._startup_failure():
                shared_client = model_client(max(10, s.workers.concurrency * 2), self.env)
            async with shared_client as client:
                signals = self._signals = TaskSignals()
                # One reader of every task's events for every stream, however many follow.
                feed = EventFeed(db, signals)
                await feed.start()
                store = TaskStore(db, on_change=signals.publish, on_progress=signals.progressed)
                with self._startup_failure():  # a provider's settings that cannot work
                    router = Router(build_providers(s, client, self.env), s)
                warn_unserved(router.chains(), router.providers)
                # Known before the first task is claimed: which providers answer, with which
                # models (each check is bounded by a 2 s timeout).
                await router.refresh()
                await router.start()  # the embedded model's preload, in the background
                watcher = asyncio.create_task(router.watch(), name="provider-health")
                disk = asyncio.create_task(
                    warn_when_low(db.free_mb, s.database.min_free_mb, db.where), name="disk-watch"
                )
                # The cache of model answers (docs/cache.md), in the database every process shares.
                answers = AnswerCache(CacheStore(db), s.cache) if s.cache.enabled else None
                pool = WorkerPool(
                    store,
                    self.registry,
                    Runner(router, renderer, s.limits, answers),
                    s,
                    refresh=catalog.refresh,
                )
                db.on_recovered = pool.notify  # writes work again: claim now, not after a pause

                # Other processes' submits and changes: their NOTIFY on PostgreSQL, their
                # commits on SQLite; the workers and waiting requests need not wait to poll.
                def queued() -> None:  # and the feed reads their task.queued events
                    pool.notify()
                    feed.wake()

                def changed(task_ids: Collection[int] | None, progress: bool) -> None:
                    signals.remote(task_ids, progress)
                    if not progress and s.server.workers:  # a cancel for a task running here?
                        pool.others_changed(task_ids)

                listener = asyncio.create_task(db.watch(queued, changed), name="database-watch")
                # Templates other processes register or delete.
                following = asyncio.create_task(catalog.follow(), name="templates-follow")
                reader = asyncio.create_task(feed.run(), name="event-feed")
                self._db, self._router, self._pool, self._feed = db, router, pool, feed
                # The outbox's sender: its own loop and HTTP client, never in a worker's way.
                # The service's own address: no webhook may call it (it would come from
                # loopback, which an open service takes for this machine's own user).
                own = (s.server.host, s.server.port)
                sender = WebhookSender(WebhookStore(db), s.webhooks, signals, own=own)
                self._webhooks = WebhookService(
                    WebhookStore(db), s.webhooks, sender.notify, own=own
                )
                self._tasks = TaskService(
                    store,
                    self.registry,
                    signals,
                    pool,
                    feed=feed,
                    default_max_attempts=s.workers.max_attempts,
                    limits=s.limits,
                    pin=catalog.pin,
                    refresh=catalog.refresh,
                    callbacks=self._webhooks,
                )
                self._bulk = BulkService(store, self._dashboard, pool)
                # Schedules: orchestra.toml's synced at each start; their ticks are fired by
                # every process that runs workers (the database makes each tick fire once).
                schedules = ScheduleService(ScheduleStore(db), self._tasks)
                with self._startup_failure():
                    await schedules.sync(s.schedules)
                ticker: asyncio.Task[None] | None = None
                if s.server.workers:
                    ticks = ScheduleLoop(
                        schedules,
                        interval=s.scheduler.interval,
                        grace=s.scheduler.grace,
                        queued=queued,  # the workers, and the feed: its task.queued
                    )
                    schedules.wake = ticks.wake
                    ticker = asyncio.create_task(ticks.run(), name="schedules")
                self._schedules = schedules
                if s.server.workers:  # else (--no-workers) other processes run the tasks
                    await pool.start()
                await sender.start()
                hangup = _on_sighup(self.reload_templates)
                try:
                    yield
                finally:
                    hangup()
                    if ticker is not None:  # no tick fires while the workers stop
                        ticker.cancel()
                        await asyncio.gather(ticker, return_exceptions=True)
                    await sender.stop()  # in-flight deliveries are handed back
                    if s.server.workers:
                        await pool.stop()
                    background = (watcher, disk, listener, following, reader)
                    for job in background:
                        job.cancel()
                    await asyncio.gather(*background, return_exceptions=True)
                    await router.close()
                    self._tasks = self._router = None
                    self._bulk = None
                    self._schedules = None
                    self._webhooks = None
                    self._feed = None
                    self._signals = None
        finally:
            await renderer.close()
            self._db = None
            self._catalog = None
            self._keys = self._dashboard = self._sessions = None
            await db.close()


def _open(settings: Settings) -> Database:
    """The database the settings name (opened lazily: :func:`prepare` finds whether it works).

    Raises:
        ConfigError: the URL names no usable database, or its folder cannot be made.
    """
    url = settings.database.url
    try:
        return Database(url, **settings.database.engine_options())
    except (FileExistsError, NotADirectoryError) as exc:  # a folder on its path is a file
        raise ConfigError(
            f"database.url: cannot open {url}: {exc.filename} is a file, not a folder"
        ) from None
    except OSError as exc:
        raise ConfigError(f"database.url: cannot open {url}: {exc}") from None


async def prepare(
    db: Database, catalog: TemplateCatalog, settings: Settings, *, bootstrap: bool
) -> tuple[ApiKey, str] | None:
    """The start of the lifespan, each step once: load the template files, upgrade the
    database, then know the registered versions beside the files (no name clash) and the file
    versions that unfinished tasks pinned. With ``bootstrap``, on a first start beyond this machine,
    make an admin key (:func:`~orchestra.auth.bootstrap_key`).

    Returns:
        The admin key made and its token, for the caller to show once; None when none was.

    Raises:
        ConfigError: the database cannot be used.
        TemplateError: a template file is invalid, or clashes with a registered template.
    """
    loaded = catalog.registry.load()  # first: broken files leave the database untouched
    log.info("templates.loaded", files=len(loaded))
    try:
        version = await upgrade(db)
        log.info("database.ready", where=db.where, schema_version=version)
        await catalog.start()
        if not bootstrap:
            return None
        return await bootstrap_key(KeyStore(db), settings.server.host, settings.auth)
    except OSError as exc:
        raise ConfigError(f"database.url: cannot open {db.where}: {exc}") from None


def _on_sighup(callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` on SIGHUP (reload templates, as daemons do); returns the undo."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, callback)
    except (NotImplementedError, RuntimeError, ValueError):  # no signals here (not main thread)
        return lambda: None

    def undo() -> None:
        loop.remove_signal_handler(signal.SIGHUP)

    return undo
