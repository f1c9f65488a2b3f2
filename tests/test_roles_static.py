"""Static checks of the Ansible roles: public variables live in defaults/, carry the role's
name, and are all documented, with the same default, in meta/argument_specs.yml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROLES = Path(__file__).resolve().parent.parent / "roles"
ROLE_NAMES = sorted(p.name for p in ROLES.iterdir() if (p / "tasks" / "main.yml").is_file())


def _load(path: Path):
    return yaml.safe_load(path.read_text()) or {}


def test_the_roles_are_there():
    assert set(ROLE_NAMES) >= {
        "webstats_base",
        "webstats_config",
        "webstats_release",
        "webstats_services",
        "webstats_postgresql_local",
    }


@pytest.mark.parametrize("role", ROLE_NAMES)
def test_defaults_are_prefixed_and_documented(role):
    defaults = _load(ROLES / role / "defaults" / "main.yml")
    specs = _load(ROLES / role / "meta" / "argument_specs.yml")["argument_specs"]
    options = specs["main"]["options"]
    assert defaults, f"{role}: no defaults"
    for name in defaults:
        assert name.startswith(f"{role}_"), f"{role}: {name} lacks the role prefix"
    missing = sorted(set(defaults) - set(options))
    assert not missing, f"{role}: not in argument_specs: {missing}"
    unknown = sorted(set(options) - set(defaults))
    assert not unknown, f"{role}: in argument_specs but not in defaults: {unknown}"
    for name, spec in options.items():
        assert spec.get("description"), f"{role}: {name} has no description"
        assert spec.get("type"), f"{role}: {name} has no type"
        value = defaults[name]
        if isinstance(value, str) and "{{" in value:
            continue  # computed defaults are described, not repeated
        if "default" in spec:
            assert spec["default"] == value, f"{role}: {name} default differs: {spec['default']!r}"


@pytest.mark.parametrize("role", ROLE_NAMES)
def test_entry_points_have_specs(role):
    specs = _load(ROLES / role / "meta" / "argument_specs.yml")["argument_specs"]
    for tasks in (ROLES / role / "tasks").glob("*.yml"):
        assert tasks.stem in specs, f"{role}: tasks/{tasks.name} has no argument spec"
    for entry, spec in specs.items():
        for name in spec.get("options", {}):
            assert name in specs["main"]["options"], f"{role}:{entry}: {name} unknown to main"


@pytest.mark.parametrize(
    "role", [r for r in ROLE_NAMES if (ROLES / r / "vars" / "main.yml").is_file()]
)
def test_private_vars_are_marked(role):
    """vars/ holds internals only: double-underscore names, never public ones."""
    path = ROLES / role / "vars" / "main.yml"
    for name in _load(path):
        assert name.startswith(f"__{role}_"), f"{role}: vars/{name} must be __{role}_…"
