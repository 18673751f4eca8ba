"""The cluster files parse, cover what configs/cogvideox5b_i2v.yaml asks for, and start a real entrypoint."""

from __future__ import annotations

import os
import shlex

import yaml

from anisora_ray.config import load_config
from anisora_ray.loop.placement import resource_demand
from tests.conftest import REPO

REAL = os.path.join(REPO, "configs", "cogvideox5b_i2v.yaml")


def _load(*parts):
    with open(os.path.join(REPO, "cluster", *parts)) as f:
        return yaml.safe_load(f)


def test_demand_depends_on_the_placement_mode():
    shared = resource_demand(load_config(REAL))
    assert shared["generator"]["GPU"] == 4 and shared["reward"]["GPU"] == 6 and shared["trainer"]["GPU"] == 8
    # the held-out evaluation: the replicas, the persistent reward actors and the guard's metrics actor (was left out)
    assert shared["metrics"]["GPU"] == 1 and shared["peak"]["GPU"] == 11
    assert resource_demand(load_config(REAL, ["loop.placement=separate"]))["peak"]["GPU"] == 19
    assert resource_demand(load_config(REAL, ["loop.guard.enabled=false"]))["peak"]["GPU"] == 10  # no metrics actor
    assert resource_demand(load_config(REAL, ["pairs.reward_stage=pipeline"]))["peak"]["GPU"] == 10  # rewards released
    local = resource_demand(load_config(os.path.join(REPO, "configs", "local.yaml")))
    assert local["peak"]["GPU"] == 0 and local["peak"]["CPU"] > 0 and local["peak"]["memory"] == 0
    # host memory Ray reserves: the trainer's ZeRO offload state per rank, an offloaded replica's pipeline
    a14b = resource_demand(load_config(os.path.join(REPO, "configs", "anisora_v3_2.yaml"),
                                       ["generator.offload=model", "generator.actor.memory_gib=72"]))
    assert a14b["trainer"]["memory"] == 16 * 24 * 2**30 and a14b["generator"]["memory"] == 9 * 72 * 2**30
    assert a14b["peak"]["memory"] == max(a14b["trainer"]["memory"], a14b["generator"]["memory"])  # shared placement


def test_launcher_yaml_covers_the_real_config():
    launcher = _load("aws-gpu.yaml")
    peak = resource_demand(load_config(REAL))["peak"]
    workers = [t for name, t in launcher["available_node_types"].items() if name != launcher["head_node_type"]]
    gpus = sum(t["resources"].get("GPU", 0) * t["min_workers"] for t in workers)
    cpus = sum(t["resources"].get("CPU", 0) * t["min_workers"] for t in workers)
    assert gpus >= peak["GPU"] and cpus >= peak["CPU"], (gpus, cpus, peak)
    assert launcher["available_node_types"][launcher["head_node_type"]]["resources"] == {"CPU": 0}
    head = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # forwarded with `ray dashboard`, never exposed


