"""A ControlNet beside the UNet: patch-parallel, its residuals kept on the ranks that add them."""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_leaves

import distrifx
from distrifx.api import _parallelize_controlnet
from distrifx.errors import ConfigError
from distrifx.models import random_controlnet, random_unet, tiny_pipeline, unet_inputs

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def pair():
    """An SD 1.5-layout UNet, its ControlNet (conditioning image 8x the latent) and their inputs."""
    unet = random_unet("sd15")
    controlnet = random_controlnet(unet, seed=1, factor=8)
    args, kwargs = unet_inputs(unet, height=32, width=32)
    cond = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    return unet, controlnet, args, {**kwargs, "controlnet_cond": cond}


def _residuals(controlnet, args, kwargs):
    down, mid = controlnet(*args, **{**kwargs, "return_dict": False})
    return [*down, mid]


def _unet_kwargs(kwargs, residuals):
    unet_kwargs = {k: v for k, v in kwargs.items() if k != "controlnet_cond"}
    return {**unet_kwargs, "down_block_additional_residuals": residuals[:-1], "mid_block_additional_residual": residuals[-1]}


def _parallel_controlnet(controlnet, group):
    """What parallelize_pipeline makes of ``pipe.controlnet``, in sync mode."""
    return _parallelize_controlnet(controlnet, group.world_size, dict(mode="sync", process_group=group))


