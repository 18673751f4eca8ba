"""Soak: many short alignment rounds under random faults, against an undisturbed run of the same seeds.

    python benchmarks/soak.py --rounds 10 --fault-every 20 --out outputs/soak     # docs/reliability.md
    python benchmarks/soak.py --rounds 1 --fault-every 15 --calm DIR --out /tmp/soak-short   # tests/test_reproducible.py

Runs ``anisora-ray align`` twice on the embedded default at test sizes (same config, same seeds), one after
the other, each driver in its own process with its own local Ray: first undisturbed, then while a seeded
injector SIGKILLs, every ``--fault-every`` seconds (×0.5-1.5), a random live generator replica, reward actor,
Ray Data worker (actor-pool worker or running task) or Ray Train worker (the kind drawn first, then one of it), a quarter of the time a second one right after (often the same one,
restarting). Every fault is logged (time, round, phase, target). Per finished round it samples the driver's
RSS, the object store's use, /dev/shm, open file descriptors (the driver; Ray's processes; Ray's log monitor apart,
whose count is capped by ``RAY_LOG_MONITOR_MAX_OPEN_FILES``), the output folder's size and the logs' size, and fits a least-squares slope per round from round 2 on.

At the end: every prompt of every round paired exactly once, the same pairs (prompt, winner and loser seeds,
rewards) and the same held-out table as the undisturbed run. ``--calm DIR`` takes a finished undisturbed run
(its ``run.output_dir``, made with ``suite_size_overrides``) instead of running one. Writes ``soak.json``, ``soak.md`` (the tables of
docs/reliability.md) and ``soak.png`` (resources per round) under ``--out``; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Its clusters are local (loopback) and its observer joins each as a second driver, which Ray 2.60's default
# token auth refuses without the session's token: off for these two local runs, as in the tests.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
TARGETS = ("GeneratorActor", "DimensionActor", "MapWorker", "RayTrainWorker")  # GCS actor class names (+ "RayDataTask")
KEYS = ("round", "weights_version", "heldout_reward", "mean_diff", "ci_low", "ci_high", "p_value", "pairs",
        "train_loss", "heldout_visual_motion", "heldout_character")
RESOURCES = ("driver_rss_mb", "object_store_mb", "dev_shm_mb", "driver_fds", "ray_fds", "log_monitor_fds", "output_mb",
             "logs_mb")
# Ray's log monitor keeps a handle on every log file it tails, up to this many; at the cap it closes them all, moves
# dead workers' logs to logs/old and reopens only live ones (ray._private.log_monitor). Its descriptors therefore
# climb round after round and drop at the cap: the soak reports them apart from the rest of Ray's processes.
LOG_MONITOR_CAP = int(os.environ.get("RAY_LOG_MONITOR_MAX_OPEN_FILES", "200"))


def suite_size_overrides(out: str, rounds: int, cache: str | None) -> list[str]:
    """configs/local.yaml at the test suite's sizes (cold tiny model), restarts unbounded for a long run."""
    return [f"run.output_dir={out}", "loop.rounds=%d" % rounds, "generator.height=32", "generator.width=32",
            "generator.num_frames=9", "generator.num_inference_steps=3", "generator.candidates_per_prompt=3",
            "generator.replicas=2", "data.demo_prompts=4", "data.demo_image_size=64", "video.sample_size=32",
            "video.crf=0", "model.tiny.warm_start_steps=0", "model.tiny.vae_blocks=4", "model.tiny.vae_channels=8",
            "model.tiny.latent_channels=4", "model.tiny.attention_head_dim=16", "gapo.steps=4",
            "gapo.checkpoint_every=1", "gapo.max_failures=-1", "generator.max_restarts=-1", "reward.max_restarts=-1",
            "eval.demo_prompts=3", "eval.candidates_per_prompt=1", "loop.guard.action=warn",
            "loop.registered_model=null", "pairs.flush_every=1", *([f"model.cache_dir={cache}"] if cache else [])]