def test_kuberay_cluster_covers_the_real_config_and_the_job_targets_it():
    cluster, job = _load("kuberay", "raycluster.yaml"), _load("kuberay", "rayjob.yaml")
    assert cluster["kind"] == "RayCluster" and job["kind"] == "RayJob"
    peak = resource_demand(load_config(REAL))["peak"]
    gpus = 0
    for group in cluster["spec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(group["rayStartParams"]["num-gpus"]) == limits["nvidia.com/gpu"]
        assert group["minReplicas"] == group["replicas"]
        gpus += group["minReplicas"] * limits["nvidia.com/gpu"]
    assert gpus >= peak["GPU"], (gpus, peak)
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python"
    script, config = argv[1], argv[argv.index("--config") + 1]
    for path in (script, config):  # the image carries the repository under /app
        assert path.startswith("/app/") and os.path.isfile(os.path.join(REPO, path.removeprefix("/app/"))), path
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(os.path.join(REPO, config.removeprefix("/app/")), overrides)
    # the real config names no prompts (the job stops at once without them): the entrypoint passes them, on the
    # shared volume every pod mounts
    assert cfg.data.prompts and cfg.eval.prompts and all(p.startswith("/mnt/anisora-ray/") for p in (
        cfg.data.prompts, cfg.eval.prompts)), (cfg.data.prompts, cfg.eval.prompts)
    assert load_config(os.path.join(REPO, config.removeprefix("/app/"))).data.prompts is None


def test_dockerfile_and_runtime_env_ship_what_the_entrypoints_need():
    with open(os.path.join(REPO, "cluster", "Dockerfile")) as f:
        docker = f.read()
    for folder in ("anisora_ray", "configs", "jobs"):
        assert f"COPY {folder} ./{folder}" in docker
    env = yaml.safe_load(open(os.path.join(REPO, "jobs", "runtime_env.yaml")))
    assert env["working_dir"] == "." and ".venv" in env["excludes"]


def _env(container) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def test_cluster_files_turn_on_token_auth_keep_the_jobs_api_inside_and_resume_a_retried_job():
    cluster, job = _load("kuberay", "raycluster.yaml"), _load("kuberay", "rayjob.yaml")
    # KubeRay's authOptions: it sets the token in every Ray pod and sends it when it polls a RayJob's status (a token
    # set only in the pods' environment left the operator's Jobs API calls unauthenticated)
    assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": "anisora-ray-auth"}
    pods = [cluster["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in cluster["spec"]["workerGroupSpecs"]]
    for pod in pods:  # no token of their own beside KubeRay's, never one inline
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(_env(pod["spec"]["containers"][0])), pod
    env = _env(job["spec"]["submitterPodTemplate"]["spec"]["containers"][0])  # the submitter calls the Jobs API
    assert env["RAY_AUTH_MODE"]["value"] == "token" and "value" not in env["RAY_AUTH_TOKEN"]
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "anisora-ray-auth", "key": "auth_token"}
    # the MLflow server the pods log to is deployed beside them, on the shared volume, inside the cluster
    mlflow = list(yaml.safe_load_all(open(os.path.join(REPO, "cluster", "kuberay", "mlflow.yaml"))))
    service = next(d for d in mlflow if d["kind"] == "Service")
    deployment = next(d for d in mlflow if d["kind"] == "Deployment")
    assert service["spec"]["type"] == "ClusterIP" and deployment["spec"]["replicas"] == 1
    uris = {_env(p["spec"]["containers"][0])["MLFLOW_TRACKING_URI"]["value"] for p in pods}
    assert uris == {f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"}
    claims = {v["persistentVolumeClaim"]["claimName"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert claims == {"anisora-ray-shared"}
    assert cluster["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert "--resume" in shlex.split(job["spec"]["entrypoint"])  # a retried submission continues the job
    launcher = _load("aws-gpu.yaml")
    for command in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]:
        if "ray start" in command:
            assert command.startswith("RAY_AUTH_MODE=token "), command
    assert "~/.ray/auth_token" in launcher["file_mounts"]
    assert "-e RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]


def _covers(folder: str, path: str) -> bool:
    return folder != "/" and (path == folder or path.startswith(folder.rstrip("/") + "/"))


def _commands(lines: list[str]):
    """Each simple command of shell lines, as argv without a leading sudo (split at &&, || and ;)."""
    for line in lines:
        argv: list[str] = []
        for token in shlex.split(line) + [";"]:
            if token in ("&&", "||", ";"):
                if argv:
                    yield argv[1:] if argv[0] == "sudo" else argv
                argv = []
            else:
                argv.append(token)


def _docker_volumes(options: list[str]) -> dict[str, str]:
    """{container path: host path} of the -v / --volume options of `docker run`."""
    volumes, argv = {}, [t for option in options for t in shlex.split(option)]
    for flag, value in zip(argv, argv[1:] + [""]):
        if flag in ("-v", "--volume"):
            host, container = value.split(":")[:2]
            volumes[container] = host
        elif flag.startswith("--volume="):
            host, container = flag.removeprefix("--volume=").split(":")[:2]
            volumes[container] = host
    return volumes


def test_every_node_mounts_the_real_configs_output_folder():
    output = load_config(REAL).run.output_dir
    assert output.startswith("/"), output  # a local path: it must be shared storage on every node
    launcher = _load("aws-gpu.yaml")
    for name, node_type in launcher["available_node_types"].items():
        docker = {**launcher.get("docker", {}), **node_type.get("docker", {})}
        init = node_type.get("initialization_commands", launcher.get("initialization_commands", []))
        mounted = [argv[-1] for argv in _commands(init) if argv[0] == "mount"]  # on the host, before docker
        shared = {c: h for c, h in _docker_volumes(docker["run_options"]).items()
                  if _covers(c, output) and any(_covers(m, h) for m in mounted)}
        assert shared, f"node type {name!r}: no shared mount covers run.output_dir {output!r} ({mounted})"

    with open(os.path.join(REPO, "cluster", "kuberay", "storage.yaml")) as f:
        claims = {d["metadata"]["name"]: d for d in yaml.safe_load_all(f) if d["kind"] == "PersistentVolumeClaim"}
    cluster = _load("kuberay", "raycluster.yaml")
    pods = {"head": cluster["spec"]["headGroupSpec"]["template"]}
    pods |= {g["groupName"]: g["template"] for g in cluster["spec"]["workerGroupSpecs"]}
    for name, pod in pods.items():  # the RayJob's submitter pod runs no Ray node: it only calls the Jobs API
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for container in pod["spec"]["containers"]:
            found = []
            for m in container.get("volumeMounts", []):
                claim = volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName")
                if _covers(m["mountPath"], output) and claim in claims:
                    found.append(claim)
            assert found, f"pod {name!r}, container {container['name']!r} mounts no shared claim over {output!r}"
            assert all("ReadWriteMany" in claims[c]["spec"]["accessModes"] for c in found), found
            # every node's object store in memory (a container's default /dev/shm is 64 MB: Ray falls back to disk)
            shm = [volumes[m["name"]] for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            assert shm and shm[0].get("emptyDir", {}).get("medium") == "Memory", (name, shm)


def test_kuberay_head_loss_keeps_gcs_state_in_the_shipped_redis_and_the_job_resumes():
    cluster, job = _load("kuberay", "raycluster.yaml"), _load("kuberay", "rayjob.yaml")
    with open(os.path.join(REPO, "cluster", "kuberay", "redis.yaml")) as f:
        docs = {d["kind"]: d for d in yaml.safe_load_all(f)}
    ft = cluster["spec"]["gcsFaultToleranceOptions"]
    host, port = ft["redisAddress"].split(":")
    service = docs["Service"]
    assert host == service["metadata"]["name"] and int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    pod = docs["Deployment"]["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    redis = pod["spec"]["containers"][0]
    secret = ft["redisPassword"]["valueFrom"]["secretKeyRef"]  # the password the server requires, from one Secret
    assert _env(redis)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret and "--requirepass" in redis["command"][-1]
    assert "--appendonly yes" in redis["command"][-1]  # a restarted Redis keeps the GCS tables
    claim = pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert "--resume" in shlex.split(job["spec"]["entrypoint"]) and job["spec"]["backoffLimit"] >= 3


def test_only_the_rayclusters_pods_reach_mlflow_and_redis():
    """Neither has auth beyond Redis' password: a NetworkPolicy per service admits the RayCluster's pods (KubeRay
    labels them ray.io/cluster: <name>) on the service's port, and nothing else."""
    cluster = _load("kuberay", "raycluster.yaml")
    with open(os.path.join(REPO, "cluster", "kuberay", "network-policy.yaml")) as f:
        policies = {p["spec"]["podSelector"]["matchLabels"]["app"]: p for p in yaml.safe_load_all(f)}
    for name in ("mlflow", "redis"):
        with open(os.path.join(REPO, "cluster", "kuberay", f"{name}.yaml")) as f:
            docs = {d["kind"]: d for d in yaml.safe_load_all(f)}
        labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
        policy = policies[labels["app"]]
        assert policy["spec"]["policyTypes"] == ["Ingress"] and len(policy["spec"]["ingress"]) == 1
        rule = policy["spec"]["ingress"][0]
        assert rule["from"] == [{"podSelector": {"matchLabels": {"ray.io/cluster": cluster["metadata"]["name"]}}}]
        assert [p["port"] for p in rule["ports"]] == [p["targetPort"] for p in docs["Service"]["spec"]["ports"]]
