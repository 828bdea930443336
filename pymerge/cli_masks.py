"""``pymerge masks``: build the per-task masks of tall_masks / emr / mmer, inspect them, rebuild a task's model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from .cli_common import _friendly_errors, _setup_logging


@click.group()
def masks() -> None:
    """Per-task binary masks (TALL masks, EMR, MMER): build, info, apply."""


@masks.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--method", type=click.Choice(["tall_masks", "emr", "mmer"]), default=None,
              help="Override the config's merge_method.")
@click.option("--max-memory", default=None,
              help="Host working-memory budget, e.g. 8GB (default: half the available RAM).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Read pytorch_model.bin inputs (torch.load weights_only=True).")
@click.option("--allow-nonfinite", is_flag=True, help="Build masks from inputs holding NaN/Inf.")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--verbose", "-v", count=True, help="Log more; show tracebacks.")
@_friendly_errors
def build(config, out, method, max_memory, overwrite, allow_pickle, allow_nonfinite, quiet, verbose):
    """Write the packed per-task masks of the models CONFIG names to the file OUT (.safetensors)."""
    from .masks import build_task_masks

    _setup_logging(verbose, quiet)
    if not config.is_file():
        raise click.BadParameter(f"config file {config} does not exist", param_hint="CONFIG")
    r = build_task_masks(config, out, method=method, max_memory=max_memory, overwrite=overwrite,
                         allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
    click.echo(f"wrote {r.path}: {r.method} masks of {len(r.tasks)} tasks x {r.tensors} tensors, "
               f"{r.bytes_written / 1e6:.3f} MB, {r.seconds:.2f} s")
    for task, resc, dens in zip(r.tasks, r.rescalers, r.mask_density):
        click.echo(f"  {task}: rescaler {resc:.6g}, {dens:.2%} of weights on")


@masks.command()
@click.argument("masks_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--verbose", "-v", count=True)
@_friendly_errors
def info(masks_file, as_json, verbose):
    """Show the method, tasks, rescalers and base model of a packed-masks file."""
    from .io.packed_masks import PackedMasks

    with PackedMasks(masks_file) as pm:
        out = {"path": str(pm.path), "method": pm.method, "tasks": pm.tasks, "rescalers": pm.rescalers,
               "base_model": pm.base_model, "tensors": len(pm.shapes),
               "parameters": sum(math.prod(s) for s in pm.shapes.values())}
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"{out['path']}: {out['method']} masks, {out['tensors']} tensors, {out['parameters']:,} parameters")
    click.echo(f"base model: {out['base_model']}")
    for i, (task, r) in enumerate(zip(out["tasks"], out["rescalers"])):
        click.echo(f"  [{i}] {task}  rescaler {r:.6g}")


@masks.command()
@click.argument("merged", type=click.Path(exists=True, path_type=Path))
@click.argument("masks_file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("task")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--base", type=click.Path(exists=True, path_type=Path), default=None,
              help="The base model (default: the path recorded in the masks file).")
@click.option("--out-shard-size", default="5GB", show_default=True,
              help="Maximum bytes of tensor data per output file.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--allow-pickle", is_flag=True)
@click.option("--quiet", "-q", is_flag=True)
@click.option("--verbose", "-v", count=True)
@_friendly_errors
def apply(merged, masks_file, task, out, base, out_shard_size, overwrite, allow_pickle, quiet, verbose):
    """Rebuild TASK's model from the MERGED model and MASKS_FILE into the directory OUT.

    TASK is a task label as listed by `pymerge masks info`, its last path component, or its position.
    """
    from .masks import write_task_model

    _setup_logging(verbose, quiet)
    final = write_task_model(merged, masks_file, task, out, base=base, overwrite=overwrite,
                             out_shard_size=out_shard_size, allow_pickle=allow_pickle)
    click.echo(f"wrote {final}")
