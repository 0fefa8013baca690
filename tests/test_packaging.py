"""The wheel is complete on its own: schemas, migrations and the Celery config ship in it.

Built from the repo, inspected, installed in a fresh virtualenv outside the repo, then the
installed ``outbox`` command migrates a database, enqueues a message and reports status.

How the wheel is built: from a copy of the working tree's source files (``git ls-files``:
tracked plus untracked-but-not-ignored), not in place. An in-place build reuses the editable
install's ``integration_outbox.egg-info/SOURCES.txt`` and any stale ``build/lib``; both put
files back into the wheel that the ``package_data`` configuration forgot (tried: deleting the
``schemas.responses`` line from setup.cfg still shipped the response schemas in place, and not
from a clean copy). Building in place would also write ``build/`` into a tree others share.

How the wheel is installed: a real install, dependencies resolved from the package index, into
a venv created without pip (``python -m venv --without-pip``, then the project's pip with
``--python`` pointing at the fresh interpreter). A plain ``python -m venv`` + ``pip install
<wheel>`` took about 9 s + 23 s here, under the 60 s budget, so no wheelhouse or ``.pth``
shortcut is used: borrowing the project venv's site-packages would hide a dependency missing
from ``install_requires`` (this happened: ``schemas`` imported ``jsonschema`` while only the
``dev`` extra listed it). Skipping ensurepip and byte-compilation (``--no-compile``) brings the
install to about 7 s with a warm pip cache; the first command run compiles what it imports.

Every command runs with its working directory outside the repo and an environment without
``PYTHONPATH``, so nothing in /work/main can stand in for the installed files; the test also
checks where the packages were imported from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

# Hang guards only (a stuck index or command); nothing asserts on durations.
PIP_TIMEOUT_S = 900
COMMAND_TIMEOUT_S = 120

FORBIDDEN_TOP_LEVEL = ("tests/", "bench/", "examples/", "scripts/", "var/")


def _run(cmd: list, *, cwd: Path, env: dict[str, str],
         timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(part) for part in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _explain(proc: subprocess.CompletedProcess) -> str:
    """The command, its exit status and both streams, for an assertion message."""
    return (f"\n$ {' '.join(proc.args)}\nexit status {proc.returncode}\n"
            f"--- stderr ---\n{proc.stderr}\n--- stdout ---\n{proc.stdout}")


def _pip_env() -> dict[str, str]:
    """The caller's environment (pip's index and cache settings) without anything that could
    put the repo on the fresh interpreter's ``sys.path``."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _copy_source(dest: Path) -> None:
    """Copy the working tree's source files (what a fresh clone plus uncommitted work holds)."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=False)
    assert listing.returncode == 0, f"cannot list the repo's files:{_explain(listing)}"
    for name in filter(None, listing.stdout.split("\0")):
        source = REPO / name
        if source.is_file():   # a tracked file deleted in the working tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(wheel path, build output)`` for one ``pip wheel`` of the repo's source."""
    source = tmp_path_factory.mktemp("source")
    out = tmp_path_factory.mktemp("wheelhouse")
    _copy_source(source)
    # -v: pip shows the build backend's output (and so its warnings) only when verbose.
    proc = _run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", out, source],
                cwd=out, env=_pip_env(), timeout=PIP_TIMEOUT_S)
    assert proc.returncode == 0, f"building the wheel failed:{_explain(proc)}"
    wheels = list(out.glob("integration_outbox-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {out}, found {wheels}:{_explain(proc)}"
    return wheels[0], proc.stdout + proc.stderr


def test_wheel_builds_without_package_warnings(built):
    _, output = built
    absent = [line.strip() for line in output.splitlines()
              if "absent from the `packages` configuration" in line]
    assert absent == [], "setuptools would drop data folders:\n" + "\n".join(absent)
    package_warnings = [f"{category}: {text}"
                        for category, text in re.findall(r"\b(\w*Warning): (.+)", output)
                        if "package" in text.lower()]
    assert package_warnings == [], "\n".join(package_warnings)


def test_wheel_contains_schemas_migrations_and_celeryconfig_only(built):
    wheel, _ = built
    names = set(zipfile.ZipFile(wheel).namelist())

    # Compared with the repo's own files, so a schema or migration added later cannot be left out.
    schemas = {p.relative_to(REPO).as_posix() for p in (REPO / "schemas").rglob("*.json")}
    assert {p.split("/")[1] for p in schemas} >= {"operations", "responses"}, schemas
    versions = {p.relative_to(REPO).as_posix()
                for p in (REPO / "outbox/migrations/versions").glob("*.py")}
    assert "outbox/migrations/versions/0001_initial.py" in versions, versions
    required = schemas | versions | {"outbox/migrations/env.py",
                                     "outbox/migrations/script.py.mako", "celeryconfig.py"}
    missing = sorted(required - names)
    assert missing == [], f"missing from {wheel.name}: {missing}"

    unwanted = sorted(n for n in names
                      if n.startswith(FORBIDDEN_TOP_LEVEL) or "__pycache__" in n.split("/")
                      or n.endswith(".pyc"))
    assert unwanted == [], f"should not be in {wheel.name}: {unwanted}"


@pytest.fixture(scope="module")
def fresh_venv(built, tmp_path_factory):
    """A new virtualenv outside the repo with the wheel and its dependencies installed."""
    wheel, _ = built
    home = tmp_path_factory.mktemp("fresh")
    env_dir = home / "venv"
    venv.create(env_dir, with_pip=False, symlinks=True)
    python = env_dir / "bin" / "python"
    proc = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-compile", wheel],
                cwd=home, env=_pip_env(), timeout=PIP_TIMEOUT_S)
    assert proc.returncode == 0, f"installing the wheel failed:{_explain(proc)}"
    return env_dir


def test_installed_wheel_migrates_enqueues_and_reports_status(fresh_venv, redis_url, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    assert not work.resolve().is_relative_to(REPO), f"{work} must be outside the repo"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(work),
        "DATABASE_URL": f"sqlite:///{work / 'outbox.db'}",
        "REDIS_URL": redis_url,
        "OUTBOX_PAYMENTS_API_KEY": "sk_test_wheel",
        "OUTBOX_EMAIL_API_KEY": "sk_test_wheel",
        # Nothing listens on port 9 and no worker runs: nothing is delivered.
        "OUTBOX_PAYMENTS_BASE_URL": "http://127.0.0.1:9",
        "OUTBOX_EMAIL_BASE_URL": "http://127.0.0.1:9",
    }
    bin_dir = fresh_venv / "bin"

    def outbox(*args: str) -> subprocess.CompletedProcess:
        return _run([bin_dir / "outbox", *args], cwd=work, env=env, timeout=COMMAND_TIMEOUT_S)

    modules = "celeryconfig, integrations, outbox, schemas, tasks"
    where = _run([bin_dir / "python", "-c", f"import json, {modules}; print(json.dumps("
                  f"{{m.__name__: m.__file__ for m in ({modules})}}))"],
                 cwd=work, env=env, timeout=COMMAND_TIMEOUT_S)
    assert where.returncode == 0, f"importing the installed packages failed:{_explain(where)}"
    site = (fresh_venv / "lib").resolve()
    for module, file in json.loads(where.stdout).items():
        path = Path(file).resolve()
        assert path.is_relative_to(site) and not path.is_relative_to(REPO), \
            f"{module} imported from {path}, not from the fresh venv {fresh_venv}"

    upgrade = outbox("db", "upgrade")
    assert upgrade.returncode == 0, f"outbox db upgrade failed:{_explain(upgrade)}"

    enqueued = outbox("enqueue", "payments", "charge", "--key", "wheel-1",
                      "--payload", '{"amount": 100, "currency": "usd"}')
    assert enqueued.returncode == 0, f"outbox enqueue failed:{_explain(enqueued)}"
    assert re.search(r"^payments\.charge \S+", enqueued.stdout, re.MULTILINE), \
        f"no message label in the output:{_explain(enqueued)}"

    # Exit status follows health (0 ok, 1 warning, 2 critical); one due message is not critical.
    text = outbox("status")
    assert text.returncode in (0, 1), f"outbox status failed:{_explain(text)}"
    assert re.search(r"^outbox status:", text.stdout, re.MULTILINE), \
        f"no summary line:{_explain(text)}"
    assert "Traceback" not in text.stdout + text.stderr, _explain(text)

    as_json = outbox("status", "--json")
    assert as_json.returncode in (0, 1), f"outbox status --json failed:{_explain(as_json)}"
    try:
        report = json.loads(as_json.stdout)
    except json.JSONDecodeError as exc:
        pytest.fail(f"outbox status --json is not JSON ({exc}):{_explain(as_json)}")
    payments = report["providers"].get("payments")
    assert payments is not None, f"no payments provider in the report:{_explain(as_json)}"
    waiting = payments["by_status"]["pending"] + payments["by_status"]["queued"]
    assert waiting == 1 and sum(payments["by_status"].values()) == 1, payments["by_status"]
