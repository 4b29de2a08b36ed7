"""cluster/ configs and the image they run: the real entry point with arguments it accepts,
the schemas of the tools that read them (Ray's cluster-config schema from the installed
wheel, the CRDs of the pinned KubeRay operator), and the rules no schema states: requests
fit the named node type, every pod that reads storage or MLflow gets the credentials,
/dev/shm is sized, the image is the one the Dockerfile builds, the autoscaler runs, the
dashboard is not open, runtime_env leaves tests/ behind."""
import argparse
import copy
import functools
import gzip
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from vdvae_dist import cli

ROOT = Path(__file__).parents[2]
CLUSTER = ROOT / "cluster"
DATA = Path(__file__).parents[1] / "data"
KUBERAY_VERSION = "v1.7.0"  # the operator whose CRDs are in tests/data/kuberay (docs/kuberay.md installs it)
STORAGE_SECRET = "vdvae-storage"  # AWS_* and MLFLOW_TRACKING_URI (docs/kuberay.md)
SERVE_SECRET = "vdvae-serve"  # VDVAE_SERVE_TOKEN
INSTANCES = {k: v for k, v in json.loads((DATA / "instance_types.json").read_text()).items() if not k.startswith("_")}
GIB = 2**30


def _yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


# --- the image ------------------------------------------------------------------------

def _makefile_var(name: str) -> str:
    (value,) = re.findall(rf"^{name}\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    return value


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in (ROOT / "Dockerfile").read_text().splitlines()
                                          if not ln.lstrip().startswith("#")))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines() if ln.strip()]


