"""Run a benchmark grid: generate every cell's samples in fixed chunks (sharded across processes), score them,
and record one result per cell, resuming whatever a previous run of the same folder already finished.

Per cell: the scheduler's ``num_inference_steps`` is chosen so that its sampling loop calls the network
exactly ``nfe`` times (:func:`~steerdiff.benchmark.grid.steps_for_nfe`; a classifier-free-guidance batch
[uncond, cond] counts once, the field's convention); a forward hook counts the real calls and their batch rows
(:class:`~steerdiff.benchmark.probe.NetworkProbe`).  A cell whose samples hold NaN/Inf is recorded as
``diverged`` with the first sampling step that saw them; a cell whose NFE the scheduler cannot reach is
``skipped``; a chunk or metric that raises makes the cell ``failed`` (retried on the next run) without
stopping the grid.  Everything else about the config (unknown names, unreadable weights, classes the model
does not have, metrics that do not apply to a model) is checked before the first sample is drawn.
"""

from __future__ import annotations

import copy
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch
from tqdm.auto import tqdm

from ..config import ConfigError, torch_dtype

from ..core.process import NoiseProcess, model_process
from ..devices import check_device
from ..metrics.base import Metric, SampleSet
from ..metrics.registry import make_metric
from ..pipelines.calling import (
    CALL_FIELDS, guidance_entry, load_any_pipeline, pipeline_kind, plan_guidance, resolve_pipeline_class,
    resolve_prompts,
)
from ..pipelines.class_conditional import null_class_id, sample_shape
from ..pipelines.folder import check_image_size, check_runs_in
from ..pipelines.hooks import main_denoiser
from ..pipelines.loading import load_pipeline
from ..run_folder import check_writable_folder, claim_run_folder
from ..samplers.registry import make_scheduler
from .config import BenchmarkConfig, ModelSpec
from .environment import machine_info, package_versions
from .grid import (
    Cell, expand_grid, initial_noise, model_fingerprint, resolve_classes, sample_generators, sample_labels,
    stable_hash, steps_for_nfe,
)
from .probe import NetworkProbe
from .report import write_report, write_results
from .sharding import Shard, chunk_bounds, current_shard
from .storage import FINISHED, Chunk, RunFolder


@dataclass
class ModelPlan:
    """A loaded model of the grid.  Class-conditional models: sample i has class ``classes[i mod len]``.
    Text-to-image pipelines (``kind`` "text"): ``classes`` index ``prompts`` and ``shape`` is the decoded image's."""

    spec: ModelSpec
    pipe: object
    shape: tuple[int, ...]
    classes: list[int]
    metrics: list[Metric]
    process: NoiseProcess
    prediction_type: str
    dtype: torch.dtype
    kind: object = None  # steerdiff.pipelines.calling.PipelineKind
    prompts: list[dict] | None = None
    call_kwargs: dict = field(default_factory=dict)

    @property
    def is_text(self) -> bool:
        return self.prompts is not None

    @property
    def denoiser(self) -> torch.nn.Module:
        return main_denoiser(self.pipe)

    def conditioning_key(self) -> str:
        if not self.is_text:
            return ""
        return stable_hash({"prompts": self.prompts, "call": self.call_kwargs})


@dataclass
class CellPlan:
    cell: Cell
    model: ModelPlan
    scheduler: object
    guidance: object
    steps: int | None
    skip_reason: str | None = None


def resolve_device(name: str, shard: Shard) -> torch.device:
    if name == "auto":
        return shard.device
    try:
        device = check_device(name)
    except ValueError as err:
        raise ConfigError(f"{err} (or auto)") from None
    if device.type == "cuda" and device.index is None and shard.world_size > 1:
        return shard.device
    return device


