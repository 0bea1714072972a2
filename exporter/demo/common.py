"""What every simulated estate shares: people hired over time, Entra Connect, AD and the Graph counters.

A simulated estate is a list of people. Everything random about a person (name, fate, delays) is
drawn once, when the person is hired, from a random generator seeded by the estate's seed, so the
estate at a given moment depends only on its seed and that moment: every read method takes the time
from the clock it was given and never from the wall clock. New hires keep coming after the start;
they are drawn one simulated day at a time, each day from its own seeded generator, so it makes no
difference when (or how often) the estate is read.
"""

from __future__ import annotations

import bisect
import math
import random
import threading
import unicodedata
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from exporter.columns import guid_keys
from exporter.ids import immutable_id
from exporter.model import AdTable, AdUser, EntraUser, HttpStats
from exporter.pipelines.definitions import PipelineDefinition
from exporter.pipelines.evaluation import FirstSeen

Clock = Callable[[], float]
MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0
NEVER = math.inf
PAST_HIRING_DAYS = 3  # the steady trickle of new hires already ran this long before the start
FUTURE_HIRING_DAYS = 30  # and goes on this long after it
ENTRA_CONNECT_CYCLE = 30 * MINUTE

GIVEN = (
    "Anna", "Ben", "Chloé", "Dmitri", "Eva", "Farah", "Gustav", "Hana", "Ivan", "Jürgen", "Kai", "Lena",
    "Mohammed", "Nora", "Oskar", "Priya", "Quentin", "Rosa", "Søren", "Tomás", "Uma", "Viktor", "Wei",
    "Ximena", "Yusuf", "Zoë",
)  # fmt: skip
FAMILY = (
    "Andersson", "Brown", "Chen", "Dubois", "Ekström", "Fischer", "García", "Hansen", "Ivanova", "Jensen",
    "Kowalski", "Li", "Müller", "Nakamura", "O'Brien", "Patel", "Rossi", "Schmidt", "Tanaka", "Usman",
    "Virtanen", "Wang", "Yilmaz", "Zhang",
)  # fmt: skip


def ascii_name(text: str) -> str:
    """A name as an account name: accents folded (Jürgen -> jurgen), apostrophes dropped."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return folded.lower().replace("'", "").replace(" ", "")


def random_guid(rng: random.Random) -> uuid.UUID:
    """A version-4 shaped GUID from the seeded generator (uuid4() would read os.urandom)."""
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def later(time: float, delay: float) -> float:
    """``time + delay`` where either may be NEVER."""
    return NEVER if math.isinf(time) or math.isinf(delay) else time + delay


def fixed_after(
    rng: random.Random, share_fixed: float = 0.6, low: float = 1 * DAY, high: float = 7 * DAY
) -> float:
    """How long a problem lasts: most get fixed within days, the rest are left alone (NEVER)."""
    return rng.uniform(low, high) if rng.random() < share_fixed else NEVER


@dataclass(frozen=True)
class Schedule:
    """A job that runs every ``period`` seconds (at ``offset`` past each multiple), except during
    ``outages`` (absolute [since, until) windows, sorted; ``until`` may be NEVER)."""

    period: float
    offset: float = 0.0
    outages: tuple[tuple[float, float], ...] = ()

    def _grid(self, t: float, rounding: Callable[[float], int]) -> float:
        return rounding((t - self.offset) / self.period) * self.period + self.offset

    def next_run(self, t: float) -> float:
        """The first run at or after ``t`` (NEVER when the job never runs again)."""
        if math.isinf(t):
            return NEVER
        run = self._grid(t, math.ceil)
        for since, until in self.outages:
            if since <= run < until:
                if math.isinf(until):
                    return NEVER
                run = self._grid(until, math.ceil)
        return run

    def last_run(self, t: float) -> float:
        """The last run at or before ``t``."""
        run = self._grid(t, math.floor)
        for since, until in reversed(self.outages):
            if since <= run < until:
                run = self._grid(since, math.ceil) - self.period  # the last run before the outage
        return run

    def down(self, t: float) -> bool:
        return any(since <= t < until for since, until in self.outages)


def window(start: float, relative: tuple[float, float] | None) -> tuple[tuple[float, float], ...]:
    """An outage given relative to the demo's start, as absolute times."""
    if relative is None:
        return ()
    return ((start + relative[0], later(start, relative[1])),)


