"""Security defaults, checked on the source: servers bind 127.0.0.1 unless told otherwise, remote code is never
trusted by default, and every ``torch.load`` of ours refuses pickled code. (That no planted secret reaches anything a
run writes is checked on a real run: ``tests/test_train_e2e.py::test_training_steps_end_to_end``.)"""

from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("actors", "learners", "simulator", "launch", "bench")


def _calls():
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    yield path.relative_to(REPO_ROOT), node


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    return func.id if isinstance(func, ast.Name) else ""


def _keyword(call: ast.Call, key: str):
    return next((k.value for k in call.keywords if k.arg == key), None)


def test_every_server_binds_this_machine_only_by_default():
    hosts = [(path, _keyword(call, "default")) for path, call in _calls()
             if _name(call.func).endswith("add_argument") and call.args
             and isinstance(call.args[0], ast.Constant) and call.args[0].value == "--host"]
    assert {str(p) for p, _ in hosts} >= {"launch/serve_retriever.py", "launch/serve_simulator.py"}
    for path, default in hosts:
        assert isinstance(default, ast.Constant) and default.value == "127.0.0.1", path


def unsafe_calls(tree: ast.AST) -> list[str]:
    """Calls that trust remote code, or ``torch.load`` without ``weights_only=True``, as ``line: call``."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        trust, only = _keyword(node, "trust_remote_code"), _keyword(node, "weights_only")
        if isinstance(trust, ast.Constant) and trust.value is True:
            found.append(f"{node.lineno}: trust_remote_code=True")
        if _name(node.func) == "torch.load" and not (isinstance(only, ast.Constant) and only.value is True):
            found.append(f"{node.lineno}: torch.load without weights_only=True")
    return found


def test_remote_code_is_never_trusted_and_torch_load_never_unpickles_code():
    found = {str(path): unsafe_calls(ast.parse(path.read_text())) for package in PACKAGES
             for path in sorted((REPO_ROOT / package).rglob("*.py"))}
    assert not {path: calls for path, calls in found.items() if calls}


@pytest.mark.parametrize("source, flagged", [("torch.load(f)", 1), ("torch.load(f, weights_only=True)", 0),
                                             ("torch.load(f, weights_only=False)", 1),
                                             ("AutoModel.from_pretrained(p, trust_remote_code=True)", 1),
                                             ("LLM(p, trust_remote_code=False)", 0)])
def test_the_source_check_flags_what_it_looks_for(source, flagged):
    assert len(unsafe_calls(ast.parse(source))) == flagged