def _prepare_model(cfg: BenchmarkConfig, i: int, spec: ModelSpec, device: torch.device) -> ModelPlan:
    where = f"models[{i}] ({spec.model!r})"
    try:
        cls, folder = resolve_pipeline_class(spec.model)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    kind = pipeline_kind(cls)
    if kind.kind == "text":
        return _prepare_text_model(cfg, where, spec, kind, folder, device)
    if kind.kind != "class":
        raise ConfigError(f"{where}: {kind.name} is unconditional; the benchmark grids class-conditional models and "
                          "text-to-image pipelines")
    for key in ("prompts", "negative_prompts", "height", "width"):
        if getattr(spec, key) is not None:
            raise ConfigError(f"{where}: {key}: the model is class-conditional ({kind.name}); prompts and sizes are for "
                              "text-to-image pipeline folders")
    if spec.call_kwargs:
        raise ConfigError(f"{where}: call_kwargs: only text-to-image pipeline folders take them")
    try:
        pipe = load_pipeline(spec.model, device=device, dtype=torch_dtype(spec.dtype))
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"{where}: {err}") from None
    shape = sample_shape(pipe.unet)
    try:
        classes = resolve_classes(cfg.classes, null_class_id(pipe.unet), where)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    metrics = _metrics(cfg, where, spec, shape, pipe.unet)
    process, prediction_type = _process(where, pipe)
    return ModelPlan(spec, pipe, shape, classes, metrics, process, prediction_type, torch_dtype(spec.dtype), kind)


def _metrics(cfg: BenchmarkConfig, where: str, spec: ModelSpec, shape, denoiser) -> list[Metric]:
    metrics = []
    for j, mspec in enumerate(cfg.metrics_for(spec)):
        where_m = f"{where} metrics[{j}] ({mspec.name!r})" if spec.metrics is not None else f"metrics[{j}] ({mspec.name!r}) for {where}"
        try:
            metric = make_metric(mspec.name, **mspec.kwargs)
            if metric.needs_targets:
                raise ValueError(f"{metric.name} compares each sample with its original image; a benchmark samples from "
                                 "noise and has none (restorations have them: steerdiff restore)")
            metric.check(shape, denoiser)
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise ConfigError(f"{where_m}: {err}") from None
        metrics.append(metric)
    return metrics


def _process(where: str, pipe) -> tuple[NoiseProcess, str]:
    try:  # a scheduler config steerdiff cannot read (neither VP nor flow, contradicting keys) stops the plan
        return model_process(pipe.scheduler)
    except ValueError as err:
        raise ConfigError(f"{where}: scheduler config: {err}") from None


def image_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    """The size of a text-to-image pipeline's images: the config's, else the pipeline's default (what its call uses
    when given none: the denoiser's sample size times the VAE's scale factor)."""
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    default = getattr(pipe, "default_sample_size", None)
    if default is None and getattr(pipe, "unet", None) is not None:
        size = pipe.unet.config.sample_size
        default = size if isinstance(size, int) else size[0]
    side = int(default) * scale if default is not None else None
    h, w = height or side, width or side
    if h is None or w is None:
        raise ConfigError(f"{type(pipe).__name__} has no default image size; give height and width")
    return h, w