@dataclass(frozen=True)
class EstateSpec:
    """What makes one simulated estate what it is."""

    name: str
    domain: str
    netbios: str
    users: int  # about this many AD accounts exist at the start (some of them already left)
    history: float  # the accounts existing at the start were created over this long
    hire_interval: float  # mean seconds between two new hires (the steady trickle)
    fates: tuple[tuple[str, float], ...]  # share of people per fate ("ok" goes all the way)
    entra_connect_outage: tuple[float, float] | None = None  # relative to the start
    # HR imports: (when, relative to the start and before it; how many accounts, created within 20 minutes).
    hr_batches: tuple[tuple[float, int], ...] = ()

    def draw_fate(self, rng: random.Random) -> str:
        return rng.choices([f for f, _ in self.fates], [w for _, w in self.fates])[0]


@dataclass(slots=True, eq=False)
class Person:
    """One account's identity half: AD and Entra ID (stages ad_created and entra_synced)."""

    created: float
    fate: str
    fix_after: float  # how long this person's problem lasts (NEVER: nobody fixes it)
    guid: bytes  # objectGUID as AD stores it (also the source anchor)
    entra_id: str
    given: str
    family: str
    left_at: float  # disabled in AD (leavers leave the default user_filter's scope)
    immutable_id_synced: bool  # a few accounts were hard-matched by SID and carry no immutable id
    provisioning_error: str | None
    entra_at: float = NEVER  # the synced Entra user appears
    # A cloud-only Entra user holding this person's UPN, immutable id or SID (entra_cloud_user_conflict).
    conflict_key: str | None = None
    conflict_id: str = ""
    conflict_since: float = NEVER
    conflict_until: float = NEVER
    # Set when the person is enlisted (in order of creation).
    index: int = -1
    sid: str = ""
    sam: str = ""


