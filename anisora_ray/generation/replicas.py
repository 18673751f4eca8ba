"""Generator replicas: N persistent Ray actors, each with its own resources, in one placement group."""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from anisora_ray.config import ActorResources, AnisoraConfig
from anisora_ray.config.base import readable
from anisora_ray.errors import ConfigError, InfrastructureError, ReplicaError, WeightsError
from anisora_ray.generation.generator import Generator
from anisora_ray.runtime import (
    RESTART_WAIT_S,
    LeastLoaded,
    actor_placement,
    call_with_retries,
    first_line,
    on_this_node,
)
from anisora_ray.types import Candidate, GenerationRequest, QuarantineRecord, WeightsVersion
from anisora_ray.weights.refresh import WeightsUpdate, refresh_actors, refresh_from_storage
from anisora_ray.weights.update import UpdateMeta, folder_update

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class WeightsLedger:
    """The weights the replicas were last refreshed to from storage: a restarted replica loads them."""

    def __init__(self) -> None:
        self.meta: UpdateMeta | None = None

    def set(self, meta: UpdateMeta) -> None:
        self.meta = meta

    def latest(self) -> UpdateMeta | None:
        return self.meta


class GeneratorActor(Generator):
    """The Ray-hosted generator; adds what only Ray knows (node, GPU ids, actor id).

    Ray restarts a dead replica (``generator.max_restarts``) by running this constructor again: it
    then loads the weights of the ledger's latest refresh, so a restarted replica never generates
    with the base weights unnoticed."""

    def __init__(self, pretrained, model, generator, video, ledger: str | None = None):
        super().__init__(pretrained, model, generator, video, warm_up_later=True)  # in the calls' thread: placement()
        # the ledger by name: an actor handle among the constructor's arguments is an argument Ray keeps in the object
        # store, which a restart may find evicted (ray-project/ray#53727; Ray says so at every start)
        meta = ray.get(ray.get_actor(ledger).latest.remote()) if ledger is not None else None
        if meta is not None:
            self.load_weights_from(meta)

    def placement(self) -> dict:
        """Where the replica runs and its start-up report; the first call compiles and warms up."""
        self.ready()
        return {
            **actor_placement(),
            "replica_id": self.replica_id,
            "device": str(self.execution_device),
            "weights_version": self.weights_version,
            "startup": self.startup,
        }

    def load_weights(self, meta: UpdateMeta, bucket_refs: list) -> dict:
        """Fetch the buckets one at a time from the object store while loading them."""
        return super().load_weights(meta, (ray.get(ref) for ref in bucket_refs))

    @ray.method(concurrency_group="encode")
    def finish(self, ticket: int) -> tuple[list[Candidate], list[QuarantineRecord]]:
        """Waits for a call's encoding in a concurrency group of its own: the replica's other methods (the next
        call's rendering, weight updates) go on meanwhile, one at a time as ever."""
        return super().finish(ticket)


def generate_call(actor, requests: Sequence[GenerationRequest], out_dir: str, exact: bool = False) -> ray.ObjectRef:
    """A replica's ``generate`` as two calls, ``finish(start(...))``: the replica renders its next call while this
    one's videos are encoded. One reference: the candidates and quarantined requests, or the call's error."""
    return actor.finish.remote(actor.start.remote(list(requests), out_dir, exact))


def bundle_for(actor: ActorResources) -> dict[str, float]:
    bundle = actor.request()
    if not bundle:
        raise ConfigError("generator.actor asks for no resources: set num_cpus, num_gpus or resources above 0")
    return bundle