def _prepare_text_model(cfg: BenchmarkConfig, where: str, spec: ModelSpec, kind, folder, device) -> ModelPlan:
    if spec.prompts is None:
        raise ConfigError(f"{where}: prompts: {kind.name} is a text-to-image pipeline; give prompts (a list, or a "
                          ".txt / .jsonl file)")
    if cfg.classes is not None:
        raise ConfigError(f"classes: {where} is a text-to-image pipeline ({kind.name}); classes apply to "
                          "class-conditional models (leave classes null)")
    if kind.takes("image"):
        raise ConfigError(f"{where}: {kind.name} transforms input images; the benchmark grids text-to-image pipelines")
    for key in ("height", "width"):
        if getattr(spec, key) is not None and not kind.takes(key):
            raise ConfigError(f"{where}: {key}: {kind.name} takes no {key}")

    reserved = CALL_FIELDS | {"latents", "guidance_scale", "true_cfg_scale"}  # the cell sets noise and guidance too
    bad = sorted(k for k in spec.call_kwargs if k not in kind.params or k in reserved)
    if bad:
        raise ConfigError(f"{where}: call_kwargs: {bad} are not arguments of {kind.name} the config may set "
                          f"(prompts, sizes, steps, guidance and seeds have their own fields)")
    check_image_size(kind.cls, folder, spec.height, spec.width, where=f"{where}: ")  # load_any_pipeline checks the rest
    try:
        prompts = resolve_prompts(spec.prompts, spec.negative_prompts)
        pipe = load_any_pipeline(spec.model, kind.cls, folder, device, torch_dtype(spec.dtype))
    except (ConfigError, ValueError, FileNotFoundError, OSError) as err:
        raise ConfigError(f"{where}: {err}") from None
    h, w = image_size(pipe, spec.height, spec.width)
    call = dict(spec.call_kwargs)
    if kind.takes("height"):
        call.update(height=h, width=w)
    shape = (3, h, w)

    metrics = _metrics(cfg, where, spec, shape, main_denoiser(pipe))
    process, prediction_type = _process(where, pipe)
    return ModelPlan(spec, pipe, shape, list(range(len(prompts))), metrics, process, prediction_type,
                     torch_dtype(spec.dtype), kind, prompts, call)


def prepare(cfg: BenchmarkConfig, device: torch.device) -> list[CellPlan]:
    """Load every model and build every scheduler, guidance and metric; raise ``ConfigError`` naming the entry."""
    models = [_prepare_model(cfg, i, spec, device) for i, spec in enumerate(cfg.models)]
    schedulers, steps = {}, {}
    for m in models:
        for j, sspec in enumerate(cfg.schedulers):
            try:
                sched = make_scheduler(sspec.name, m.pipe.scheduler.config, **sspec.kwargs)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"schedulers[{j}] ({sspec.name!r}) for model {m.spec.display!r}: {err}") from None
            if m.is_text:
                try:
                    check_runs_in(sched, m.kind.cls)
                except ConfigError as err:
                    raise ConfigError(f"schedulers[{j}] ({sspec.name!r}) for model {m.spec.display!r}: {err}") from None
            schedulers[m.spec.display, sspec.display] = sched
            for nfe in cfg.nfe:
                steps[m.spec.display, sspec.display, nfe] = steps_for_nfe(sched, nfe)
    guidance = {}  # one plan per (guidance entry, model): call arguments, rule, negative prompt
    for j, gspec in enumerate(cfg.guidance):
        try:
            entry = guidance_entry(gspec)  # the rule is built once (a LinearAG file read once)
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise ConfigError(f"guidance[{j}] ({gspec.name!r}): {err}") from None
        for m in models:  # how the pipeline is called for this guidance; a rule guide() cannot hook stops here
            try:
                guidance[gspec.display, m.spec.display] = plan_guidance(gspec, m.kind, entry)
            except ConfigError as err:
                raise ConfigError(f"guidance[{j}] ({gspec.name!r}) for model {m.spec.display!r}: "
                                  f"{str(err).removeprefix('guidance: ')}") from None
    by_label = {m.spec.display: m for m in models}
    plans = []
    cells = expand_grid(cfg, [m.classes for m in models], [model_fingerprint(m.denoiser) for m in models],
                        [tuple(metric.fingerprint() for metric in m.metrics) for m in models],
                        [m.conditioning_key() for m in models])
    for cell in cells:
        key = (cell.model.display, cell.scheduler.display)
        n_steps = steps[(*key, cell.nfe)]
        sched = schedulers[key]
        reason = None if n_steps is not None else (
            f"{type(sched).__name__} cannot make exactly {cell.nfe} network calls: no num_inference_steps gives "
            f"{cell.nfe} timesteps"
        )
        plans.append(CellPlan(cell, by_label[cell.model.display], sched, guidance[cell.guidance.display, cell.model.display], n_steps, reason))
    return plans


