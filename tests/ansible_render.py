"""The roles' variables and templates as Ansible would see them, without Ansible: every role's
defaults and internal vars, the playbooks' wiring (``playbooks/vars/wiring.yml``), templated
values resolved lazily, and templates rendered with the template module's settings. Used by the
static gates and by the fixtures that run a real nginx from the role's own templates."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import yaml

ROOT = Path(__file__).resolve().parent.parent
ROLES = ROOT / "roles"
WIRING = ROOT / "playbooks" / "vars" / "wiring.yml"


def _regex_replace(value: str, pattern: str, replacement: str = "") -> str:
    return re.sub(pattern, replacement, str(value))


def environment(loader: jinja2.BaseLoader | None = None) -> jinja2.Environment:
    """Jinja as Ansible's template module sets it up (trim_blocks, strict), with the few
    Ansible filters the roles' templates and defaults use."""
    env = jinja2.Environment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
    )
    env.filters["realpath"] = os.path.realpath
    env.filters["regex_replace"] = _regex_replace
    env.filters["basename"] = os.path.basename
    env.filters["dirname"] = os.path.dirname
    env.filters["quote"] = shlex.quote  # Ansible's quote is shlex's
    env.filters["to_json"] = json.dumps
    env.filters["combine"] = lambda *dicts: {k: v for d in dicts for k, v in d.items()}
    return env


def _resolve(values: dict[str, Any]) -> dict[str, Any]:
    """Render templated values as Ansible does, lazily: a value is rendered once every variable
    it names is resolved. Values that need what only a host has (``ansible_facts``, registered
    results, filters only Ansible has) stay as they are."""
    env = environment()

    def pending(value: Any) -> bool:
        if isinstance(value, str):
            return "{{" in value
        if isinstance(value, dict):
            return any(pending(v) for v in value.values())
        return False

    def names(value: Any) -> set[str]:
        if isinstance(value, str):
            return jinja2.meta.find_undeclared_variables(env.parse(value))
        if isinstance(value, dict):
            return set().union(*(names(v) for v in value.values())) if value else set()
        return set()

    def render(value: Any) -> Any:
        if isinstance(value, str) and "{{" in value:
            alone = re.fullmatch(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}", value)
            if alone and isinstance(values.get(alone[1]), dict | list):
                return values[alone[1]]  # as Ansible: "{{ a_dict }}" is that dict, not its text
            return env.from_string(value).render(**values)
        if isinstance(value, dict):
            return {k: render(v) for k, v in value.items()}
        return value

    unresolvable: set[str] = set()
    while True:
        progress = False
        for key, value in list(values.items()):
            if key in unresolvable or not pending(value):
                continue
            try:
                deps = names(value)
                if any(pending(values.get(d)) and d not in unresolvable for d in deps):
                    continue
                values[key] = render(value)
            except (jinja2.UndefinedError, jinja2.TemplateAssertionError):
                unresolvable.add(key)
            progress = True
        if not progress:
            return values


def deploy_vars(**overrides: Any) -> dict[str, Any]:
    """Every role's defaults and vars, the wiring on top, then ``overrides`` (as -e would be:
    a fact overridden here flows through the wiring), all resolved."""
    values: dict[str, Any] = {}
    for role in sorted(p for p in ROLES.iterdir() if (p / "tasks" / "main.yml").is_file()):
        for part in ("defaults", "vars"):
            path = role / part / "main.yml"
            if path.is_file():
                values.update(yaml.safe_load(path.read_text()) or {})
    values["role_path"] = str(ROLES / "webstats_services")  # its runbook_src default
    values.update(yaml.safe_load(WIRING.read_text()))
    values.update(overrides)
    return _resolve(values)


def render(template: Path, values: dict[str, Any]) -> str:
    """One template file rendered with ``values`` (includes resolved from its directory)."""
    env = environment(jinja2.FileSystemLoader(str(template.parent)))
    return env.get_template(template.name).render(**values)
