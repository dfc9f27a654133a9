"""Export a model on its first call's inputs into a GraphModule the passes can rewrite.

Parameters and buffers become ``get_attr`` nodes that refer to the model's own tensors (no copy),
so every per-rank graph shares the weights. Placeholders are the flattened user inputs, in pytree
order; the output is the flat tuple of user outputs. ``in_spec``/``out_spec`` restore the call
signature and return type (tuples, dataclass outputs, ``return_dict``).
"""

from __future__ import annotations

import itertools
import threading
import warnings
import weakref
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx import Graph, GraphModule
from torch.utils._pytree import TreeSpec, tree_flatten

from distrifx.errors import CaptureError

__all__ = ["CapturedProgram", "capture", "signature_key"]

# torch.export keeps tracing state in globals; simulated ranks (threads) must not export at once.
_EXPORT_LOCK = threading.Lock()
# One capture per (model, input signature), shared by every ParallelModule of that model in this
# process (simulated ranks, several modes). Keyed weakly; invalidated when parameters are replaced.
_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, dict[Hashable, CapturedProgram]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class CapturedProgram:
    """A captured model: its global graph and how to call it.

    The analysis pass writes metadata on ``graph_module``; hold ``lock`` while running passes on it.
    """

    graph_module: GraphModule
    in_spec: TreeSpec
    out_spec: TreeSpec
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)


def signature_key(args: tuple, kwargs: dict) -> Hashable:
    """What a captured graph is specialized to: tensor shapes/dtypes/devices, other leaf values."""
    leaves, spec = tree_flatten((args, kwargs))
    return spec, tuple(_leaf_key(x) for x in leaves)


def _leaf_key(x: object) -> Hashable:
    if isinstance(x, torch.Tensor):
        return "T", tuple(x.shape), x.dtype, x.device.type
    if isinstance(x, torch.Generator):  # passed through by pipelines, never read by the graph
        return "G", x.device.type
    return "C", repr(x)


def _lift_to_attrs(ep: ExportedProgram) -> GraphModule:
    """Rebuild the exported graph with parameters/buffers/constants as ``get_attr`` nodes."""
    sig = ep.graph_signature
    tensors = {**ep.state_dict, **ep.constants}
    lifted = {
        spec.arg.name: spec.target
        for spec in sig.input_specs
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    }
    mutated = [s for s in sig.output_specs if s.kind not in (OutputKind.USER_OUTPUT,)]
    if mutated:
        names = ", ".join(str(s.target) for s in mutated)
        raise CaptureError(
            f"the model mutates state during forward ({names}); distrifx parallelizes pure "
            "inference forwards. Disable in-place state updates (caches, running stats) first."
        )
    graph = Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in lifted:
            new = graph.get_attr(lifted[node.name])
        else:
            new = graph.node_copy(node, lambda n: env[n])
        new.meta = dict(node.meta)
        env[node] = new
    root = {target: tensors[target] for target in lifted.values()}
    return GraphModule(root, graph)


def _state_fingerprint(model: torch.nn.Module) -> Hashable:
    """Which tensors the model holds: a parameter or buffer replaced (non-persistent ones included,
    which ``state_dict`` leaves out) means a new capture."""
    return tuple((name, id(t)) for name, t in itertools.chain(model.named_parameters(), model.named_buffers()))


def capture(model: torch.nn.Module, args: tuple, kwargs: dict) -> CapturedProgram:
    """Export ``model(*args, **kwargs)`` (non-strict) and lift its state to attributes (cached)."""
    key = (signature_key(args, kwargs), _state_fingerprint(model))
    with _EXPORT_LOCK:
        cached = _CACHE.setdefault(model, {})
        if key not in cached:
            cached[key] = _export(model, args, kwargs)
        return cached[key]


def _export(model: torch.nn.Module, args: tuple, kwargs: dict) -> CapturedProgram:
    try:
        ep = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
    except Exception as exc:
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {exc}\n"
            "distrifx needs a forward that torch.export can trace without data-dependent Python "
            "control flow on tensor values. Check torch.export.export(model, args, kwargs, "
            "strict=False) on its own, and see the torch.export troubleshooting docs."
        ) from exc
    if _mutates(ep):
        with warnings.catch_warnings():  # torch deep-copies its own tree specs, with a deprecation warning
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            ep = ep.run_decompositions({})  # functionalized, no op decomposed: ``x += y`` becomes ``add``
    return CapturedProgram(_lift_to_attrs(ep), ep.call_spec.in_spec, ep.call_spec.out_spec)


def _mutates(ep: ExportedProgram) -> bool:
    """Whether the exported graph has in-place ops (export's training IR keeps them; the rules are for
    functional ops, and a sharded in-place write would leave other rows of a replicated tensor stale)."""
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
               for n in ep.graph.nodes)
