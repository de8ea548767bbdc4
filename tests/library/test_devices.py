"""No tensor of the library is created on a hard-coded device: every factory call names a device.

Without an accelerator in CI this is checked by reading the code: every ``torch.<factory>(...)`` call in
``pbs2p/`` (docstrings aside) passes ``device=``, except where a comment-free allowlist below says why.
The ``*_like`` factories take the device of their argument and need none.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch

import pbs2p

FACTORIES = {"zeros", "ones", "empty", "full", "arange", "eye", "tensor", "rand", "randn", "randint", "linspace",
             "as_tensor", "from_numpy"}
# (file, function): why it may build tensors on the host
ALLOWED = {
    ("kernels/packing.py", "nm_tables"): "lookup tables built once on the host; _constant() moves them to the "
                                         "device of the codes they decode",
    ("pipeline/text.py", "sample_segments"): "calibration token ids are drawn on the host, as a tokenizer returns "
                                             "them; calibrate moves each batch to its compute device",
    ("pipeline/text.py", "calibration_tokens"): "the tokenizer's ids, on the host like the tokenizer's own output",
}


class _Calls(ast.NodeVisitor):
    """Factory calls with the innermost function they are in."""

    def __init__(self, file: str) -> None:
        self.file, self.stack, self.found = file, ["<module>"], []

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "torch" \
                and f.attr in FACTORIES:
            has_device = any(k.arg == "device" for k in node.keywords)
            self.found.append((self.file, self.stack[-1], node.lineno, f.attr, has_device))
        self.generic_visit(node)


def factory_calls() -> list[tuple[str, str, int, str, bool]]:
    root = Path(pbs2p.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        visitor = _Calls(str(path.relative_to(root)))
        visitor.visit(ast.parse(path.read_text()))
        found += visitor.found
    return found


def test_every_factory_call_names_a_device():
    calls = factory_calls()
    assert len(calls) > 20  # the scan sees the code
    missing = sorted({(f, fn, line, attr) for f, fn, line, attr, has_device in calls
                      if not has_device and (f, fn) not in ALLOWED})
    assert not missing, f"factory calls without device=: {missing}"


def test_host_tables_follow_the_codes():
    """The allowlisted host tables reach the codes' device (here: a meta tensor stands in for another device)."""
    from pbs2p.kernels import packing

    codes = torch.empty(1, 2, packing.nm_tables(4, 8).block_bytes, dtype=torch.uint8, device="meta")
    assert packing._constant(packing.nm_tables(4, 8).kept, codes).device.type == "meta"
