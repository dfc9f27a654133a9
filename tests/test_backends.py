"""Compute segments between collectives, and the inductor and TensorRT backends that compile them."""

from __future__ import annotations

import importlib.util
import operator

import pytest
import torch

import distrifx
from distrifx.backends import apply_backend, is_collective, is_segment, segments, split_segments
from distrifx.backends.torch_compile import InductorSegment, compile_module
from distrifx.capture import capture
from distrifx.config import Backend, ParallelConfig
from distrifx.models import random_unet, unet_inputs
from distrifx.passes import META_SIGNATURE, collective_order
from distrifx.runtime import SimulatedWorld
from distrifx.runtime.ops import is_start
from distrifx.runtime.program import RankProgram, build_program
from tests import export_workers
from tests.conftest import ChunkedAttentionBlock, tensorrt_missing


def _stale_programs(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[list[RankProgram], list]:
    """Both ranks' warm-up and stale graphs of ``model``, and its flat inputs."""
    captured = capture(model, args, kwargs)
    config = ParallelConfig(world_size=2, mode="stale", warmup_steps=1)
    programs = [build_program(captured, config, rank, type(model).__name__) for rank in range(2)]
    flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
    return programs, flat


@pytest.fixture(scope="module")
def stale_programs():
    """Both ranks' warm-up and stale graphs of the tiny SD 1.5 UNet, and its flat inputs."""
    unet = random_unet("sd15")
    return _stale_programs(unet, *unet_inputs(unet))


def _run_phases(programs: list[RankProgram], flat: list) -> list[list[tuple]]:
    """Every simulated rank's (outputs, state) of a warm-up step and a stale step."""

    def run(group):
        state, outputs = {}, []
        with torch.no_grad():
            for phase in ("warmup", "stale"):
                out, state = programs[group.rank].run(phase, group, flat, state)
                outputs.append((out, state))
        return outputs

    return distrifx.simulate(run, 2)


def _split(programs: list[RankProgram]) -> list[RankProgram]:
    return [RankProgram({p: split_segments(g) for p, g in prog.graphs.items()}, prog.out_spec) for prog in programs]


def _assert_same_steps(programs: list[RankProgram], splits: list[RankProgram], flat: list) -> None:
    """The split programs give every rank the outputs and state of the unsplit ones, bit for bit."""
    for rank_a, rank_b in zip(_run_phases(programs, flat), _run_phases(splits, flat), strict=True):
        for (out_a, state_a), (out_b, state_b) in zip(rank_a, rank_b, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(out_a, out_b, strict=True))
            assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def _compute_runs(gm: torch.fx.GraphModule) -> int:
    """Maximal runs of compute nodes between collectives, counted on the unsplit graph."""
    runs, in_run = 0, False
    for node in gm.graph.nodes:
        compute = node.op in ("call_function", "call_method") and not is_collective(node) and node.target is not getattr
        runs += compute and not in_run
        in_run = compute or (in_run and not is_collective(node))
    return runs


@pytest.mark.parametrize("phase", ["warmup", "stale"])
def test_split_alternates_compute_segments_and_collectives(stale_programs, phase):
    programs, _ = stale_programs
    gm = programs[0].graphs[phase]
    code = gm.code
    split = split_segments(gm)
    assert gm.code == code  # pure: the rank graph is untouched
    assert len(segments(split)) == _compute_runs(gm) > 10
    assert collective_order(split) == collective_order(gm)
    assert split.meta[META_SIGNATURE] == gm.meta[META_SIGNATURE]
    comm = next(iter(split.graph.nodes))
    for node in split.graph.nodes:
        assert node.op in ("placeholder", "output") or is_segment(node) or is_collective(node) or (
            node.target is operator.getitem and is_segment(node.args[0])), node.format_node()
        if is_segment(node):  # neither the communicator nor an in-flight Work enters a segment
            assert comm not in node.args and not any(is_start(a) for a in node.args)
    for _, segment in segments(split):
        assert not any(is_collective(n) for n in segment.graph.nodes)
        assert "comm" not in [n.name for n in segment.graph.nodes if n.op == "placeholder"]


def test_split_graphs_give_the_same_outputs_on_the_simulated_runtime(stale_programs):
    programs, flat = stale_programs
    _assert_same_steps(programs, _split(programs), flat)


def test_a_multi_output_op_and_the_getitems_that_unpack_it_share_a_segment():
    """The scheduler puts the K/V exchange between ``chunk`` and the getitem of its query: that getitem
    runs in the chunk's segment, so only tensors cross segment boundaries (compilers take tensors)."""
    programs, flat = _stale_programs(ChunkedAttentionBlock().eval(), (torch.randn(1, 4, 16, 16),), {})
    splits = _split(programs)
    crossing = []
    for prog in splits:
        for _, segment in (s for gm in prog.graphs.values() for s in segments(gm)):
            segment.register_forward_hook(lambda _, args, out: crossing.extend([*args, *out]))
    _assert_same_steps(programs, splits, flat)
    assert crossing and all(isinstance(value, torch.Tensor) for value in crossing)


def test_inductor_compiles_only_the_segments_and_keeps_the_collective_order(stale_programs):
    programs, _ = stale_programs
    gm = programs[0].graphs["stale"]
    compiled = apply_backend(gm, Backend.INDUCTOR)  # lazy: nothing compiles until called
    assert compiled.meta[META_SIGNATURE] == gm.meta[META_SIGNATURE]
    assert collective_order(compiled) == collective_order(gm)
    compiled_segments = [compiled.get_submodule(str(n.target)) for n in compiled.graph.nodes if is_segment(n)]
    assert len(compiled_segments) == _compute_runs(gm)
    assert all(isinstance(s, InductorSegment) and s.compiled is None for s in compiled_segments)
    assert apply_backend(gm, Backend.EAGER) is gm


def test_only_the_steady_phase_freezes_its_weights():
    """A frozen graph holds its own copy of the weights: warm-up, a few steps, keeps them live."""
    unet = random_unet("sd15", **export_workers.ONE_LEVEL_SD15)
    args, kwargs = unet_inputs(unet)
    config = ParallelConfig(world_size=2, mode="stale", warmup_steps=1, backend="inductor")
    program = build_program(capture(unet, args, kwargs), config, 0, "UNet")  # lazy: nothing compiles

    def frozen(phase: str) -> set[bool]:
        return {segment.freeze for _, segment in segments(program.graphs[phase])}

    assert frozen("warmup") == {False} and frozen("stale") == {True}


@pytest.mark.parametrize("freeze", [True, False])
def test_a_segment_runs_inductor_code_without_dynamo_and_freezes_only_when_asked(freeze):
    """Compiled on its first call, then called directly: dynamo traces nothing, so no frame or guards per call."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    graph = torch.fx.Graph()  # a segment as split_segments makes them: ATen ops, weights read by get_attr
    x = graph.placeholder("x")
    conv = graph.call_function(torch.ops.aten.conv2d.default, (x, graph.get_attr("weight"), None, [1, 1], [1, 1]))
    graph.output((graph.call_function(torch.ops.aten.relu.default, (conv,)),))
    segment = torch.fx.GraphModule({"weight": torch.nn.Parameter(torch.randn(8, 4, 3, 3))}, graph)
    compiled = InductorSegment(segment, freeze)
    x = torch.randn(1, 4, 8, 8)
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        expected = segment(x)[0]
        first = compiled(x)[0]
        assert (first - expected).abs().max() < 1e-5
        assert compiled(x)[0].equal(first)
        segment.weight.mul_(2)
        # frozen: folded in on the first call, later weight changes do not reach it; not frozen: they do
        assert compiled(x)[0].equal(first) is freeze
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("freeze", [True, False])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_inductor_freezes_the_weights_it_compiles(kind, freeze):
    """Dynamo must see ``freezing`` when it traces: the weights become constants of the compiled code."""
    torch.manual_seed(0)
    layer, x = {"conv": (torch.nn.Conv2d(4, 8, 3, padding=1), torch.randn(1, 4, 8, 8)),
                "linear": (torch.nn.Linear(4, 4), torch.randn(2, 4))}[kind]
    compiled = compile_module(layer, "inductor", freeze=freeze)
    with torch.no_grad():
        first = compiled(x)
        layer.weight.mul_(2)
        assert not torch.equal(layer(x), first)
        # frozen: folded on the first call, later weight changes do not reach it; unfrozen: they do
        assert torch.equal(compiled(x), first) is freeze


def test_inductor_backend_equals_eager_in_sync_mode_on_gloo_ranks():
    ranks = distrifx.launch(export_workers.inductor_vs_eager, 2, threads_per_rank=1, timeout_s=600, all_ranks=True)
    for to_model, to_eager, num_segments, compiled_segments in ranks:
        assert to_model < 1e-5 and to_eager < 1e-5
        assert compiled_segments == num_segments > 10  # every segment compiled, each as one graph


@pytest.mark.parametrize("missing,message", [
    ("cuda", "a CUDA device"),
    ("package", "the torch_tensorrt package"),
])
def test_tensorrt_backend_says_what_is_missing_and_how_to_install_it(monkeypatch, missing, message):
    if missing == "cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    else:
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch_tensorrt"
                            else find_spec(name, *a))
    unet = random_unet("sd15", **export_workers.ONE_LEVEL_SD15)
    with pytest.raises(distrifx.ConfigError, match=f"backend='tensorrt' runs TensorRT engines, which need .*{message}.*"
                                                   r"pip install \"distrifx\[tensorrt\]\""):
        distrifx.parallelize(unet, 2, backend="tensorrt", process_group=SimulatedWorld(2).group(0))


@pytest.mark.gpu
@pytest.mark.skipif(bool(tensorrt_missing()), reason=f"the TensorRT backend needs CUDA and torch_tensorrt: {tensorrt_missing()}")
def test_tensorrt_backend_equals_the_model_in_sync_mode_on_simulated_ranks():
    unet = random_unet("sd15", **export_workers.ONE_LEVEL_SD15).cuda()
    args, kwargs = unet_inputs(unet)
    args, kwargs = torch.utils._pytree.tree_map(lambda x: x.cuda() if isinstance(x, torch.Tensor) else x, (args, kwargs))
    with torch.no_grad():
        expected = unet(*args, **kwargs).sample

    def rank(group):
        punet = distrifx.parallelize(unet, 2, mode="sync", cfg_parallel=False, backend="tensorrt", process_group=group,
                                     timeout_s=600)
        return punet(*args, **kwargs).sample

    for out in distrifx.simulate(rank, 2, timeout_s=600):  # engines are built on the first call: allow for it
        assert float((out - expected).abs().max() / expected.abs().max()) < 1e-2  # TF32 convolutions, as in eager