def _dockerignored(path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parent
    folders decides; `!` patterns bring paths back; `*` stays in one folder, `**` does not."""
    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + "$")

    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = regex(line.lstrip("!").strip("/"))
        if any(pattern.match(c) for c in candidates):
            excluded = not keep
    return excluded


def test_the_image_installs_through_install_sh_with_the_torch_build_argument():
    steps = _dockerfile()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else None for i, a in steps if i == "ARG"}
    assert args["TORCH_SPEC"] == "torch==2.13.0"  # the tested torch, as in install.sh and the Makefile
    assert args["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")
    assert "cuda" in args["BASE_IMAGE"]
    (install,) = [a for i, a in steps if i == "RUN" and "cluster/install.sh" in a]
    assert 'TORCH_SPEC="${TORCH_SPEC}"' in install and 'TORCH_INDEX_URL="${TORCH_INDEX_URL}"' in install
    assert re.search(r"cluster/install\.sh /opt/venv \"/app\[serve\]\"", install), install
    # the interpreter is checked where it is installed: config/load.py needs tomllib (3.11)
    assert any("tomllib" in a and "(3, 11)" in a for i, a in steps if i == "RUN")


def test_the_image_runs_as_ray_with_the_venv_first_on_path_also_in_login_shells():
    steps = _dockerfile()
    env = " ".join(a for i, a in steps if i == "ENV")
    assert re.search(r"PATH=/opt/venv/bin:\$\{PATH\}", env) and "HOME=/home/ray" in env
    assert any("useradd" in a and "--uid 1000" in a and a.rstrip().endswith(" ray") for i, a in steps if i == "RUN")
    assert any("/etc/profile.d/" in a and "/opt/venv/bin" in a for i, a in steps if i == "RUN")
    users = [a for i, a in steps if i == "USER"]
    assert users == ["ray"]
    # the cluster launcher copies files in with rsync and its autoscaler reaches workers by ssh
    assert any(" rsync " in a and "openssh-client" in a for i, a in steps if i == "RUN")
    # DeepSpeed builds its CPU collectives when a CPU worker starts (c++: not found otherwise)
    assert any(" g++ " in a and "python3-dev" in a for i, a in steps if i == "RUN")


def test_the_build_context_holds_what_the_dockerfile_copies_and_no_tests():
    copied = []
    for instruction, a in _dockerfile():
        if instruction == "COPY":
            copied += [s for s in a.split()[:-1] if not s.startswith("--")]
    assert {"pyproject.toml", "requirements.txt", "README.md", "cluster/install.sh", "vdvae_dist", "jobs"} <= set(copied)
    for source in copied:
        assert not _dockerignored(source), f"{source} is copied but .dockerignore leaves it out of the context"
    assert not _dockerignored("vdvae_dist/config/presets/tiny.toml")  # package data: pyproject.toml's
    for heavy in ("tests/reference/evd-mnist/checkpoint.pt", ".venv/bin/python", ".git/HEAD", "runs/x",
                  "vdvae_dist/__pycache__/cli.cpython-311.pyc", "build/lib/vdvae_dist/cli.py"):
        assert _dockerignored(heavy), heavy


def test_make_image_builds_the_tag_every_config_runs():
    image = _makefile_var("IMAGE")
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert image.endswith(f"/vdvae-dist:{version}")
    rule = (ROOT / "Makefile").read_text().split("\nimage:", 1)[1].split("\n\n", 1)[0]
    assert "build $(DOCKER_BUILD_ARGS) -t $(IMAGE) ." in rule and "vdvae-dist --help" in rule
    used = [_yaml("aws-gpu.yaml")["docker"]["image"]]
    for name in ("rayjob.yaml", "rayservice.yaml"):
        used += [c["image"] for pod in _ray_pods(_yaml(name)) for c in pod["template"]["spec"]["containers"]]
    assert used and set(used) == {image}


# --- the job's command line -----------------------------------------------------------

def _launch_args(entrypoint: str) -> argparse.Namespace:
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and argv[1] in ("jobs/train.py", "/app/jobs/train.py"), argv[:2]
    assert (ROOT / "jobs" / "train.py").exists()
    if argv[1].startswith("/app/"):  # the image's copy: the Dockerfile puts jobs/ in /app
        steps = _dockerfile()
        assert ("WORKDIR", "/app") in steps and ("COPY", "jobs jobs") in steps
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("launch")
    cli._config_args(p, "mnist-small")
    for flag in ("--data", "--workers", "--gpus-per-worker", "--cpus-per-worker", "--zero-stage", "--output", "--resume"):
        p.add_argument(flag)
    return parser.parse_args(["launch", *argv[2:]])


def _check_job_fits(args: argparse.Namespace, nodes: int, node_cpus: float, node_gpus: int) -> None:
    """Every worker finds a node: the GPUs of a node hold whole workers, and their CPUs too."""
    from vdvae_dist.config import load

    workers, gpus, cpus = int(args.workers), float(args.gpus_per_worker), float(args.cpus_per_worker or 1)
    per_node = int(node_gpus // gpus)
    assert per_node >= 1 and workers <= nodes * per_node, (workers, nodes, per_node)
    assert per_node * cpus <= node_cpus, f"{per_node} workers x {cpus} CPUs > {node_cpus} CPUs of a node"
    cfg = load(args.preset, overrides=[*args.overrides, f"scaling.workers={workers}"])  # validates
    assert cfg.optim.batch_size % workers == 0
    assert args.data.startswith("s3://") and args.output.startswith("s3://")


# --- KubeRay --------------------------------------------------------------------------

@functools.cache
def _crd(kind: str) -> jsonschema.Draft7Validator:
    """A validator of the CRD's openAPIV3Schema (made once: the schemas are ~1 MB each)."""
    return jsonschema.Draft7Validator(_crd_schema(kind))


def _crd_schema(kind: str) -> dict:
    path = DATA / "kuberay" / KUBERAY_VERSION / f"ray.io_{kind.lower()}s.yaml.gz"
    crd = yaml.load(gzip.decompress(path.read_bytes()), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(version["schema"]["openAPIV3Schema"])


def _strict(schema):
    """The API server's strict field validation (kubectl's default): a field the schema does
    not name is an error, except under x-kubernetes-preserve-unknown-fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) if k in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not") else v
           for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def _cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec" if manifest["kind"] == "RayJob" else "rayClusterConfig"]


def _ray_pods(manifest: dict) -> list[dict]:
    spec = _cluster_spec(manifest)
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def _quantity(value) -> float:
    """A Kubernetes quantity (cpu "88", "500m"; memory "24Gi", "4000000000") as a number."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()
    return float(number) * units.get(unit, 1)


def _allocatable(instance: str) -> tuple[float, float, int]:
    """(CPUs, bytes, GPUs) a pod can request on the node type: the EKS kubelet's
    kube-reserved and eviction threshold plus the DaemonSets (CNI, kube-proxy, the NVIDIA
    device plugin) stay below 1 CPU + 6 % and 2 GiB + 6 %."""
    node = INSTANCES[instance]
    return (node["vcpu"] - 1 - 0.06 * node["vcpu"], (node["memory_gib"] * (1 - 0.06) - 2) * GIB, node["gpus"])


MANIFESTS = ["rayjob.yaml", "rayservice.yaml"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifest_passes_the_pinned_operators_crd(name):
    manifest = _yaml(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    _crd(manifest["kind"]).validate(manifest)
    assert _cluster_spec(manifest)["rayVersion"] == "2.60.0"  # requirements.txt's ray


def test_the_crd_check_refuses_unknown_and_mistyped_fields():
    """The check above is only worth something if it fails: a misspelled field (which the
    API server refuses under strict validation) and a wrong type."""
    validator = _crd("RayJob")
    job = _yaml("rayjob.yaml")
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["tolerration"] = []
    with pytest.raises(jsonschema.ValidationError, match="tolerration"):
        validator.validate(typo)
    wrong = copy.deepcopy(job)
    wrong["spec"]["backoffLimit"] = "2"
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(wrong)


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_pods_fit_their_node_type_with_a_sized_shm(name):
    for group in _ray_pods(_yaml(name)):
        pod = group["template"]["spec"]
        instance = pod["nodeSelector"]["node.kubernetes.io/instance-type"]
        cpus, memory, gpus = _allocatable(instance)
        (container,) = pod["containers"]
        res = container["resources"]
        assert res["requests"] == res["limits"], "requests = limits: Ray counts the limits, the scheduler the requests"
        want = res["requests"]
        assert _quantity(want["cpu"]) <= cpus, f"{instance}: cpu {want['cpu']} > allocatable {cpus:.1f}"
        assert _quantity(want["memory"]) <= memory, f"{instance}: memory {want['memory']} > {memory / GIB:.0f}Gi"
        assert int(want.get("nvidia.com/gpu", 0)) <= gpus
        if int(want.get("nvidia.com/gpu", 0)):
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        # /dev/shm: memory-backed, counted in the memory limit, larger than Ray's object store
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        shm = _quantity(volume["emptyDir"]["sizeLimit"])
        assert volume["emptyDir"]["medium"] == "Memory" and shm < _quantity(want["memory"])
        assert _quantity(group["rayStartParams"]["object-store-memory"]) < shm


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_kuberay_pod_gets_the_credentials_and_token_auth(name):
    manifest = _yaml(name)
    secrets = {STORAGE_SECRET} | ({SERVE_SECRET} if manifest["kind"] == "RayService" else set())
    for group in _ray_pods(manifest):
        for container in group["template"]["spec"]["containers"]:
            names = {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
            assert secrets <= names, f"{container['name']} lacks {secrets - names}"
            assert not any("AWS_" in e.get("name", "") or "TOKEN" in e.get("name", "") and "value" in e
                           for e in container.get("env", [])), "secrets come from a Secret, never inline"
    # the dashboard and its Jobs API run code on these pods: every connection needs the token
    assert _cluster_spec(manifest)["authOptions"]["mode"] == "token"


def test_rayjob_runs_the_job_on_its_workers_and_cleans_up():
    job = _yaml("rayjob.yaml")
    args = _launch_args(job["spec"]["entrypoint"])
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]
    _check_job_fits(args, group["replicas"], _quantity(limits["cpu"]), int(limits["nvidia.com/gpu"]))
    assert job["spec"]["backoffLimit"] >= 1 and job["spec"]["shutdownAfterJobFinishes"]
    assert 0 < job["spec"]["ttlSecondsAfterFinished"]
    # the code is the image's: no working_dir upload from the submitter pod
    assert "working_dir" not in yaml.safe_load(job["spec"].get("runtimeEnvYAML") or "{}")


def test_rayservice_deploys_cluster_serve_yaml():
    """serveConfigV2 is cluster/serve.yaml (the config `serve run` and the tests use):
    edit both together."""
    service = _yaml("rayservice.yaml")
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == _yaml("serve.yaml")


def test_rayservice_workers_hold_the_serve_replicas():
    service = _yaml("rayservice.yaml")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    (deployment,) = app["deployments"]  # Serve's own options: replicas and their resources
    actor, scaling = deployment["ray_actor_options"], deployment["autoscaling_config"]
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # replicas go to the GPU pods
    (group,) = cluster["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    per_pod = min(int(limits["nvidia.com/gpu"]) // actor["num_gpus"], _quantity(limits["cpu"]) // actor["num_cpus"])
    assert per_pod >= 1
    assert group["minReplicas"] * per_pod >= scaling["min_replicas"]
    assert group["maxReplicas"] * per_pod >= scaling["max_replicas"]


# --- Ray cluster launcher -------------------------------------------------------------

def _launcher() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _yaml("aws-gpu.yaml")
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does: Ray's defaults filled in
    validate_config(prepared)  # jsonschema against ray/autoscaler/ray-schema.json of the installed wheel
    return prepared


def _docker_options(config: dict, head: bool) -> list[str]:
    d = config["docker"]
    return d.get("run_options", []) + d.get("head_run_options" if head else "worker_run_options", [])


def _size(text: str) -> float:
    number, unit = re.fullmatch(r"'?([0-9.]+)([kmgt]?)b?'?", text.lower()).groups()
    return float(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit]


def test_launcher_config_passes_rays_schema_and_installs_nothing_over_the_image():
    config = _launcher()
    assert config["docker"]["image"] == _makefile_var("IMAGE")
    # Ray's defaults would pip-install a nightly Ray and boto3 into another interpreter
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert config[key] == [], key
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "~/venv" not in command and "pip install" not in command


def test_launcher_head_runs_the_autoscaler_with_token_auth_and_a_loopback_dashboard():
    config = _launcher()
    head = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head  # without it no worker is ever launched
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1", head) and "0.0.0.0" not in head
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_launcher_nodes_get_s3_access_and_the_mlflow_server():
    config = _launcher()
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"].get("IamInstanceProfile"), f"{name} has no IAM instance profile (S3)"
    head = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    worker = next(c for c in config["worker_start_ray_commands"] if "ray start" in c)
    assert "mlflow server --host $HEAD_IP --port 5000" in head
    assert "MLFLOW_TRACKING_URI=http://$HEAD_IP:5000" in head
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in worker
    # exported before `ray start`, so the raylet passes it to the driver and the workers
    for command in (head, worker):
        assert command.index("export MLFLOW_TRACKING_URI") < command.index("ray start")


def test_launcher_node_types_fit_their_instances_with_a_sized_shm():
    config = _launcher()
    head_type = config["head_node_type"]
    commands = {True: " ".join(config["head_start_ray_commands"]), False: " ".join(config["worker_start_ray_commands"])}
    for name, node_type in config["available_node_types"].items():
        node = INSTANCES[node_type["node_config"]["InstanceType"]]
        assert node_type["resources"]["CPU"] <= node["vcpu"] and node_type["resources"]["GPU"] == node["gpus"]
        options = _docker_options(config, name == head_type)
        (shm,) = [_size(o.split("=", 1)[1]) for o in options if o.startswith("--shm-size")]
        store = float(re.search(r"--object-store-memory[= ](\d+)", commands[name == head_type]).group(1))
        assert store < shm < node["memory_gib"] * GIB / 2, (name, store, shm)
        if node["gpus"]:
            assert "--gpus all" in options
    assert sum(t["max_workers"] for n, t in config["available_node_types"].items() if n != head_type) \
        <= config["max_workers"]


def test_cluster_readme_submit_command_fits_the_launcher_cluster():
    text = (CLUSTER / "README.md").read_text()
    block = text.split("```sh\nRAY_AUTH_MODE=token ray job submit", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    assert "--address http://127.0.0.1:8265" in block  # through `ray dashboard`'s ssh tunnel
    assert "--runtime-env cluster/runtime_env.yaml" in block
    args = _launch_args(block[block.index("python jobs/train.py"):])
    assert args.preset == "ffhq256"
    config = _launcher()
    (gpu_type,) = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    _check_job_fits(args, gpu_type["min_workers"], gpu_type["resources"]["CPU"], gpu_type["resources"]["GPU"])


# --- runtime_env, serve ---------------------------------------------------------------

def test_runtime_env_holds_no_secrets():
    env = _yaml("runtime_env.yaml")
    assert not any(k.startswith("AWS_") or "SECRET" in k or "TOKEN" in k for k in env.get("env_vars", {}))


def test_runtime_env_uploads_the_code_without_tests(tmp_path):
    """The package Ray's own packaging makes of this checkout with runtime_env.yaml's
    excludes (what `ray job submit --working-dir .` uploads)."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    env = _yaml("runtime_env.yaml")
    assert env["working_dir"] == "."
    package = tmp_path / "package.zip"
    create_package(str(ROOT), package, include_gitignore=True, excludes=env["excludes"])
    names = zipfile.ZipFile(package).namelist()
    assert "jobs/train.py" in names and "vdvae_dist/cli.py" in names
    assert "vdvae_dist/config/presets/tiny.toml" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", ".git/", ".venv/", "build/"))]
    assert package.stat().st_size < 2 * 2**20, f"{package.stat().st_size} bytes uploaded on every submit"


def test_serve_config_builds_the_app_with_valid_settings():
    spec = _yaml("serve.yaml")
    (app,) = spec["applications"]
    module, name = app["import_path"].split(":")
    assert module == "vdvae_dist.serve.app"
    from vdvae_dist.config import load
    from vdvae_dist.serve import app as serve_app

    load(overrides=app["args"]["set"])  # the settings validate like --set
    (deployment,) = app["deployments"]  # replicas and resources: Serve's deployment options
    scaling = deployment["autoscaling_config"]
    assert scaling["max_replicas"] >= scaling["min_replicas"] and deployment["ray_actor_options"]["num_gpus"] == 1
    built = getattr(serve_app, name)(app["args"])  # binding only: the replicas load the weights
    assert type(built).__name__ == "Application"
    assert (ROOT / "jobs" / "serve.py").exists()