def quiet_scheduler(scheduler):
    """A fresh copy of ``scheduler``; steerdiff's own with their NaN/Inf check off, so that a diverging cell runs to
    its end and is recorded as diverged, as with diffusers' schedulers (which never check)."""
    if "nonfinite_check" in scheduler.config:
        return type(scheduler).from_config(scheduler.config, nonfinite_check="off")
    return copy.deepcopy(scheduler)


def generate_text_chunk(plan: CellPlan, start: int, stop: int) -> Chunk:
    """Images start..stop-1 of a text-to-image cell (sample i: prompt i mod len(prompts), generator seed + i), in
    [-1, 1], from one pipeline call; a rule goes in with guide()."""
    m, cell = plan.model, plan.cell
    generators = sample_generators(cell.seed, start, stop)
    labels = sample_labels(m.classes, start, stop)
    m.pipe.scheduler = quiet_scheduler(plan.scheduler)
    with NetworkProbe(m.denoiser, m.pipe.scheduler) as probe:
        with plan.guidance.pipeline_call(m.pipe) as call:
            kwargs = dict(call.kwargs, **m.call_kwargs, prompt=[m.prompts[i]["prompt"] for i in labels],
                          num_inference_steps=plan.steps, generator=generators, output_type="pt")
            negatives = plan.guidance.negative_prompts([m.prompts[i]["negative_prompt"] for i in labels])
            if negatives is not None:
                kwargs["negative_prompt"] = negatives
            t0 = time.perf_counter()
            images = m.pipe(**kwargs).images
            samples = (images.to("cpu", torch.float32) * 2 - 1)
            seconds = time.perf_counter() - t0
    rows = call.evaluations if call.evaluations is not None else probe.rows
    return Chunk(samples, labels, probe.calls, rows, probe.first_nonfinite_step(), seconds)


def generate_chunk(plan: CellPlan, start: int, stop: int, device: torch.device) -> Chunk:
    """Samples start..stop-1 of a cell in one pipeline call, with their call counts and wall time."""
    m, cell = plan.model, plan.cell
    if m.is_text:
        return generate_text_chunk(plan, start, stop)
    generators = sample_generators(cell.seed, start, stop)
    noise = initial_noise(cell.seed, start, stop, m.shape, generators)
    labels = sample_labels(m.classes, start, stop)
    m.pipe.scheduler = quiet_scheduler(plan.scheduler)
    with NetworkProbe(m.pipe.unet, m.pipe.scheduler) as probe:
        with plan.guidance.pipeline_call(m.pipe) as call:
            t0 = time.perf_counter()
            # NaN/Inf is a result here (the cell is recorded "diverged" with the probe's first bad step), not an error
            out = m.pipe(labels, num_inference_steps=plan.steps, generator=generators, latents=noise.to(device, m.dtype),
                         output_type="latent", nonfinite_check="off", **call.kwargs).images
            samples = out.to("cpu", torch.float32)
            seconds = time.perf_counter() - t0
    rows = call.evaluations if call.evaluations is not None else probe.rows
    return Chunk(samples, labels, probe.calls, rows, probe.first_nonfinite_step(), seconds)