def _state(out: str) -> dict:
    try:
        with open(os.path.join(out, "align", "state.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _where(state: dict) -> tuple[int, str]:
    rounds = state.get("rounds") or [{"index": 0, "phase": "baseline"}]
    last = max(rounds, key=lambda r: r["index"])
    return last["index"], last["phase"]


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names
               if os.path.isfile(os.path.join(d, n)))


def _fds(proc: psutil.Process) -> int:
    try:
        return proc.num_fds()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def _is_log_monitor(proc: psutil.Process) -> bool:
    try:
        return any(arg.endswith("log_monitor.py") for arg in proc.cmdline()[:3])
    except psutil.NoSuchProcess:
        return False


def _gcs(driver: psutil.Process, timeout_s: float = 120) -> tuple[str, str]:
    """The GCS address and logs folder of the local Ray a driver started (its gcs_server child's arguments and
    the port file it wrote): no guessing among other Ray instances on the machine."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for proc in driver.children(recursive=True):
            try:
                cmd = proc.cmdline()
            except psutil.NoSuchProcess:
                continue
            if cmd and cmd[0].endswith("gcs_server"):
                a = dict(x.lstrip("-").split("=", 1) for x in cmd[1:] if "=" in x)
                port_file = os.path.join(a["session-dir"], f"gcs_server_port_{a['node-id']}")
                if os.path.exists(port_file):
                    with open(port_file) as f:
                        return f"{a['node-ip-address']}:{int(f.read().strip())}", a["log_dir"]
        time.sleep(0.2)
    raise TimeoutError(f"no GCS under driver pid {driver.pid}")


class Observer:
    """Connects to the driver's Ray as a second driver: the GCS actor table (fault targets) and resource use."""

    def __init__(self, driver: subprocess.Popen, out: str):
        import ray

        self.driver, self.out = psutil.Process(driver.pid), out
        self.address, self.logs = _gcs(self.driver)
        ray.init(address=self.address, log_to_driver=False, namespace="anisora-soak")

    def targets(self) -> dict[str, list[int]]:
        """Live fault targets by kind: actors from the GCS table, Ray Data task workers by their process title."""
        from ray._private.state import actors

        found: dict[str, list[int]] = {}
        for a in actors().values():
            for kind in TARGETS:
                if a["State"] == "ALIVE" and a["Pid"] and (a["ActorClassName"].endswith(kind) or a["ActorClassName"].startswith(kind)):
                    found.setdefault(kind, []).append(a["Pid"])
        for proc in self.driver.children(recursive=True):
            try:
                title = " ".join(proc.cmdline())
            except psutil.NoSuchProcess:
                continue
            if title.startswith("ray::") and ("MapBatches" in title or "ReadRange" in title):  # a running Ray Data task
                found.setdefault("RayDataTask", []).append(proc.pid)
        return found

    def sample(self) -> dict[str, float]:
        from ray._private.internal_api import memory_summary

        plasma = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(address=self.address, stats_only=True))
        ray_procs = self.driver.children(recursive=True)  # its local Ray: GCS, raylet, workers
        monitor = [p for p in ray_procs if _is_log_monitor(p)]
        return {"driver_rss_mb": self.driver.memory_info().rss / 2**20,
                "object_store_mb": float(plasma.group(1)) if plasma else float("nan"),
                "dev_shm_mb": shutil.disk_usage("/dev/shm").used / 2**20 if os.path.isdir("/dev/shm") else 0.0,
                "driver_fds": float(_fds(self.driver)), "ray_fds": float(sum(_fds(p) for p in ray_procs if p not in monitor)),
                "log_monitor_fds": float(sum(_fds(p) for p in monitor)),
                "output_mb": _du(self.out) / 2**20, "logs_mb": (_du(self.logs) + _du(os.path.join(self.out, "align", "logs"))) / 2**20}

    def close(self) -> None:
        import ray

        ray.shutdown()


