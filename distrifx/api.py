"""The public entry points: parallelize a model, inspect what the compiler does with it."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Literal

import torch.distributed as dist
import torch
from torch import nn

from distrifx.config import DEFAULT_TIMEOUT_S, Backend, GNVariant, KVExchange, Mode, ParallelConfig
from distrifx.errors import ConfigError, ProcessGroupError
from distrifx.runtime.comm import Communicator, ProcessGroupCommunicator, from_rank0
from distrifx.runtime.controlnet import ParallelControlNet
from distrifx.runtime.module import ParallelModule

__all__ = ["parallelize", "parallelize_pipeline"]


def _communicator(process_group: Any, config: ParallelConfig) -> Communicator:
    if isinstance(process_group, Communicator):  # simulated or timing ranks
        comm: Communicator = process_group
        comm.timeout_s = min(comm.timeout_s, config.timeout_s)
    else:
        if not dist.is_available() or not dist.is_initialized():
            raise ProcessGroupError(
                "distrifx.parallelize needs an initialised torch.distributed process group: run "
                "under torchrun and call torch.distributed.init_process_group('nccl' or 'gloo') "
                "first, or pass process_group=... (a group from distrifx.simulate for one process)."
            )
        group = process_group if process_group is not None else dist.group.WORLD
        comm = ProcessGroupCommunicator(group, config.timeout_s)
    if comm.world_size != config.world_size:
        raise ProcessGroupError(
            f"world_size={config.world_size} but the process group has {comm.world_size} ranks "
            f"(this is rank {comm.rank}). Pass world_size={comm.world_size}, or launch "
            f"{config.world_size} processes (torchrun --nproc-per-node {config.world_size})."
        )
    return comm


def parallelize(
    model: nn.Module,
    world_size: int,
    *,
    mode: Mode | Literal["sync", "stale", "naive"] = "stale",
    warmup_steps: int = 4,
    warmup_fraction: float = 0.0,
    gn_variant: GNVariant | Literal["corrected", "sync", "stale", "separate"] = "corrected",
    kv_exchange: KVExchange | Literal["auto", "kv", "hidden"] = "auto",
    cfg_parallel: bool | Literal["auto"] = "auto",
    backend: Backend | Literal["eager", "inductor", "tensorrt"] = "eager",
    process_group: Any = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    stale_dtype: torch.dtype | Literal["bfloat16", "float16"] | None = None,
    extrapolate: float = 0.0,
    fresh: Sequence[Literal["halo", "kv"]] = (),
    bucket_mb: float = 0.0,
    gather_outputs: bool = True,
) -> ParallelModule:
    """Split ``model`` into ``world_size`` row patches, one per rank of ``process_group``.

    Call on every rank. The result has the model's call signature and return type and returns
    the full output on every rank (but see ``gather_outputs``), so it can replace ``pipe.unet`` in an
    unmodified pipeline.
    ``kv_exchange`` picks what self-attention exchanges when K and V are projections of one
    token tensor: "kv", "hidden" (gather the tensor, project locally), or "auto" (a cost model
    of bytes saved against projection FLOPs for the device).
    Stale mode runs its first ``warmup_steps`` calls synchronously; with ``warmup_fraction`` f
    (0 to 1) also every call whose timestep is above (1 - f) x the generation's first: the first
    f of its noise range, the same share of a 20- or a 50-step generation.
    ``stale_dtype`` (stale mode) sends the stale halo rows and keys/values in a narrower float
    and keeps them in it between steps: half the bytes and stale-buffer memory of float32 for
    ``torch.bfloat16``, at the cost of rounding what is already an approximation. Warm-up
    exchanges and GroupNorm statistics stay exact; None (the default) rounds nothing.
    ``extrapolate`` (0 to 1) reads stale halo rows and keys/values as the last step's plus that
    fraction of their change since the step before. ``fresh`` names the exchanges stale mode
    still does synchronously: ``("halo",)`` waits for this step's conv halo rows (small) while
    keys/values stay stale; with ``gn_variant="sync"`` that is the most exact setting short of
    sync mode (measured in docs/benchmarks.md).
    ``gather_outputs=False`` skips the gather of sharded outputs: each comes back at its full size
    with only this rank's rows computed and every other row NaN (under a CFG split, also only this
    rank's batch half), for a consumer that is itself parallelized and reads only its own rows (a
    ControlNet's residuals, added to the UNet's activations: what :func:`parallelize_pipeline` does
    with ``pipe.controlnet``).
    ``backend="inductor"`` compiles the compute between collectives (see docs/compile.md);
    ``backend="tensorrt"`` builds TensorRT engines for it (CUDA and torch-tensorrt needed).

    Example:
        >>> dist.init_process_group("gloo")                                # doctest: +SKIP
        >>> punet = distrifx.parallelize(unet, world_size=2, mode="sync")
        >>> out = punet(latents, t, encoder_hidden_states=ctx).sample
    """
    config = ParallelConfig(
        world_size=world_size,
        mode=mode,
        warmup_steps=warmup_steps,
        warmup_fraction=warmup_fraction,
        gn_variant=gn_variant,
        kv_exchange=kv_exchange,
        cfg_parallel=cfg_parallel,
        backend=backend,
        timeout_s=timeout_s,
        stale_dtype=stale_dtype,
        extrapolate=extrapolate,
        fresh=fresh,
        bucket_mb=bucket_mb,
        gather_outputs=gather_outputs,
    )
    if not isinstance(model, nn.Module):
        raise ConfigError(f"parallelize expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, ParallelModule):
        raise ConfigError("this model is already parallelized; pass its .module to parallelize it again")
    if config.backend is Backend.TENSORRT:
        from distrifx.backends.tensorrt import require_tensorrt

        require_tensorrt("backend='tensorrt'")  # now, not at the first call
    return ParallelModule(model.eval(), config, _communicator(process_group, config))


def _denoiser_name(pipe: Any) -> str:
    for name in ("unet", "transformer"):
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    raise ConfigError(
        f"{type(pipe).__name__} has neither a `unet` nor a `transformer` module to parallelize; "
        "call distrifx.parallelize on its denoiser yourself."
    )


def parallelize_pipeline(pipe: Any, world_size: int, *, parallel_vae: bool = False, **options: Any) -> Any:
    """Parallelize a diffusers pipeline's denoiser in place and make every rank start alike.

    ``pipe.unet`` (or ``pipe.transformer``) becomes a :class:`ParallelModule`; the pipeline's
    ``prepare_latents`` is wrapped so every rank uses rank 0's initial latents, whatever its
    generator, and so each pipeline call begins a generation (:meth:`ParallelModule.reset`: a
    scheduler that evaluates a timestep twice, as Heun's does, stays in one). A ``pipe.controlnet``
    becomes a :class:`ParallelControlNet`, patch-parallel with the same options, whose residuals stay
    on the ranks that add them. With ``parallel_vae=True`` the VAE decoder is patch-parallel too
    (sync: exact). Returns ``pipe``.
    ``options`` are those of :func:`parallelize`.

    Example:
        >>> pipe = distrifx.parallelize_pipeline(pipe, world_size=2)       # doctest: +SKIP
        >>> image = pipe("a red circle", num_inference_steps=20).images[0]
    """
    if "gather_outputs" in options:
        raise ConfigError("parallelize_pipeline takes no gather_outputs: the pipeline's scheduler needs the "
                          "denoiser's whole output, and a ControlNet's residuals are kept local already.")
    name = _denoiser_name(pipe)
    pmodel = parallelize(getattr(pipe, name), world_size, **options)
    setattr(pipe, name, pmodel)
    parallel: list[nn.Module] = [pmodel]
    if (controlnet := pipeline_controlnet(pipe)) is not None:
        pipe.controlnet = _parallelize_controlnet(controlnet, world_size, options)
        parallel.append(pipe.controlnet)
    start_alike(pipe, parallel, pmodel.comm)
    if parallel_vae:
        parallelize_pipeline_vae(pipe, world_size, options.get("process_group"),
                                 options.get("timeout_s", DEFAULT_TIMEOUT_S))
    return pipe


def parallelize_pipeline_vae(pipe: Any, world_size: int, process_group: Any, timeout_s: float) -> None:
    """Make ``pipe.vae.decode`` patch-parallel (:func:`distrifx.parallelize_vae_decoder`)."""
    from distrifx.vae import parallelize_vae_decoder

    decode = parallelize_vae_decoder(pipe.vae, world_size, process_group=process_group, timeout_s=timeout_s)
    # An instance attribute shadows the method; nn.Module.__setattr__ would register a submodule
    # (a cycle: the decoder holds the VAE) that the method lookup would then shadow.
    object.__setattr__(pipe.vae, "decode", decode)


def pipeline_controlnet(pipe: Any) -> nn.Module | None:
    """``pipe.controlnet``, where the pipeline has one."""
    controlnet = getattr(pipe, "controlnet", None)
    return controlnet if isinstance(controlnet, nn.Module) else None


def controlnet_options(options: dict[str, Any]) -> dict[str, Any]:
    """A pipeline's ControlNet options, from its denoiser's. In guess mode the ControlNet runs on the conditional
    half of a guidance batch only, which no CFG split can halve again: there ``cfg_parallel=True`` means "where it
    can"; its residuals stay on the ranks that add them."""
    own_rows = {**options, "gather_outputs": False}
    if options.get("cfg_parallel") is True:
        own_rows["cfg_parallel"] = "auto"
    return own_rows


def _parallelize_controlnet(controlnet: nn.Module, world_size: int, options: dict[str, Any]) -> ParallelControlNet:
    """``controlnet`` split as the denoiser is (:func:`controlnet_options`); guess-mode calls gather."""
    own_rows = controlnet_options(options)
    return ParallelControlNet(parallelize(controlnet, world_size, **own_rows),
                              parallelize(controlnet, world_size, **{**own_rows, "gather_outputs": True}))


def control_image_argument(pipe: Any) -> str:
    """The argument ``pipe`` takes its ControlNet's conditioning image by: ``control_image`` (SD 3, and the img2img
    and inpainting pipelines, whose ``image`` is the one to edit) or ``image``."""
    return "control_image" if "control_image" in inspect.signature(pipe.__call__).parameters else "image"


def start_alike(pipe: Any, modules: list[nn.Module], comm: Communicator) -> None:
    """Wrap ``pipe.prepare_latents``: each call begins a generation of ``modules`` (their ``reset``), and every
    rank takes rank 0's initial latents, whatever its generator."""
    prepare_latents = pipe.prepare_latents

    def shared_prepare_latents(*args: Any, **kwargs: Any) -> Any:
        for module in modules:
            module.reset()
        return from_rank0(comm, prepare_latents(*args, **kwargs))

    pipe.prepare_latents = shared_prepare_latents