def _base_record(plan: CellPlan, status: str, shard: Shard, device) -> dict:
    cell = plan.cell
    return {
        "cell_id": cell.cell_id,
        "status": status,
        **cell.describe(),
        "scheduler_class": type(plan.scheduler).__name__,
        "steps": plan.steps,
        "generation_key": cell.generation_key,
        "metrics_key": cell.metrics_key,
        "world_size": shard.world_size,
        "machine": machine_info(device),
        "versions": package_versions(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def finish_cell(plan: CellPlan, folder: RunFolder, shard: Shard, device, cache_dir) -> dict:
    """Gather a cell's chunks (main process), score them and build its record."""
    cell = plan.cell
    bounds = chunk_bounds(cell.num_samples, cell.batch_size)
    errors = [(k, e) for k in range(len(bounds)) if (e := folder.chunk_error(cell.cell_id, k))]
    if errors:
        return {**_base_record(plan, "failed", shard, device), "error": f"chunk {errors[0][0]}: {errors[0][1]}"}
    missing = [k for k in range(len(bounds)) if not folder.has_chunk(cell.cell_id, k)]
    if missing:
        raise RuntimeError(
            f"cell {cell.cell_id}: chunks {missing} are not in {folder.root}; every process must write to the same "
            "run folder (a filesystem shared by all nodes)"
        )
    chunks = [folder.load_chunk(cell.cell_id, k) for k in range(len(bounds))]
    samples = torch.cat([c.samples for c in chunks])
    labels = torch.cat([c.labels for c in chunks])
    rows = sum(c.rows for c in chunks)
    calls = sorted({c.calls for c in chunks})
    sample_seconds = sum(c.seconds for c in chunks)
    record = _base_record(plan, "ok", shard, device)
    record.update({
        "nfe_measured": calls[0] if len(calls) == 1 else calls,
        "network_calls": {"forward_passes": sum(c.calls for c in chunks), "model_evaluations": rows,
                          "evaluations_per_sample": rows / cell.num_samples},
        "timing": {"sample_seconds": sample_seconds, "seconds_per_sample": sample_seconds / cell.num_samples,
                   "chunks": len(chunks)},
        "metrics": {},
    })
    bad = ~torch.isfinite(samples).flatten(1).all(dim=1)
    if bool(bad.any()):
        steps = [c.first_nonfinite_step for c in chunks if c.first_nonfinite_step is not None]
        record["status"] = "diverged"
        record["diverged"] = {"samples": int(bad.sum()), "fraction": float(bad.double().mean()),
                              "step": min(steps) if steps else cell.nfe}
        return record
    m = plan.model
    sample_set = SampleSet(
        samples=samples, labels=labels, noise=None if m.is_text else initial_noise(cell.seed, 0, cell.num_samples, m.shape),
        denoiser=m.denoiser, guidance=plan.guidance, process=m.process, prediction_type=m.prediction_type,
        cache_dir=cache_dir, work_dir=folder.root, reference_key=cell.reference_key,
        prompts=[m.prompts[int(i)]["prompt"] for i in labels] if m.is_text else None,
    )
    t0 = time.perf_counter()
    for metric in m.metrics:
        try:
            record["metrics"].update(metric(sample_set))
        except Exception as err:  # a metric that cannot score this cell fails the cell, not the grid
            record["status"] = "failed"
            record["error"] = f"metric {metric.name}: {type(err).__name__}: {err}"
            break
    record["timing"]["metric_seconds"] = time.perf_counter() - t0
    return record


def _skipped_record(plan: CellPlan, shard: Shard, device) -> dict:
    return {**_base_record(plan, "skipped", shard, device), "reason": plan.skip_reason}


def _summary(record: dict) -> str:
    head = f"{record['model']} | {record['guidance']} | {record['scheduler']} | NFE {record['nfe']} | seed {record['seed']}"
    if record["status"] == "ok":
        vals = ", ".join(f"{k} {v:.4g}" for k, v in record["metrics"].items())
        return f"{head}: {vals} ({record['timing']['sample_seconds']:.1f} s sampling)"
    detail = record.get("reason") or record.get("error") or (
        f"{record['diverged']['samples']} samples non-finite from step {record['diverged']['step']}" if record.get("diverged") else "")
    return f"{head}: {record['status'].upper()} {detail}"


def run_benchmark(cfg: BenchmarkConfig, shard: Shard | None = None) -> list[dict]:
    """Run (or resume) the grid of ``cfg`` in ``cfg.output_dir``; returns the records (on the main process)."""
    shard = shard or current_shard(cpu=cfg.device == "cpu")
    device = resolve_device(cfg.device, shard)
    folder = RunFolder(check_writable_folder(cfg.output_dir))
    plans = prepare(cfg, device)
    # the config is valid: one process per folder, one config per folder, checked (and locked) before any sampling
    current = lambda stored: BenchmarkConfig.model_validate(stored).model_dump()  # noqa: E731 (older formats)
    lock = (claim_run_folder(folder.root, cfg.model_dump(), cfg.overwrite, ignore=RESULT_NEUTRAL_KEYS, normalize=current,
                             compared=sampling_config) if shard.is_main else None)
    try:
        return _run(cfg, shard, device, folder, plans)
    finally:
        if lock is not None:
            lock.release()


RESULT_NEUTRAL_KEYS = ("overwrite", "progress", "report", "keep_samples", "cache_dir")  # they change no result


def sampling_config(config: dict) -> dict:
    """A benchmark config without its metrics (top-level and per model): the samples do not depend on them, so a
    folder whose config differs only there is resumed; its cells keep their samples and are rescored (each cell's
    record stores the metrics key it was scored with)."""
    out = {k: v for k, v in config.items() if k != "metrics"}
    if isinstance(out.get("models"), list):
        out["models"] = [{k: v for k, v in m.items() if k != "metrics"} if isinstance(m, dict) else m for m in out["models"]]
    return out


def _run(cfg: BenchmarkConfig, shard: Shard, device, folder: RunFolder, plans: list[CellPlan]) -> list[dict]:
    show = cfg.progress and shard.is_main
    cells_bar = tqdm(total=len(plans), desc="cells", disable=not show, position=0)
    records, resumed, t_start = [], 0, time.perf_counter()
    for plan in plans:
        cell = plan.cell
        previous = folder.load_record(cell.cell_id)
        if (previous and previous["status"] in FINISHED and previous["generation_key"] == cell.generation_key
                and previous["metrics_key"] == cell.metrics_key):
            resumed += 1
            records.append(previous)
            cells_bar.update()
            continue
        if plan.skip_reason is not None:
            if shard.is_main:
                record = _skipped_record(plan, shard, device)
                folder.save_record(cell.cell_id, record)
                records.append(record)
                cells_bar.write(_summary(record))
            cells_bar.update()
            continue
        bounds = chunk_bounds(cell.num_samples, cell.batch_size)
        mine = [k for k in range(len(bounds)) if shard.owns(k)]
        samples_bar = tqdm(total=sum(bounds[k][1] - bounds[k][0] for k in mine), desc="samples", leave=False,
                           disable=not show, position=1)
        for k in mine:
            start, stop = bounds[k]
            if not folder.has_chunk(cell.cell_id, k):
                try:
                    chunk = generate_chunk(plan, start, stop, device)
                    chunk.rank = shard.rank
                    folder.save_chunk(cell.cell_id, k, chunk)
                except Exception as err:  # recorded as a failed cell; the grid goes on
                    folder.save_chunk_error(cell.cell_id, k, f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
            samples_bar.update(stop - start)
        samples_bar.close()
        shard.barrier()
        if shard.is_main:
            record = finish_cell(plan, folder, shard, device, cfg.cache_dir)
            folder.save_record(cell.cell_id, record)
            if not cfg.keep_samples and record["status"] in FINISHED:
                folder.delete_chunks(cell.cell_id)
            records.append(record)
            write_results(folder.root, records)
            cells_bar.write(_summary(record))
        cells_bar.update()
    cells_bar.close()
    shard.barrier()
    if shard.is_main:
        write_results(folder.root, records)
        write_report(folder.root, records, cfg.report, cfg.name)
        counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "diverged", "skipped", "failed")}
        print(
            f"benchmark {cfg.name!r}: {len(records)} cells ({', '.join(f'{v} {k}' for k, v in counts.items())}; "
            f"{resumed} finished earlier and reused) in {time.perf_counter() - t_start:.1f} s; results in {folder.root}"
        )
    shard.barrier()
    return records if shard.is_main else []