class SimulatedEstate:
    """The parts of a simulated estate that both pipelines share. Subclasses add their chain."""

    definition: ClassVar[PipelineDefinition]
    person_type: ClassVar[type[Person]] = Person

    def __init__(self, spec: EstateSpec, clock: Clock, seed: str) -> None:
        self.spec = spec
        self.name = spec.name
        self.domain = spec.domain
        self.netbios = spec.netbios
        self.tenant = spec.domain.split(".")[0]
        self.clock = clock
        self.seed = seed
        self.start = clock()
        # An outage begins a minute after a sync cycle: Entra Connect's last sync is as old as the outage.
        cycle = Schedule(ENTRA_CONNECT_CYCLE, 42.0)
        outages = tuple(
            (cycle.last_run(since) + MINUTE, until)
            for since, until in window(self.start, spec.entra_connect_outage)
        )
        self.entra_connect = Schedule(cycle.period, cycle.offset, outages)
        rng = random.Random(f"{seed}/{spec.name}/domain")
        self.domain_sid = f"S-1-5-21-{rng.randrange(10**9)}-{rng.randrange(10**9)}-{rng.randrange(10**9)}"
        self.cloud_admins = max(5, spec.users // 25)
        self.graph = HttpStats()
        self.graph_lock = threading.Lock()
        self._token_hour: int | None = None
        self._hiring_lock = threading.Lock()
        self.people: list[Person] = []
        self._created: list[float] = []
        self._next_day = PAST_HIRING_DAYS
        self.setup()
        self._populate()

    # ------------------------------------------------------------------ for subclasses
    def setup(self) -> None:
        """Estate-wide schedules and facts the chain needs before anyone is hired."""

    def draw_chain(self, rng: random.Random, person: Any) -> None:
        """Draw the rest of a new hire's life (its pipeline's events)."""

    def stage_at(self, person: Any, t: float) -> tuple[str, float]:
        """The person's stage at ``t`` and since when, as the simulation knows it."""
        raise NotImplementedError

    def upn_at(self, person: Any, t: float) -> str:
        return f"{person.sam}@{self.domain}"

    # ------------------------------------------------------------------ population
    def _populate(self) -> None:
        spec = self.spec
        rng = random.Random(f"{self.seed}/{spec.name}/history")
        trickle = PAST_HIRING_DAYS * DAY / spec.hire_interval
        early = [
            self._hire(rng, self.start - spec.history * rng.random() ** 0.8)
            for _ in range(max(0, spec.users - round(trickle)))
        ]
        recent = [person for day in range(PAST_HIRING_DAYS) for person in self._hires_of_day(day)]
        for number, (when, count) in enumerate(spec.hr_batches):
            assert when < 0, "an HR import of the demo happens before its start"
            batch = random.Random(f"{self.seed}/{spec.name}/hr-import/{number}")
            recent += [
                self._hire(batch, self.start + when + batch.uniform(0, 20 * MINUTE)) for _ in range(count)
            ]
        for person in sorted(early + recent, key=lambda p: (p.created, p.guid)):
            self._enlist(person)

    def _day_begins(self, day: int) -> float:
        return self.start + (day - PAST_HIRING_DAYS) * DAY

    def _hires_of_day(self, day: int) -> list[Person]:
        rng = random.Random(f"{self.seed}/{self.spec.name}/hires/{day}")
        t, end = self._day_begins(day), self._day_begins(day + 1)
        hires: list[Person] = []
        while True:
            t += rng.expovariate(1 / self.spec.hire_interval)
            if t >= end:
                return hires
            hires.append(self._hire(rng, t))

    def _hire(self, rng: random.Random, created: float) -> Person:
        spec = self.spec
        fate = spec.draw_fate(rng)
        person = self.person_type(
            created=created,
            fate=fate,
            fix_after=fixed_after(rng),
            guid=uuid.UUID(int=rng.getrandbits(128)).bytes_le,
            entra_id=str(random_guid(rng)),
            given=rng.choice(GIVEN),
            family=rng.choice(FAMILY),
            left_at=created + rng.uniform(20, 400) * DAY if rng.random() < 0.2 else NEVER,
            immutable_id_synced=rng.random() > 0.03,
            provisioning_error=rng.choice(("PropertyConflict", "UserPrincipalName"))
            if rng.random() < 0.01
            else None,
        )
        exportable = created  # when Entra Connect may export the account
        if fate == "not_synced":  # OU outside the sync scope until someone fixes the scope
            exportable = later(created, person.fix_after)
        elif fate == "cloud_conflict":  # a cloud-only user blocks the match until it is removed
            person.conflict_key = rng.choices(("upn", "immutable_id", "sid"), (0.7, 0.2, 0.1))[0]
            person.conflict_id = str(random_guid(rng))
            person.conflict_since = created - rng.uniform(1 * HOUR, 20 * DAY)
            person.conflict_until = exportable = later(created, person.fix_after)
        export = self.entra_connect.next_run(later(exportable, rng.uniform(0, 60)))
        person.entra_at = later(export, rng.uniform(1 * MINUTE, 4 * MINUTE))
        self.draw_chain(rng, person)
        return person

    def _enlist(self, person: Person) -> None:
        person.index = index = len(self.people)
        person.sid = f"{self.domain_sid}-{20000 + index}"
        person.sam = (ascii_name(person.given)[:1] + ascii_name(person.family))[:16] + str(index)
        self.people.append(person)
        self._created.append(person.created)

    def existing(self, now: float) -> Sequence[Person]:
        """Everyone created by ``now`` (leavers included), oldest first."""
        with self._hiring_lock:
            while (
                self._next_day < PAST_HIRING_DAYS + FUTURE_HIRING_DAYS
                and self._day_begins(self._next_day) <= now
            ):
                for person in self._hires_of_day(self._next_day):
                    self._enlist(person)
                self._next_day += 1
            count = bisect.bisect_right(self._created, now)
            return self.people[:count]

    def in_scope(self, now: float) -> list[Person]:
        """The accounts the default user_filter finds: created and not disabled."""
        return [p for p in self.existing(now) if p.left_at > now]

    # ------------------------------------------------------------------ history
    def first_seen_history(self) -> FirstSeen:
        """First-seen times as an exporter that had watched this estate all along would have them.

        Several stages carry no timestamp of their own in any backend; without this, a fresh demo
        could not show anyone stuck there until the thresholds had passed in real time.
        """
        now = self.clock()
        people = self.in_scope(now)
        stages = self.definition.stages
        places = [self.stage_at(p, now) for p in people]
        guids = np.frombuffer(b"".join(p.guid for p in people), dtype="V16")
        return FirstSeen.from_rows(
            self.definition.name,
            guid_keys(guids) if people else np.zeros(0, np.uint64),
            np.asarray([stages.index(stage) for stage, _ in places], dtype=np.int8),
            np.asarray([since for _, since in places], dtype=np.float64),
        )

    # ------------------------------------------------------------------ backend views
    def read_ad(self) -> AdTable:
        now = self.clock()
        users = (
            AdUser(
                object_guid=p.guid,
                object_sid=p.sid,
                sam_account_name=p.sam,
                user_principal_name=self.upn_at(p, now),
                source_anchor=p.guid,
                when_created=p.created,
            )
            for p in self.in_scope(now)
        )
        table = AdTable.from_records(users, self.netbios)
        table.meta["read"] = "full"
        return table.prepare()

    def synced_user(self, p: Person, now: float, **fields: Any) -> EntraUser:
        """The synced Entra user of ``p`` with the fields every chain shows the same way."""
        values: dict[str, Any] = {
            "id": p.entra_id,
            "user_principal_name": self.entra_upn_at(p, now),
            "on_premises_sync_enabled": True,
            "on_premises_immutable_id": immutable_id(p.guid) if p.immutable_id_synced else None,
            "on_premises_security_identifier": p.sid,
            "created": p.entra_at if p.index % 40 else None,  # some pre-2018 users have no createdDateTime
            "account_enabled": p.left_at > now,
            "provisioning_error_categories": (p.provisioning_error,) if p.provisioning_error else (),
        }
        values.update(fields)
        return EntraUser(**values)

    def entra_upn_at(self, p: Any, now: float) -> str:
        return self.upn_at(p, now)

    def cloud_only_users(self, people: Sequence[Person], now: float) -> list[EntraUser]:
        """Cloud-only Entra users: the tenant's admins, and the objects that block a match."""
        users = [
            EntraUser(
                id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.name}/cloud-only/{i}")),
                user_principal_name=f"cloud.admin{i}@{self.tenant}.onmicrosoft.com",
                on_premises_sync_enabled=False,
                on_premises_immutable_id=None,
                on_premises_security_identifier=None,
                created=self.start - 400 * DAY,
                account_enabled=True,
            )
            for i in range(self.cloud_admins)
        ]
        for p in people:
            if p.conflict_key is None or not p.conflict_since <= now < p.conflict_until:
                continue
            key = p.conflict_key
            users.append(
                EntraUser(
                    id=p.conflict_id,
                    # "upn": created by hand for an early mailbox; the others: a former synced object
                    # that was converted to cloud-only and kept its on-premises identifiers.
                    user_principal_name=self.upn_at(p, now)
                    if key == "upn"
                    else f"{p.sam}@{self.tenant}.onmicrosoft.com",
                    on_premises_sync_enabled=False,
                    on_premises_immutable_id=immutable_id(p.guid) if key == "immutable_id" else None,
                    on_premises_security_identifier=p.sid if key == "sid" else None,
                    created=p.conflict_since,
                    account_enabled=True,
                )
            )
        return users

    def count_graph(self, endpoint: str, pages: int) -> None:
        """What the real client would have counted: paged reads, an occasional 429 with a short
        Retry-After, and a token request every hour of simulated time."""
        with self.graph_lock:
            stats = self.graph
            reads = sum(stats.requests.values())
            if reads % 11 == 5:
                stats.requests[(endpoint, "429")] = stats.requests.get((endpoint, "429"), 0) + 1
                stats.throttled += 1
                stats.retry_wait_seconds += 2.0
            stats.requests[(endpoint, "200")] = stats.requests.get((endpoint, "200"), 0) + pages
            hour = int(self.clock() // HOUR)
            if stats.token_requests == 0 or hour != self._token_hour:
                stats.token_requests += 1
                stats.requests[("token", "200")] = stats.requests.get(("token", "200"), 0) + 1
            self._token_hour = hour