def run(out: str, rounds: int, cache: str | None, fault_every: float | None, seed: int) -> dict:
    """One align job in a child process; faults when ``fault_every``; per-round samples and the fault log."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    argv = [sys.executable, os.path.join(REPO, "jobs", "align.py"), "--quiet", "--config",
            os.path.join(REPO, "configs", "local.yaml")]
    for o in suite_size_overrides(out, rounds, cache):
        argv += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    began = time.time()
    with open(os.path.join(out, "driver.log"), "w") as log:
        driver = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    while not _state(out) and driver.poll() is None:  # Ray is up once the job wrote its state
        time.sleep(0.2)
    observer = Observer(driver, out) if driver.poll() is None else None
    samples, faults, done, rng = {}, [], threading.Event(), random.Random(seed)

    def inject() -> None:
        while not done.wait(fault_every * rng.uniform(0.5, 1.5)):
            for second in (False, True):
                if second and rng.random() >= 0.25:
                    break
                live = observer.targets()
                if not live:
                    break
                target = sorted(live)[rng.randrange(len(live))]  # a kind first (each gets its turn), then one of it
                pid = sorted(live[target])[rng.randrange(len(live[target]))]
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                index, phase = _where(_state(out))
                faults.append({"t": round(time.time() - began, 1), "round": index, "phase": phase, "target": target,
                               "pid": pid, "second": second})
                print(f"fault {len(faults)}: {target} pid {pid} in round {index} ({phase})", flush=True)
                time.sleep(1.0)

    injector = threading.Thread(target=inject, daemon=True) if fault_every and observer else None
    if injector:
        injector.start()
    while driver.poll() is None:
        state = _state(out)
        finished = [0] if state.get("baseline") else []
        finished += [r["index"] for r in state.get("rounds", []) if r["phase"] == "evaluated"]
        for index in finished:
            if index not in samples and observer:
                samples[index] = observer.sample()
        time.sleep(0.5)
    done.set()
    if injector:
        injector.join(timeout=10)
    if observer:
        observer.close()
    if driver.returncode != 0:
        with open(os.path.join(out, "driver.log")) as f:
            raise RuntimeError(f"align failed in {out}:\n{f.read()[-4000:]}")
    return {"seconds": time.time() - began, "samples": {str(k): v for k, v in sorted(samples.items())}, "faults": faults}


def reused(out: str, rounds: int) -> dict:
    """An undisturbed run made elsewhere: it must have evaluated exactly ``rounds`` rounds."""
    done = [r["index"] for r in _state(out).get("rounds", []) if r["phase"] == "evaluated"]
    if done != list(range(1, rounds + 1)):
        raise SystemExit(f"--calm {out}: evaluated rounds {done}, not 1..{rounds} (an undisturbed run of --rounds {rounds} "
                         "made with suite_size_overrides)")
    return {"seconds": float("nan"), "samples": {}, "faults": [], "reused": out}


def outcome(out: str, rounds: int) -> dict:
    """Per round: prompt id -> (winner seed, loser seed, winner reward, loser reward), and every id written."""
    sys.path.insert(0, REPO)
    from anisora_ray.pairs.writer import read_pairs, read_skipped

    pairs, ids = {}, {}
    for r in range(1, rounds + 1):
        folder = os.path.join(out, "align", f"round-{r}", "pairs")
        got = read_pairs(folder)
        pairs[r] = {p.prompt_id: (p.winner_seed, p.loser_seed, p.winner_reward, p.loser_reward) for p in got}
        ids[r] = [p.prompt_id for p in got] + [q.item_id for q in read_skipped(folder)]
    state = _state(out)
    table = [{k: row.get(k) for k in KEYS} for row in [state["baseline"]["row"], *(x["metrics"] for x in state["rounds"])]]
    return {"pairs": pairs, "ids": ids, "table": table}


def slopes(samples: dict[str, dict], first: int = 2) -> dict[str, float]:
    """Least-squares slope per round of each resource over rounds >= ``first`` (nan with fewer than 2 points)."""
    rows = sorted((int(k), v) for k, v in samples.items() if int(k) >= first)
    if len(rows) < 2:
        return {k: float("nan") for k in RESOURCES}
    x = np.array([r for r, _ in rows], float)
    return {k: float(np.polyfit(x, np.array([v[k] for _, v in rows], float), 1)[0]) for k in RESOURCES}


def compare(calm: dict, stormy: dict, prompts: int) -> dict:
    lost = sum(prompts - len(set(v)) for v in stormy["ids"].values())
    duplicated = sum(len(v) - len(set(v)) for v in stormy["ids"].values())
    def numbers(table):  # the weights version is a counter: a replica restarted mid-refresh can make the round's
        return [{k: v for k, v in row.items() if k != "weights_version"} for row in table]  # refresh take the next one

    return {"lost": lost, "duplicated": duplicated, "same_pairs": calm["pairs"] == stormy["pairs"],
            "same_table": numbers(calm["table"]) == numbers(stormy["table"]),
            "weights_versions": [[r["weights_version"] for r in t["table"]] for t in (calm, stormy)],
            "max_table_diff": max((abs(a[k] - b[k]) for a, b in zip(calm["table"], stormy["table"], strict=True)
                                   for k in KEYS if isinstance(a.get(k), float) and isinstance(b.get(k), float)),
                                  default=0.0)}


def report(result: dict, out: str) -> None:
    """soak.md (the docs' tables) and soak.png (each resource per round, both runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, runs = result["checks"], result["runs"]
    lines = [f"{len(runs['faults']['faults'])} faults in {runs['faults']['seconds']:.0f} s over {result['rounds']} rounds "
             f"(undisturbed: {'reused' if runs['calm'].get('reused') else '%.0f s' % runs['calm']['seconds']}); prompts lost {c['lost']}, duplicated {c['duplicated']}; "
             f"same pairs: {c['same_pairs']}; same held-out table: {c['same_table']} (max diff {c['max_table_diff']:.2g}); "
             f"weights versions undisturbed / with faults: {c['weights_versions'][0]} / {c['weights_versions'][1]}",
             "", "| resource | " + " | ".join(f"round {k}" for k in runs["faults"]["samples"]) + " | slope / round (≥ 2) |",
             "| --- |" + " --- |" * (len(runs["faults"]["samples"]) + 1)]
    for k in RESOURCES:
        cells = [f"{v[k]:.1f}" for v in runs["faults"]["samples"].values()]
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {result['slopes'][k]:+.2f} |")
    counts = {}
    for f in runs["faults"]["faults"]:
        counts[f["target"]] = counts.get(f["target"], 0) + 1
    lines += ["", "faults by target: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
              "", f"log monitor: at most {result['log_monitor_cap']} log files open (RAY_LOG_MONITOR_MAX_OPEN_FILES); "
                  "at the cap it closes them all and moves dead workers' logs to logs/old"]
    with open(os.path.join(out, "soak.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, len(RESOURCES), figsize=(3 * len(RESOURCES), 2.8))
    for ax, k in zip(axes, RESOURCES, strict=True):
        for name, style in (("calm", "o--"), ("faults", "o-")):
            s = runs[name]["samples"]
            ax.plot([int(r) for r in s], [v[k] for v in s.values()], style, label=name)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("round")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "soak.png"), dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--fault-every", type=float, default=20.0, help="seconds between faults (x0.5-1.5, seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/soak")
    ap.add_argument("--model-cache", default=None, help="model.cache_dir (default: the config's)")
    ap.add_argument("--calm", default=None, help="a finished undisturbed run at these sizes (its run.output_dir) "
                                                  "to compare with, instead of running one")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    calm = os.path.abspath(args.calm) if args.calm else os.path.join(out, "calm")
    runs = {"calm": reused(calm, args.rounds) if args.calm else run(calm, args.rounds, args.model_cache, None, args.seed)}
    runs["faults"] = run(os.path.join(out, "faults"), args.rounds, args.model_cache, args.fault_every, args.seed)
    checks = compare(outcome(calm, args.rounds), outcome(os.path.join(out, "faults"), args.rounds), 4)
    result = {"rounds": args.rounds, "fault_every": args.fault_every, "seed": args.seed, "runs": runs, "checks": checks,
              "slopes": slopes(runs["faults"]["samples"]),
              "log_monitor_cap": LOG_MONITOR_CAP}
    with open(os.path.join(out, "soak.json"), "w") as f:
        json.dump(result, f, indent=2)
    report(result, out)
    print(open(os.path.join(out, "soak.md")).read())
    ok = checks["lost"] == 0 and checks["duplicated"] == 0 and checks["same_pairs"] and checks["same_table"]
    return 0 if ok and runs["faults"]["faults"] else 1


if __name__ == "__main__":
    sys.exit(main())
