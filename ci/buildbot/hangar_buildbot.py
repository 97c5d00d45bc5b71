# Hangar latent workers for Buildbot.
#
# In master.cfg, with this file next to it (the master's directory is on
# its Python path); master.cfg.example here is a complete one:
#
#     from hangar_buildbot import HangarLatentWorker
#     c['secretsProviders'] = [secrets.SecretInAFile(dirname=os.path.join(basedir, 'secrets'))]
#     c['workers'] = [HangarLatentWorker('linux-1', hangar_url='https://hangar.example:7878',
#                                        pool='linux', token=util.Secret('hangar-token'))]
#
# Every substantiation leases an instance from the pool with a fresh random
# password; the instance's bootstrap (builtin:buildbot-worker.sh) starts a
# buildbot-worker with it that connects back to this master. When the worker
# has been idle for build_wait_timeout the lease is released and the
# instance goes back to the pool, warm for the next build.
#
# Written against the API that Buildbot 3.7 (Debian bookworm) and current
# Buildbot share; the one difference, the HTTP client's entry point, is
# feature-detected.

import datetime
import json
import re
import secrets
import socket
import string
import time

from twisted.internet import defer
from twisted.python import log

from buildbot import config
from buildbot.interfaces import IRenderable
from buildbot.interfaces import LatentWorkerFailedToSubstantiate
from buildbot.util import asyncSleep
from buildbot.util import httpclientservice
from buildbot.worker import AbstractLatentWorker
from buildbot.worker.latent import States

__all__ = ["HangarLatentWorker", "parse_duration"]

# Hangar's rule for worker names (pool/lease.go).
_WORKER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def parse_duration(value):
    """Seconds in value: a number of seconds or a Go-style duration such as
    "90s", "10m" or "1h30m". Raises ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        pos, seconds = 0, 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(text):
            raise ValueError(f"{value!r} is not a duration such as 90s, 10m or 1h30m")
    else:
        raise ValueError(f"{value!r} is not a duration such as 90s, 10m or 1h30m")
    if seconds != seconds or seconds < 0:
        raise ValueError(f"{value!r} is not a duration such as 90s, 10m or 1h30m")
    return seconds


def _format_duration(seconds):
    # Hangar parses Go durations; whole milliseconds are plenty.
    return f"{max(int(seconds * 1000), 0)}ms"


def _parse_time(text):
    """Seconds since the epoch of Hangar's RFC 3339 time, or None."""
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", text or "")
    if not m:
        return None
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    frac = (m.group(2) or "0")[:6].ljust(6, "0")
    try:
        return datetime.datetime.fromisoformat(f"{m.group(1)}.{frac}{tz}").timestamp()
    except ValueError:
        return None


class HangarError(Exception):
    """An answer of Hangar's API other than the one asked for."""

    def __init__(self, status, message, code=""):
        super().__init__(message)
        self.status = status
        self.code = code