class GeneratorReplicas:
    """Creates the replicas, spreads work over them and collects candidates."""

    def __init__(self, cfg: AnisoraConfig, pretrained: str, ready_timeout_s: float = 600.0):
        g = cfg.generator
        self.cfg = cfg
        bundle = bundle_for(g.actor)
        self.pg: PlacementGroup = placement_group([dict(bundle) for _ in range(g.replicas)], strategy=g.placement_strategy)
        try:
            ray.get(self.pg.ready(), timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise ReplicaError(
                f"{g.replicas} generator replica(s) of {readable(bundle)} each ({g.placement_strategy}) could not be "
                f"placed within {ready_timeout_s:.0f}s; the cluster has {readable(ray.cluster_resources())}"
            ) from None
        remote = ray.remote(concurrency_groups={"encode": 4})(GeneratorActor)
        ledger = f"anisora-weights-ledger-{uuid.uuid4().hex[:12]}"
        self.ledger = WeightsLedger.options(name=ledger, scheduling_strategy=on_this_node()).remote()
        self.actors = [
            remote.options(
                **g.actor.ray_options(),
                max_restarts=g.max_restarts,  # calls are sent again by the caller (counted), not by Ray
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(pretrained, cfg.model, g, cfg.video, ledger)
            for i in range(g.replicas)
        ]
        try:
            self._placements = ray.get([a.placement.remote() for a in self.actors], timeout=ready_timeout_s)
        except BaseException:  # a replica that cannot load: none is left holding the placement group
            self.shutdown()
            raise
        # spreads the streaming pipeline's calls over the replicas, round after round
        self.router = LeastLoaded.options(scheduling_strategy=on_this_node()).remote(len(self.actors))

    def placements(self) -> list[dict]:
        """Where each replica runs now (node, pid, devices): asked again each time, since Ray moves a replica whose
        node was lost (the refresh plans its routes by node)."""
        self._placements = self._ask("placement")
        return list(self._placements)

    def startup_metrics(self) -> dict[str, float]:
        """The slowest replica's start-up: ``generator_load_seconds`` and, with ``generator.compile``,
        ``generator_compile_seconds`` (the compiling warm-up call)."""
        out: dict[str, float] = {}
        for p in self._placements:
            for key, value in p.get("startup", {}).items():
                if key.endswith("_seconds"):
                    out[f"generator_{key}"] = max(out.get(f"generator_{key}", 0.0), float(value))
        return out

    def _ask(self, method: str) -> list:
        """``method()`` of every replica: a restarting replica is waited for, a dead one's call sent again."""
        first = [getattr(a, method).remote() for a in self.actors]
        g = self.cfg.generator
        return [call_with_retries(lambda a=a: getattr(a, method).remote(), first=ref, retries=g.call_retries,
                                  what=f"generator replica {i} ({method})", timeout_s=g.call_timeout_s,
                                  on_timeout=lambda a=a: ray.kill(a, no_restart=False))[0]
                for i, (a, ref) in enumerate(zip(self.actors, first, strict=True))]

    def weights_versions(self) -> list[int]:
        return self._ask("get_weights_version")

    def weights_states(self) -> list[dict]:
        return self._ask("weights_state")

    def refresh(self, update: WeightsUpdate, timeout_s: float = 1800.0) -> list[dict]:
        """Load ``update`` on every replica; raises WeightsError unless all verify and report its version. An
        in-memory update has no folder, so the ledger does not record it: a replica Ray restarts afterwards reloads
        the last folder refreshed (``refresh_from``, ``adopt``), not this. Benchmarks and tests use it; ``align``
        refreshes from folders."""
        reports = refresh_actors(self.actors, update, timeout_s)
        lagging = [i for i, v in enumerate(self.weights_versions()) if v != update.version]
        if lagging:
            raise WeightsError(f"replica(s) {lagging} did not reach weights version {update.version}")
        return reports

    def adopt(self, uri: str, version: int) -> WeightsVersion | None:
        """Record a refresh a live trainer streamed (it checked its stream against the folder ``uri`` it
        wrote; every replica checked what it received): the version of every replica must be ``version``,
        and what they loaded must agree. Returns the version record, or None when any replica does not hold
        it (e.g. restarted since): the caller then refreshes from storage."""
        states = self.weights_states()
        if {s["version"] for s in states} != {version} or len({s["checksum"] for s in states}) != 1:
            return None
        meta = folder_update(uri, version)
        ray.get(self.ledger.set.remote(meta))  # what a restarted replica loads
        return meta.version

    def refresh_from(self, uri: str, version: int | None = None, timeout_s: float = 1800.0) -> tuple[WeightsVersion, list[dict]]:
        """Every replica loads the trained folder ``uri`` from storage as weights ``version`` (default: the
        next one); the driver reads only the folder's manifest, never the tensors."""
        version = version if version is not None else max(self.weights_versions()) + 1
        meta, reports = refresh_from_storage(self.actors, uri, version, timeout_s)
        lagging = [i for i, v in enumerate(self.weights_versions()) if v != version]
        if lagging:
            raise WeightsError(f"replica(s) {lagging} did not reach weights version {version}")
        ray.get(self.ledger.set.remote(meta))  # what a restarted replica loads
        return meta.version, reports

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        out_dir: str,
        on_progress: Callable[[int], None] | None = None,
        exact: bool = False,
        on_call: Callable[[list[Candidate], list[QuarantineRecord]], None] | None = None,
    ) -> tuple[list[Candidate], list[QuarantineRecord]]:
        """Spread ``requests`` over the replicas (bounded calls in flight each) and gather the results.

        ``on_progress(n)`` is called with the number of videos each finished call accounted for, ``on_call`` with
        its candidates and quarantined requests; ``exact``: every step computed, whatever ``generator.cache``.
        """
        candidates, quarantined = self._spread(lambda actor, chunk: generate_call(actor, chunk, out_dir, exact), 2,
                                               requests, on_progress, on_call)
        candidates.sort(key=lambda c: (c.prompt_id, c.candidate_index))
        return candidates, quarantined

    def audit(self, requests: Sequence[GenerationRequest], out_dir: str, on_progress: Callable[[int], None] | None = None,
              ) -> tuple[list[Candidate], list[Candidate], list[dict], list[QuarantineRecord]]:
        """``Generator.audit`` over the replicas: each request rendered with the step cache and exactly."""
        cached, exact, drift, quarantined = self._spread(lambda actor, chunk: actor.audit.remote(chunk, out_dir), 4,
                                                         requests, on_progress)
        for group in (cached, exact):
            group.sort(key=lambda c: (c.prompt_id, c.candidate_index))
        drift.sort(key=lambda d: (d["prompt_id"], d["seed"]))
        return cached, exact, drift, quarantined

    def _spread(self, send: Callable[[Any, list[GenerationRequest]], ray.ObjectRef], parts: int,
                requests: Sequence[GenerationRequest], on_progress: Callable[[int], None] | None,
                on_call: Callable[..., None] | None = None) -> tuple[list, ...]:
        """``send(replica, chunk)`` (a call's reference) for chunks of ``generator.prompts_per_call`` requests, at
        most ``generator.max_calls_in_flight`` per replica; a failed call is sent again (up to
        ``generator.call_retries`` times) to a replica that has not failed it while there is one, so one broken
        replica does not fail the stage; a restarting replica is waited for, and one that has not answered a call
        within ``generator.call_timeout_s`` of sending it is killed (Ray restarts it) and the call counts as failed.
        Each call returns ``parts`` lists: each concatenated over the calls (and passed to ``on_call`` as it ends)."""
        per_call = self.cfg.generator.prompts_per_call
        pending = deque(list(requests[i : i + per_call]) for i in range(0, len(requests), per_call))
        in_flight: dict[ray.ObjectRef, tuple[int, list[GenerationRequest], float]] = {}  # replica, chunk, sent at
        timeout = self.cfg.generator.call_timeout_s
        load = [0] * len(self.actors)
        gathered: list[list] = [[] for _ in range(parts)]
        limit = self.cfg.generator.max_calls_in_flight
        failures: dict[int, int] = {}
        failed_on: dict[int, set[int]] = {}  # chunk -> the replicas it failed on
        streak = [0] * len(self.actors)  # per replica: calls failed since its last success (healthy ones go first)
        restarting: dict[int, float] = {}  # chunk -> when its replica was first seen restarting

        def pick(chunk: list[GenerationRequest]) -> int | None:
            """The healthiest, then least-loaded, free replica the chunk has not failed on; None: it waits for a
            busy one."""
            free = [i for i in range(len(load)) if load[i] < limit]
            avoid = failed_on.get(id(chunk), set())
            fresh = [i for i in free if i not in avoid]
            if not fresh and (len(avoid) < len(load) or not free):
                return None
            return min(fresh or free, key=lambda i: (streak[i] > 0, load[i]))  # every replica failed it: any of them

        while pending or in_flight:
            while pending and min(load) < limit:
                # the first chunk that can go now (the head, unless it waits for a replica it has not failed on)
                chunk, replica = next(((c, r) for c in pending if (r := pick(c)) is not None), (None, None))
                if chunk is None:
                    break
                pending.remove(chunk)
                in_flight[send(self.actors[replica], chunk)] = (replica, chunk, time.monotonic())
                load[replica] += 1
            oldest = min(sent for _, _, sent in in_flight.values())
            wait_s = None if timeout is None else max(0.0, oldest + timeout - time.monotonic())
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=wait_s)
            hung = not done
            if hung:  # the oldest call ran past call_timeout_s: its replica is killed, Ray restarts it
                done = [next(ref for ref, (_, _, sent) in in_flight.items() if sent == oldest)]
            replica, chunk, _ = in_flight.pop(done[0])
            load[replica] -= 1
            key = id(chunk)
            try:
                if hung:
                    ray.kill(self.actors[replica], no_restart=False)
                    raise TimeoutError(f"no answer within generator.call_timeout_s = {timeout:.0f} s; replica "
                                       f"{replica} killed for Ray to restart it")
                result = ray.get(done[0])
            except ray.exceptions.ActorUnavailableError:  # restarting: wait for it, not a new failure
                if time.monotonic() - restarting.setdefault(key, time.monotonic()) < RESTART_WAIT_S:
                    time.sleep(0.5)
                    pending.appendleft(chunk)
                    continue
                raise InfrastructureError(f"generator replica {replica} was restarting for {RESTART_WAIT_S:.0f} s "
                                          f"(prompts {[r.item.prompt_id for r in chunk]})") from None
            except Exception as exc:  # noqa: BLE001 - the replica died or failed: the chunk is sent again
                failures[key] = failures.get(key, 0) + 1
                failed_on.setdefault(key, set()).add(replica)
                streak[replica] += 1
                if failures[key] > self.cfg.generator.call_retries:
                    raise InfrastructureError(f"generator replica(s) {sorted(failed_on[key])} failed {failures[key]} "
                                              f"time(s) on prompts {[r.item.prompt_id for r in chunk]}: "
                                              f"{type(exc).__name__}: {first_line(exc)}") from None
                log.warning("generator replica %d failed (%s: %s); sending its prompts again", replica,
                            type(exc).__name__, first_line(exc))
                pending.appendleft(chunk)
                continue
            streak[replica] = 0
            for into, part in zip(gathered, result, strict=True):
                into += part
            if on_call:
                try:
                    on_call(*result)
                except Exception as exc:  # noqa: BLE001 - a journal that cannot be written costs a resume, not the stage
                    log.warning("generator call's records not journalled (%s: %s)", type(exc).__name__, first_line(exc))
            if on_progress:
                on_progress(sum(len(r.seeds) for r in chunk))
        return tuple(gathered)

    def shutdown(self) -> None:
        for actor in [*self.actors, self.ledger, getattr(self, "router", None)]:  # no router yet: start-up failed
            if actor is not None:
                ray.kill(actor)
        remove_placement_group(self.pg)
        self.actors = []