@pytest.mark.parametrize("world_size", [2, 4])
def test_own_rows_outputs_hold_this_ranks_rows_and_nan_elsewhere(pair, world_size):
    _, controlnet, args, kwargs = pair
    with torch.no_grad():
        expected = _residuals(controlnet, args, kwargs)

    def rank(group):
        own = distrifx.parallelize(controlnet, world_size, mode="sync", process_group=group, gather_outputs=False)
        whole = distrifx.parallelize(controlnet, world_size, mode="sync", process_group=group)
        return _residuals(own, args, kwargs), own.last_stats, _residuals(whole, args, kwargs), whole.last_stats

    for r, (own, own_stats, whole, whole_stats) in enumerate(distrifx.simulate(rank, world_size)):
        assert own_stats.bytes_sent < whole_stats.bytes_sent  # the gathers are gone, the halo exchanges stay
        for got, full, want in zip(own, whole, expected):
            rows = want.shape[2] // world_size
            mine = slice(r * rows, (r + 1) * rows)
            assert got.shape == want.shape
            torch.testing.assert_close(got[:, :, mine], want[:, :, mine], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(full, want, rtol=1e-4, atol=1e-5)
            others = torch.ones(want.shape[2], dtype=torch.bool)
            others[mine] = False
            assert got[:, :, others].isnan().all()


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_unet_fed_own_rows_residuals_equals_the_unmodified_pair(pair, world_size):
    unet, controlnet, args, kwargs = pair
    with torch.no_grad():
        expected = unet(*args, **_unet_kwargs(kwargs, _residuals(controlnet, args, kwargs))).sample

    def rank(group):
        pcontrolnet = distrifx.parallelize(controlnet, world_size, mode="sync", process_group=group,
                                           gather_outputs=False)
        punet = distrifx.parallelize(unet, world_size, mode="sync", process_group=group)
        return punet(*args, **_unet_kwargs(kwargs, _residuals(pcontrolnet, args, kwargs))).sample

    for out in distrifx.simulate(rank, world_size):
        assert not out.isnan().any()
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_stale_own_rows_are_the_gathered_stale_outputs_rows(pair):
    _, controlnet, args, kwargs = pair
    sample, _ = args

    def rank(group):
        options = dict(mode="stale", warmup_steps=1, process_group=group)
        own = distrifx.parallelize(controlnet, 2, gather_outputs=False, **options)
        whole = distrifx.parallelize(controlnet, 2, **options)
        steps = []
        for t in (900, 600, 300):
            step_args = (sample * (t / 1000), torch.tensor(t))
            steps.append((_residuals(own, step_args, kwargs), _residuals(whole, step_args, kwargs), own.last_phase))
        return steps

    for r, steps in enumerate(distrifx.simulate(rank, 2)):
        assert [phase for *_, phase in steps] == ["warmup", "stale", "stale"]
        for own, whole, _ in steps:
            for got, full in zip(own, whole):
                rows = full.shape[2] // 2
                assert torch.equal(got[:, :, r * rows:(r + 1) * rows], full[:, :, r * rows:(r + 1) * rows])


def test_a_multi_controlnet_sums_its_residuals_on_their_ranks(pair):
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    unet, controlnet, args, kwargs = pair
    multi = MultiControlNetModel([controlnet, random_controlnet(unet, seed=3, factor=8)]).eval()
    cond = kwargs["controlnet_cond"]
    multi_kwargs = {**kwargs, "controlnet_cond": [cond, cond.flip(2)], "conditioning_scale": [1.0, 0.5]}
    with torch.no_grad():
        expected = unet(*args, **_unet_kwargs(kwargs, _residuals(multi, args, multi_kwargs))).sample

    def rank(group):
        pmulti = _parallel_controlnet(multi, group)
        assert isinstance(pmulti, MultiControlNetModel) and len(pmulti.nets) == 2  # what the pipelines read
        punet = distrifx.parallelize(unet, 2, mode="sync", process_group=group)
        return punet(*args, **_unet_kwargs(kwargs, _residuals(pmulti, args, multi_kwargs))).sample, pmulti.own_rows.last_stats

    for out, stats in distrifx.simulate(rank, 2):
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        assert stats.bytes_sent > 0


def test_a_changing_conditioning_scale_stays_in_one_capture_and_one_generation(pair):
    _, controlnet, args, kwargs = pair
    sample, _ = args
    calls = [(900, 1.0), (600, 0.5), (300, 0.0)]
    with torch.no_grad():
        expected = [_residuals(controlnet, (sample, torch.tensor(t)), {**kwargs, "conditioning_scale": s})
                    for t, s in calls]

    def rank(group):
        pcontrolnet = _parallel_controlnet(controlnet, group)
        outs = [_residuals(pcontrolnet, (sample, torch.tensor(t)), {**kwargs, "conditioning_scale": s})
                for t, s in calls]
        return outs, len(pcontrolnet.own_rows._programs), pcontrolnet.own_rows.generation.steps.step

    for r, (outs, programs, step) in enumerate(distrifx.simulate(rank, 2)):
        assert programs == 1 and step == len(calls) - 1
        for got, want in zip(tree_leaves(outs), tree_leaves(expected)):
            rows = slice(r * want.shape[2] // 2, (r + 1) * want.shape[2] // 2)
            torch.testing.assert_close(got[:, :, rows], want[:, :, rows], rtol=1e-4, atol=1e-5)


def test_an_exported_controlnet_keeps_its_residuals_on_their_ranks(pair, tmp_path):
    _, controlnet, args, kwargs = pair
    kwargs = {**kwargs, "return_dict": False}
    distrifx.export(controlnet, tmp_path, 2, args=args, kwargs=kwargs, mode="sync", gather_outputs=False)
    with torch.no_grad():
        expected = _residuals(controlnet, args, kwargs)
    outs = distrifx.simulate(lambda g: tree_leaves(distrifx.load(tmp_path, process_group=g)(*args, **kwargs)), 2)
    for r, residuals in enumerate(outs):
        for got, want in zip(residuals, expected):
            rows = want.shape[2] // 2
            mine, other = slice(r * rows, (r + 1) * rows), slice((1 - r) * rows, (2 - r) * rows)
            torch.testing.assert_close(got[:, :, mine], want[:, :, mine], rtol=1e-4, atol=1e-5)
            assert got[:, :, other].isnan().all()


def test_gather_outputs_must_be_a_bool():
    with pytest.raises(ConfigError, match="gather_outputs='no' must be True or False"):
        distrifx.parallelize(torch.nn.Identity(), 2, gather_outputs="no")


# -- an unmodified diffusers ControlNet pipeline, loaded from disk -----------------------------

@pytest.fixture(scope="module", params=["sd15-controlnet", "sdxl-controlnet"])
def saved(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("pipes") / request.param
    tiny_pipeline(request.param).save_pretrained(path)
    return path


def _load(path):
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, **kwargs):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    args = dict(prompt=PROMPT, image=image, height=32, width=32, num_inference_steps=5, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    return pipe(**{**args, **kwargs}).images


def _parallel(path, world_size, call, **options):
    pipes = [_load(path) for _ in range(world_size)]  # built before the threads: global RNG

    def rank(group):
        from diffusers import ControlNetModel

        pipe = distrifx.parallelize_pipeline(pipes[group.rank], world_size, process_group=group, **options)
        assert isinstance(pipe.controlnet, ControlNetModel)  # what the pipeline branches on
        assert isinstance(pipe.controlnet, distrifx.ParallelControlNet)
        return call(pipe), pipe.controlnet.own_rows.last_stats, pipe.controlnet.whole.last_stats

    return distrifx.simulate(rank, world_size)


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("world_size,cfg,guess_mode", [(2, False, False), (4, True, False), (4, True, True)])
def test_sync_controlnet_pipeline_equals_single_device(saved, world_size, cfg, guess_mode):
    """In guess mode the ControlNet sees half the UNet's guidance batch: those calls gather."""
    call = lambda p: _generate(p, guess_mode=guess_mode)  # noqa: E731
    expected = call(_load(saved))
    for out, own_stats, whole_stats in _parallel(saved, world_size, call, mode="sync", cfg_parallel=cfg):
        assert _rel_err(out, expected) < 1e-4
        assert (whole_stats.bytes_sent > 0) == guess_mode and (own_stats.bytes_sent > 0) != guess_mode


def test_stale_controlnet_pipeline_is_close_and_naive_is_not_closer(saved):
    call = lambda p: _generate(p, num_inference_steps=10)  # noqa: E731
    expected = call(_load(saved))
    stale = _parallel(saved, 2, call, mode="stale", warmup_steps=2, cfg_parallel=False)[0][0]
    naive = _parallel(saved, 2, call, mode="naive", cfg_parallel=False)[0][0]
    assert _rel_err(stale, expected) < _rel_err(naive, expected)
    assert _rel_err(stale, expected) < 0.2


def test_parallelize_pipeline_refuses_gather_outputs(saved):
    with pytest.raises(ConfigError, match="takes no gather_outputs"):
        distrifx.parallelize_pipeline(_load(saved), 2, gather_outputs=False)


def test_a_cfg_split_keeps_each_ranks_batch_half(pair):
    """Under a CFG split the residuals' batch halves are not gathered either: the UNet reads its own half."""
    _, controlnet, (sample, t), kwargs = pair
    args = (torch.cat([sample, -sample]), t)
    kwargs = {**kwargs, **{k: torch.cat([kwargs[k]] * 2) for k in ("encoder_hidden_states", "controlnet_cond")}}
    with torch.no_grad():
        expected = _residuals(controlnet, args, kwargs)

    def rank(group):
        own = distrifx.parallelize(controlnet, 2, mode="sync", process_group=group, gather_outputs=False,
                                   cfg_parallel=True)
        return _residuals(own, args, kwargs), own.last_stats

    for half, (residuals, stats) in enumerate(distrifx.simulate(rank, 2)):
        assert stats.bytes_sent == 0  # one rank per half: nothing to exchange, nothing gathered
        for got, want in zip(residuals, expected):
            torch.testing.assert_close(got[half], want[half], rtol=1e-4, atol=1e-5)
            assert got[1 - half].isnan().all()


# -- a ControlNet pipeline exported offline and loaded into the pipeline -----------------------
# Exporting does not branch on the UNet family: each test runs on one kind, SDXL (added
# conditioning) where the batch is split, SD 1.5 elsewhere.

SD15 = pytest.mark.parametrize("saved", ["sd15-controlnet"], indirect=True)
SDXL = pytest.mark.parametrize("saved", ["sdxl-controlnet"], indirect=True)

def _loaded(path, exported, world_size, call):
    pipes = [_load(path) for _ in range(world_size)]

    def rank(group):
        from diffusers import ControlNetModel

        pipe = distrifx.load_pipeline(pipes[group.rank], exported, process_group=group)
        assert isinstance(pipe.controlnet, ControlNetModel)  # what the pipeline branches on
        return call(pipe, generator=torch.Generator().manual_seed(group.rank)), pipe.controlnet.own_rows.last_stats

    return distrifx.simulate(rank, world_size)


@SDXL
def test_an_exported_controlnet_pipeline_equals_single_device(saved, tmp_path):
    """Patch and CFG split at once (N=4): rows and batch halves of the residuals stay on their ranks."""
    expected = _generate(_load(saved))
    distrifx.export_pipeline(_load(saved), tmp_path, 4, height=32, width=32, mode="sync", cfg_parallel=True)
    assert (tmp_path / "controlnet" / "manifest.json").is_file()
    for out, stats in _loaded(saved, tmp_path, 4, _generate):
        assert _rel_err(out, expected) < 1e-4
        assert stats.bytes_sent > 0  # its halos; no gathers (tested above)


@SD15
def test_an_exported_stale_controlnet_pipeline_equals_the_eager_runtime(saved, tmp_path):
    call = lambda p, **kw: _generate(p, num_inference_steps=8, **kw)  # noqa: E731
    options = dict(mode="stale", warmup_steps=2, cfg_parallel=False)
    eager = _parallel(saved, 2, call, **options)[0][0]
    distrifx.export_pipeline(_load(saved), tmp_path, 2, height=32, width=32, **options)
    for out, _ in _loaded(saved, tmp_path, 2, call):
        assert _rel_err(out, eager) < 1e-5


@pytest.fixture(scope="module")
def exported(saved, tmp_path_factory):
    """A sync export of the ControlNet pipeline at two ranks."""
    out = tmp_path_factory.mktemp("exported")
    distrifx.export_pipeline(_load(saved), out, 2, height=32, width=32, mode="sync", cfg_parallel=False)
    return out


@SDXL
def test_a_pipeline_exported_in_guess_mode_equals_single_device(saved, tmp_path):
    """Guidance on: the ControlNet sees the conditional half only, the UNet the whole batch (CFG-split)."""
    call = lambda p, **kw: _generate(p, guess_mode=True, **kw)  # noqa: E731
    expected = call(_load(saved))
    distrifx.export_pipeline(_load(saved), tmp_path, 2, height=32, width=32, mode="sync",
                             pipeline_kwargs={"guess_mode": True})
    for out, stats in _loaded(saved, tmp_path, 2, call):
        assert _rel_err(out, expected) < 1e-4
        assert stats.bytes_sent > 0  # its gathers


@SD15
def test_a_loaded_controlnet_refuses_guess_mode(saved, exported):
    with pytest.raises(ConfigError, match="a guess-mode call needs the residuals whole"):
        _loaded(saved, exported, 2, lambda p, **kw: _generate(p, guess_mode=True, **kw))


@SD15
def test_a_pipeline_and_an_export_must_agree_on_the_controlnet(saved, exported, tmp_path):
    import shutil

    from distrifx.errors import ArtifactError

    out = tmp_path / "export"
    shutil.copytree(exported, out)
    distrifx.export_pipeline(tiny_pipeline("sd15"), out, 2, height=32, width=32, mode="sync")
    assert not (out / "controlnet").exists()  # the previous export's ControlNet is gone with it
    with pytest.raises(ArtifactError, match="has controlnet, and .* holds none"):
        _loaded(saved, out, 2, _generate)


@SD15
def test_an_exported_multi_controlnet_pipeline_equals_single_device(saved, tmp_path):
    """Two ControlNets, one image each: the pipeline reads the loaded export's nets (their configs)."""
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    def multi(pipe):
        second = random_controlnet(pipe.unet, seed=5)
        pipe.controlnet = MultiControlNetModel([pipe.controlnet, second]).eval()
        return pipe

    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    call = lambda p, **kw: _generate(p, image=[image, image.flip(3)], **kw)  # noqa: E731
    expected = call(multi(_load(saved)))
    distrifx.export_pipeline(multi(_load(saved)), tmp_path, 2, height=32, width=32, mode="sync", cfg_parallel=False)
    pipes = [multi(_load(saved)) for _ in range(2)]

    def rank(group):
        pipe = distrifx.load_pipeline(pipes[group.rank], tmp_path, process_group=group)
        assert isinstance(pipe.controlnet, MultiControlNetModel) and len(pipe.controlnet.nets) == 2
        return call(pipe)

    for out in distrifx.simulate(rank, 2):
        assert _rel_err(out, expected) < 1e-4


@pytest.mark.parametrize("sibling", ["StableDiffusionControlNetImg2ImgPipeline",
                                     "StableDiffusionControlNetInpaintPipeline"])
def test_the_img2img_and_inpainting_controlnet_pipelines_equal_single_device(sibling, tmp_path):
    """The same ControlNet and UNet, called by the image-to-image and inpainting pipelines."""
    import diffusers

    getattr(diffusers, sibling)(**tiny_pipeline("sd15-controlnet").components).save_pretrained(tmp_path)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 4:20] = 1
    extra = dict(image=image, control_image=image.flip(2), strength=0.8)
    if "Inpaint" in sibling:
        extra["mask_image"] = mask
    call = lambda p: _generate(p, num_inference_steps=6, **extra)  # noqa: E731
    pipe = _load(tmp_path)
    assert type(pipe).__name__ == sibling
    expected = call(pipe)
    for out, _, _ in _parallel(tmp_path, 2, call, mode="sync", cfg_parallel=False):
        assert _rel_err(out, expected) < 1e-4


def test_ranks_given_different_conditioning_all_use_rank_0s(pair):
    """As rank 0's initial latents are: SD 3's pipelines sample the conditioning from the VAE, unseeded."""
    _, controlnet, args, kwargs = pair
    with torch.no_grad():
        expected = _residuals(controlnet, args, kwargs)

    def rank(group):
        pcontrolnet = _parallel_controlnet(controlnet, group)
        cond = kwargs["controlnet_cond"] + group.rank  # every rank its own
        return [_residuals(pcontrolnet, args, {**kwargs, "controlnet_cond": cond}) for _ in range(2)]

    for r, steps in enumerate(distrifx.simulate(rank, 2)):
        for residuals in steps:  # the second step reuses the first's shared conditioning
            for got, want in zip(residuals, expected):
                mine = slice(r * want.shape[2] // 2, (r + 1) * want.shape[2] // 2)
                torch.testing.assert_close(got[:, :, mine], want[:, :, mine], rtol=1e-4, atol=1e-5)


# -- SD 3 and Flux: transformer ControlNets, their block samples added to the image tokens -------

@pytest.fixture(scope="module", params=["sd3-controlnet", "flux-controlnet"])
def dit_saved(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("pipes") / request.param
    tiny_pipeline(request.param).save_pretrained(path)
    return path


@pytest.fixture
def vae_mode(monkeypatch):
    """The VAE's latent distribution gives its mode: SD 3's pipeline samples the conditioning unseeded, so the
    single-device reference and the ranks would otherwise draw apart."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())


def _dit_load(path):
    import diffusers

    missing = {"text_encoder_3": None, "tokenizer_3": None} if "sd3" in path.name else {}
    pipe = diffusers.DiffusionPipeline.from_pretrained(path, **missing)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dit_generate(pipe, **kwargs):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return pipe(prompt=PROMPT, control_image=image, height=32, width=32, num_inference_steps=4, output_type="latent",
                max_sequence_length=8, generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("world_size,cfg", [(2, False), (4, "auto")])
def test_transformer_controlnet_pipelines_equal_single_device(dit_saved, vae_mode, world_size, cfg):
    """SD 3 with guidance ("auto" at N=4: a CFG split and 2 patches), Flux without (4 patches)."""
    import diffusers

    expected = _dit_generate(_dit_load(dit_saved))
    pipes = [_dit_load(dit_saved) for _ in range(world_size)]
    controlnet_class = type(pipes[0].controlnet)
    assert controlnet_class in (diffusers.SD3ControlNetModel, diffusers.FluxControlNetModel)

    def rank(group):
        pipe = distrifx.parallelize_pipeline(pipes[group.rank], world_size, process_group=group, mode="sync",
                                             cfg_parallel=cfg)
        assert isinstance(pipe.controlnet, controlnet_class)
        return _dit_generate(pipe), pipe.controlnet.own_rows.last_stats

    for out, stats in distrifx.simulate(rank, world_size):
        assert _rel_err(out, expected) < 1e-4
        assert stats.bytes_sent > 0  # its attention's K/V; its block samples are not gathered


def test_exported_transformer_controlnet_pipelines_equal_single_device(dit_saved, vae_mode, tmp_path):
    expected = _dit_generate(_dit_load(dit_saved))
    distrifx.export_pipeline(_dit_load(dit_saved), tmp_path, 2, height=32, width=32, mode="sync",
                             cfg_parallel=False, pipeline_kwargs={"max_sequence_length": 8})
    pipes = [_dit_load(dit_saved) for _ in range(2)]
    outs = distrifx.simulate(lambda g: _dit_generate(distrifx.load_pipeline(pipes[g.rank], tmp_path, process_group=g)), 2)
    for out in outs:
        assert _rel_err(out, expected) < 1e-4