class HangarLatentWorker(AbstractLatentWorker):
    """A latent worker whose instances are leased from a Hangar pool.

    hangar_url: Hangar's API, e.g. "http://127.0.0.1:7878".
    pool: the pool to lease from.
    token: a bearer token with the lease role (a string or a Secret); None
        for a Hangar whose API is open (loopback only).
    wait: how long one substantiation waits for an instance, in seconds or
        as a duration such as "10m"; when it runs out the substantiation
        fails with the pool's last launch error.
    discard: terminate the instance when the worker stops instead of giving
        it back to the pool. An instance whose worker never connected, or
        lost its connection without being asked to, is always discarded.
    masterFQDN: the host name instances connect to; the port is the master's
        worker (pb) port. Default: socket.getfqdn().
    password: None (the default) gives every substantiation, hence every
        instance, its own random password.
    Everything else, build_wait_timeout included, is AbstractLatentWorker's.
    """

    # A pending lease is asked after in long polls of at most this many
    # seconds: a master that is stopping waits for start_instance, so no
    # longer than one poll.
    poll_seconds = 20
    # The HTTP timeout beyond a long poll's own wait.
    http_slack_seconds = 30
    # Calls that got no answer from Hangar are retried with this backoff.
    retry_initial_seconds = 1
    retry_max_seconds = 15
    release_attempts = 5

    _http = None
    _lease_id = None
    _instance_id = None
    _renew_call = None
    _worker_attached = False
    _worker_lost = False
    _stopping = False

    def checkConfig(self, name, password=None, hangar_url=None, pool=None, token=None,
                    wait="10m", discard=False, masterFQDN=None, **kwargs):
        super().checkConfig(name, password, **kwargs)
        if not isinstance(name, str) or not _WORKER_NAME.match(name):
            config.error(f"HangarLatentWorker {name!r}: Hangar needs a worker name of 1-63 "
                         "letters, digits, '.', '_' or '-', starting with a letter or digit")
        if not isinstance(hangar_url, str) or not re.match(r"^https?://[^/?#]+(/[^?#]*)?$", hangar_url):
            config.error(f"HangarLatentWorker {name!r}: hangar_url must be Hangar's "
                         f"http:// or https:// URL, got {hangar_url!r}")
        if not isinstance(pool, str) or not pool:
            config.error(f"HangarLatentWorker {name!r}: pool must name a Hangar pool")
        try:
            if parse_duration(wait) <= 0:
                config.error(f"HangarLatentWorker {name!r}: wait must be more than 0s")
        except ValueError as e:
            config.error(f"HangarLatentWorker {name!r}: wait: {e}")
        if token is not None and not isinstance(token, str) and not IRenderable.providedBy(token):
            config.error(f"HangarLatentWorker {name!r}: token must be a string or a "
                         f"util.Secret, got {type(token).__name__}")
        if not isinstance(discard, bool):
            config.error(f"HangarLatentWorker {name!r}: discard must be True or False")
        if masterFQDN is not None and (not isinstance(masterFQDN, str) or not masterFQDN):
            config.error(f"HangarLatentWorker {name!r}: masterFQDN must be a host name")
        if not hasattr(httpclientservice, "HTTPSession"):
            # Buildbot before 4.1 needs txrequests or treq for its client.
            httpclientservice.HTTPClientService.checkAvailable(self.__class__.__name__)

    @defer.inlineCallbacks
    def reconfigService(self, name, password=None, hangar_url=None, pool=None, token=None,
                        wait="10m", discard=False, masterFQDN=None, **kwargs):
        self._random_password = password is None
        if password is None:
            # Buildbot's own mechanism: a worker substantiated while the
            # master is reconfigured keeps its password.
            password = self.getRandomPass()
        # AbstractLatentWorker's settings first: if what follows fails, the
        # master still stops this worker cleanly and shows why, rather than
        # an AttributeError from a worker it half configured.
        yield super().reconfigService(name, password, **kwargs)
        self.hangar_pool = pool
        self.lease_wait = wait
        self.lease_wait_seconds = parse_duration(wait)
        self.discard = discard
        self.masterFQDN = masterFQDN or socket.getfqdn()
        # The worker's name in the User-Agent tells callers apart in
        # Hangar's logs, and gives each worker its own client on Buildbot
        # before 4.1, whose thread pool a long poll would otherwise hold up
        # for the others.
        headers = {"Accept": "application/json", "User-Agent": f"hangar-buildbot ({name})"}
        token = yield self._render_token(name, token)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        base_url = hangar_url.rstrip("/")
        if hasattr(httpclientservice, "HTTPSession"):
            # Buildbot 4.1 and later: a session on the master's shared client.
            self._http = httpclientservice.HTTPSession(self.master.httpservice, base_url,
                                                       headers=headers)
        else:
            self._http = yield httpclientservice.HTTPClientService.getService(
                self.master, base_url, headers=headers)

    @defer.inlineCallbacks
    def _render_token(self, name, token):
        """token's value, or Buildbot's config error saying why there is
        none: its own (a KeyError) names neither the worker nor the cure."""
        try:
            value = yield self.renderSecrets(token)
        except KeyError as e:
            secret = getattr(token, "secret_name", None) or str(e)
            providers = getattr(self.master.config, "secretsProviders", None)
            if not providers:
                why = (f"util.Secret({secret!r}) needs c['secretsProviders'] in master.cfg, and it has "
                       "none; e.g. c['secretsProviders'] = [secrets.SecretInAFile(dirname=...)] with "
                       f"the token in the file {secret} of that directory")
            else:
                names = ", ".join(type(p).__name__ for p in providers)
                why = f"no secrets provider of the master ({names}) has the secret {secret!r}"
            raise config.ConfigErrors([f"HangarLatentWorker {name!r}: token: {why}"]) from e
        if value is not None and not isinstance(value, str):
            raise config.ConfigErrors([f"HangarLatentWorker {name!r}: token must be a string or "
                                       f"a util.Secret, got {type(value).__name__}"])
        return value

    def _generate_random_password(self):
        # What getRandomPass() draws from, with a cryptographic generator:
        # the password is all that keeps others from posing as this worker.
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(32))

    def _who(self):
        return f"{self.__class__.__name__} {self.name}"

    # -- talking to Hangar ---------------------------------------------------

    @defer.inlineCallbacks
    def _call(self, method, path, body=None, wait_seconds=0.0):
        """Hangar's JSON answer (None for 204 No Content), or HangarError
        with Hangar's message. Transport errors are raised as they come."""
        kwargs = {"timeout": wait_seconds + self.http_slack_seconds}
        if body is not None:
            kwargs["json"] = body
        res = yield getattr(self._http, method)(path, **kwargs)
        if res.code == 204:
            return None
        content = yield res.content()
        try:
            data = json.loads(content.decode("utf-8")) if content else None
        except ValueError:
            data = None
        if 200 <= res.code < 300 and isinstance(data, dict):
            return data
        if isinstance(data, dict) and data.get("error"):
            raise HangarError(res.code, str(data["error"]), str(data.get("code", "")))
        text = content.decode("utf-8", "replace").strip()[:200] if content else ""
        raise HangarError(res.code, f"HTTP {res.code} from Hangar: {text}")

    @defer.inlineCallbacks
    def _call_retrying(self, what, deadline, method, path, body=None, wait_seconds=0.0):
        """_call, retrying calls that got no answer (Hangar may be
        restarting) until deadline. Only for idempotent requests."""
        delay = self.retry_initial_seconds
        while True:
            try:
                result = yield self._call(method, path, body, wait_seconds)
                return result
            except HangarError:
                raise
            except Exception as e:
                if self._stopping or self.master.reactor.seconds() + delay > deadline:
                    raise LatentWorkerFailedToSubstantiate(
                        self.name, f"{what}: cannot reach Hangar: {e}") from e
                log.msg(f"{self._who()}: {what}: cannot reach Hangar ({e}); retrying in {delay}s")
                yield asyncSleep(delay, reactor=self.master.reactor)
                delay = min(delay * 2, self.retry_max_seconds)

    # -- AbstractLatentWorker ------------------------------------------------

    @defer.inlineCallbacks
    def start_instance(self, build):
        if self._lease_id is not None:
            # Left over from a release that failed: give it back first.
            yield self._release(discard=True)
        if self._random_password:
            # getRandomPass() would hand back the current password while the
            # worker substantiates; every instance gets a new one, and the
            # master's registration has it before the worker can connect.
            self.password = self._generate_random_password()
            yield self.registration.update(self, self.master.config)
        self._worker_attached = False
        self._worker_lost = False
        started = self.master.reactor.seconds()
        deadline = started + self.lease_wait_seconds
        what = f"leasing an instance of pool {self.hangar_pool}"
        poll = min(self.lease_wait_seconds, self.poll_seconds)
        request = {
            "pool": self.hangar_pool,
            "wait": _format_duration(poll),
            "worker": {
                "name": self.name,
                "password": self.password,
                "master": f"{self.masterFQDN}:{self.registration.getPBPort()}",
            },
            "labels": {"buildbot-worker": self.name},
            # A retried request gets the same lease back, not a second one.
            "client_token": secrets.token_hex(16),
        }
        try:
            lease = yield self._call_retrying(what, deadline, "post", "/v1/leases", request,
                                              wait_seconds=poll)
        except HangarError as e:
            raise LatentWorkerFailedToSubstantiate(self.name, f"{what}: {e}") from e
        self._lease_id = lease["id"]
        try:
            while lease.get("state") == "pending":
                if self._stopping:
                    raise LatentWorkerFailedToSubstantiate(
                        self.name, f"{what}: the master is stopping")
                left = deadline - self.master.reactor.seconds()
                if left <= 0:
                    reason = yield self._pool_launch_error()
                    raise LatentWorkerFailedToSubstantiate(
                        self.name, f"{what}: no instance within {self.lease_wait}{reason}")
                poll = min(left, self.poll_seconds)
                lease = yield self._call_retrying(
                    what, deadline, "get",
                    f"/v1/leases/{self._lease_id}?wait={_format_duration(poll)}",
                    wait_seconds=poll)
            if lease.get("state") != "active" or not lease.get("instance"):
                raise LatentWorkerFailedToSubstantiate(
                    self.name, f"{what}: lease {self._lease_id} is {lease.get('state')}")
        except Exception as e:
            # A pending lease left behind would take an instance later.
            try:
                yield self._release(discard=False, quiet=True)
            except Exception as release_error:
                log.msg(f"{self._who()}: {release_error}")
            if isinstance(e, HangarError):
                raise LatentWorkerFailedToSubstantiate(self.name, f"{what}: {e}") from e
            raise
        self._instance_id = lease["instance"]["id"]
        log.msg(f"{self._who()}: lease {self._lease_id}: instance {self._instance_id} "
                f"({lease['instance'].get('private_ip', '')}) after "
                f"{self.master.reactor.seconds() - started:.1f}s")
        self._schedule_renew(lease.get("expires_at"))
        return True

    @defer.inlineCallbacks
    def _pool_launch_error(self):
        try:
            answer = yield self._call("get", "/v1/pools")
        except Exception:
            return ""
        for p in (answer or {}).get("pools") or []:
            if p.get("name") == self.hangar_pool and p.get("launch_error"):
                return f"; the pool's last launch error: {p['launch_error']}"
        return ""

    def stop_instance(self, fast=False):
        broken = not self._worker_attached or self._worker_lost
        return self._release(discard=self.discard or broken, fast=fast)

    @defer.inlineCallbacks
    def _release(self, discard, fast=False, quiet=False):
        self._cancel_renew()
        lease_id = self._lease_id
        if lease_id is None:
            return
        path = f"/v1/leases/{lease_id}?discard={'true' if discard else 'false'}"
        attempts = 1 if fast else self.release_attempts
        delay = self.retry_initial_seconds
        for attempt in range(1, attempts + 1):
            try:
                yield self._call("delete", path)
                break
            except HangarError as e:
                if e.status != 404:  # 404: ended long ago and forgotten
                    raise HangarError(e.status, f"releasing lease {lease_id}: {e}", e.code) from e
                break
            except Exception as e:
                if attempt == attempts:
                    log.msg(f"{self._who()}: releasing lease {lease_id} failed: {e}; "
                            "Hangar ends it when its TTL runs out without a renew")
                    break
                yield asyncSleep(delay, reactor=self.master.reactor)
                delay = min(delay * 2, self.retry_max_seconds)
        if not quiet:
            log.msg(f"{self._who()}: released lease {lease_id} of instance {self._instance_id}"
                    f"{' (discarded)' if discard else ''}")
        self._lease_id = None
        self._instance_id = None

    def check_instance(self):
        # Current Buildbot asks this until the worker connects: a lease that
        # ended meanwhile means the instance is gone.
        lease_id = self._lease_id
        if lease_id is None:
            return (True, "")
        d = self._call("get", f"/v1/leases/{lease_id}")

        def judge(lease):
            if lease.get("state") != "active":
                return (False, f"lease {lease_id} is {lease.get('state')}")
            return (True, "")

        def no_answer(f):
            if f.check(HangarError) and f.value.status == 404:
                return (False, f"Hangar does not know lease {lease_id}")
            return (True, "")  # Hangar unreachable says nothing of the instance

        d.addCallbacks(judge, no_answer)
        return d

    # -- keeping the lease ---------------------------------------------------

    def _schedule_renew(self, expires_at):
        # A third of what is left of the lease, so two renewals may fail.
        self._cancel_renew()
        expires = _parse_time(expires_at)
        delay = 60.0
        if expires is not None:
            delay = min(max((expires - time.time()) / 3, 1.0), 300.0)
        self._renew_call = self.master.reactor.callLater(delay, self._renew)

    def _cancel_renew(self):
        if self._renew_call is not None and self._renew_call.active():
            self._renew_call.cancel()
        self._renew_call = None

    @defer.inlineCallbacks
    def _renew(self):
        self._renew_call = None
        lease_id = self._lease_id
        if lease_id is None:
            return
        lease = {}
        try:
            lease = yield self._call("post", f"/v1/leases/{lease_id}/renew")
        except HangarError as e:
            log.msg(f"{self._who()}: renewing lease {lease_id}: {e}")
            if e.status in (404, 409) and lease_id == self._lease_id:
                # The lease ended (expired, or its instance was lost).
                self._worker_lost = True
                return
        except Exception as e:
            log.msg(f"{self._who()}: renewing lease {lease_id}: {e}; trying again")
        if lease_id == self._lease_id and self._renew_call is None:
            self._schedule_renew(lease.get("expires_at"))

    # -- what the worker's connection tells ----------------------------------

    def attached(self, conn):
        if self.state == States.SUBSTANTIATING_STARTING:
            self._worker_attached = True
        return super().attached(conn)

    def detached(self):
        if self.state == States.SUBSTANTIATED:
            # Nobody asked it to go: the instance or its worker broke.
            self._worker_lost = True
        return super().detached()

    def stopService(self):
        self._stopping = True
        return super().stopService()
