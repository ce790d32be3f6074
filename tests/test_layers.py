"""Imports run one way only, down the layers of docs/design.md §1."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "cifs_jax"
# docs/design.md §1, top first; a module may import only from its own layer
# or a lower one (a higher number).
LAYERS = {
  "entry": 0,
  "analysis": 1,
  "runs": 2,
  "config": 3,
  "training": 4,
  "evaluation": 4,
  "attacks": 5,
  "losses": 6,
  "parallel": 7,
  "models": 8,
  "data": 8,
  "validation": 9,
  "xla_flags": 9,
}
ENTRY_POINTS = {
  "main",
  "evaluate",
  "analyze",
  "report",
  "cli",
  "distributed",
  "library_logs",
  "data.prepare",
}
CONFIG = {"experiment_config", "protocol_names"}
# Packages that must not import each other although they share a layer.
SIBLINGS = [{"training", "evaluation"}, {"models", "data"}]


def layer_of(module: str) -> str:
  """The layer of ``module``, a dotted name below cifs_jax ("" for the
  package itself)."""
  if module in ENTRY_POINTS:
    return "entry"
  if module in CONFIG:
    return "config"
  return module.split(".")[0] or "xla_flags"


def module_imports() -> dict[str, set[str]]:
  """{module: the cifs_jax modules it imports}, from every file's AST."""
  imports = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    module = ".".join(p for p in parts if p != "__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module:
        if node.module == "cifs_jax":
          found |= {alias.name for alias in node.names}
        elif node.module.startswith("cifs_jax."):
          found.add(node.module[len("cifs_jax.") :])
      elif isinstance(node, ast.Import):
        found |= {
          alias.name[len("cifs_jax.") :]
          for alias in node.names
          if alias.name.startswith("cifs_jax.")
        }
    imports[module] = found
  return imports


def test_every_module_has_a_layer():
  for module in module_imports():
    assert layer_of(module) in LAYERS, module


def upward_imports(imports: dict[str, set[str]]) -> list[str]:
  """Each import of ``imports`` from a higher layer, as text."""
  return [
    f"{module} ({layer_of(module)}) imports {name} ({layer_of(name)})"
    for module, names in imports.items()
    for name in names
    if LAYERS[layer_of(name)] < LAYERS[layer_of(module)]
  ]


def test_no_import_runs_up_the_layers():
  upward = upward_imports(module_imports())
  assert not upward, "\n".join(upward)


@pytest.mark.parametrize("pair", SIBLINGS, ids=lambda p: "-".join(sorted(p)))
def test_siblings_do_not_import_each_other(pair):
  crossing = [
    f"{module} imports {name}"
    for module, names in module_imports().items()
    for name in names
    if {layer_of(module), layer_of(name)} == pair
  ]
  assert not crossing, "\n".join(crossing)


def test_the_check_sees_imports_and_flags_an_upward_one():
  """The AST scan finds imports, and the check flags one that goes up."""
  imports = module_imports()
  assert "training" in imports["experiment_config"]
  assert "runs.directory" in imports["runs.trainer"]
  assert upward_imports({"attacks.pgd": {"runs.directory"}}) == [
    "attacks.pgd (attacks) imports runs.directory (runs)"
  ]


def test_config_validation_does_not_import_the_evaluation_package():
  """It checks protocol and attack names against protocol_names."""
  imports = module_imports()
  for module in CONFIG:
    assert not {n for n in imports[module] if layer_of(n) == "evaluation"}
