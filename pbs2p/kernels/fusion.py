"""Packed linears that read the same activations, fused into one operator call: an Inductor graph pass.

A decoder layer multiplies one normalized hidden state by three packed weights (``q_proj``, ``k_proj``,
``v_proj``) and another by two (``gate_proj``, ``up_proj``). At batch 1 each ``pbs2p::bsp_linear`` call builds
its tables of activation sums and enters a parallel region of its own, which costs as much as the lookups of a
small weight. :class:`FusePackedLinears` rewrites a compiled graph so that the calls on the same activations
(without bias, with the same N:M and scale block) become one ``pbs2p::bsp_linear_multi`` call: its outputs equal
the separate calls' bit for bit, but one batch row builds the tables once and runs all the weights' row tiles in
one parallel region. :class:`pbs2p.Generator` compiles its decode step with it; pass it to your own
``torch.compile`` as Inductor's ``post_grad_custom_post_pass``.

Example (on a graph traced with ``make_fx``; ``torch.compile(fn, options={"post_grad_custom_post_pass":
pbs2p.FusePackedLinears()})`` applies it to the graphs Inductor compiles):
    >>> import torch, pbs2p
    >>> from torch.fx.experimental.proxy_tensor import make_fx
    >>> from pbs2p.kernels.fusion import fuse_packed_linears
    >>> q, k = torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(64, 16, bias=False)
    >>> _ = pbs2p.quantize_(torch.nn.Sequential(q, k), pbs2p.PBS2P(n=4, m=8))
    >>> x = torch.randn(1, 64)
    >>> with torch.inference_mode():
    ...     graph = make_fx(lambda x: (q(x), k(x)))(x)
    ...     fused = fuse_packed_linears(graph.graph)
    ...     _ = graph.recompile()
    ...     same = all(torch.equal(a, b) for a, b in zip(graph(x), (q(x), k(x))))
    >>> fused, same
    (2, True)
"""

from __future__ import annotations

import operator

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files


def fuse_packed_linears(graph: torch.fx.Graph) -> int:
    """Replaces the ``pbs2p::bsp_linear`` calls of ``graph`` that share their activations (and have no bias, the same
    N:M and scale block) by one ``pbs2p::bsp_linear_multi`` call each; returns how many calls it fused."""
    try:
        single = torch.ops.pbs2p.bsp_linear.default
    except AttributeError:  # the native operator is not loaded: the graph holds none of its calls
        return 0
    position: dict[torch.fx.Node, float] = {node: i for i, node in enumerate(graph.nodes)}
    groups: dict[tuple, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is single and not node.kwargs and len(node.args) == 8:
            x, _, _, _, bias, n, m, scale_block = node.args
            if bias is None:
                groups.setdefault((x, n, m, scale_block), []).append(node)
    fused = 0
    for (x, n, m, scale_block), nodes in groups.items():
        # one call where the first of them is: the weights of the others must be there already (graph inputs in
        # a compiled model; constants, moved up, in a traced graph)
        first = nodes[0]

        def ready(a: object, first: torch.fx.Node = first) -> bool:
            return not isinstance(a, torch.fx.Node) or a.op == "get_attr" or position[a] < position[first]

        nodes = [nd for nd in nodes if all(ready(a) for a in nd.args[1:4])]
        if len(nodes) < 2:
            continue
        for a in (a for nd in nodes for a in nd.args[1:4]):
            if isinstance(a, torch.fx.Node) and position[a] > position[first]:
                first.prepend(a)
                position[a] = position[first] - 0.5
        with graph.inserting_before(first):
            multi = graph.call_function(torch.ops.pbs2p.bsp_linear_multi.default,
                                        (x, [nd.args[1] for nd in nodes], [nd.args[2] for nd in nodes],
                                         [nd.args[3] for nd in nodes], n, m, scale_block))
            multi.meta["val"] = [nd.meta.get("val") for nd in nodes]
            items = [graph.call_function(operator.getitem, (multi, i)) for i in range(len(nodes))]
        for node, item in zip(nodes, items, strict=True):
            item.meta.update(node.meta)
            node.replace_all_uses_with(item)
            graph.erase_node(node)
        fused += len(nodes)
    return fused


class FusePackedLinears(CustomGraphPass):
    """Inductor's ``post_grad_custom_post_pass`` that fuses the packed linears reading the same activations
    (``fuse_packed_linears`` in ``pbs2p.kernels.fusion``): at batch 1 the q, k and v projections of a layer become
    one ``pbs2p::bsp_linear_multi`` call, and so do gate and up, with the same outputs bit for bit. Its ``uuid``
    keys Inductor's cache of compiled graphs on this file. :class:`pbs2p.Generator` compiles its decode step
    with it; give it to your own ``torch.compile`` as below.

    Example:
        >>> from pbs2p import FusePackedLinears
        >>> options = {"post_grad_custom_post_pass": FusePackedLinears()}  # torch.compile(model, options=options)
        >>> len(FusePackedLinears().uuid())  # a sha256 of this file
        32
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        fuse_packed_linears(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))
