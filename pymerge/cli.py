"""The ``pymerge`` command: run, demo, inspect, verify, env. Parses, prints, exits; the work is in the library.

Errors from bad input print one line ``error: ...`` and exit 1 (2 for usage errors), with the traceback only
under ``-v``; a failed run leaves no output directory behind (the library writes into a temporary one).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from .cli_common import _friendly_errors, _setup_logging
from .errors import PymergeError

log = logging.getLogger("pymerge")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pymerge", message="pymerge %(version)s")
def main() -> None:
    """pymerge: merge fine-tuned checkpoints (mergekit-compatible configs) at the speed of the disk."""


@main.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "torch", "cpu", "cuda", "triton"]), default="auto",
              show_default=True, help="Kernel backend; PYMERGE_BACKEND overrides auto.")
@click.option("--max-memory", default=None, help="Host working-memory budget, e.g. 8GB (default: half the available RAM).")
@click.option("--max-gpu-memory", default=None, help="GPU memory budget, e.g. 20GB.")
@click.option("--out-shard-size", default="5GB", show_default=True, help="Maximum bytes of tensor data per output file.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random masks (DARE, DELLA).")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists and is not empty.")
@click.option("--allow-pickle", is_flag=True, help="Read pytorch_model.bin inputs (torch.load weights_only=True).")
@click.option("--allow-nonfinite", is_flag=True,
              help="Merge inputs holding NaN/Inf (they propagate) instead of stopping with an error.")
@click.option("--no-space-check", is_flag=True, help="Do not refuse to start when the disk looks too full.")
@click.option("--restart", is_flag=True,
              help="Discard the partial output an interrupted run left (.OUT_DIR.pymerge-partial) instead of "
                   "resuming it.")
@click.option("--lora-rank", type=click.IntRange(min=1), default=None,
              help="Write a rank-N PEFT adapter of (merged - base) instead of the full model (combine-then-SVD).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--verbose", "-v", count=True, help="Log more (-vv: debug); show tracebacks.")
@_friendly_errors
def run(config, out_dir, device, backend, max_memory, max_gpu_memory, out_shard_size, seed, overwrite, allow_pickle,
        allow_nonfinite, no_space_check, restart, quiet, verbose, lora_rank=None):
    """Merge the models CONFIG (a mergekit YAML) names into OUT_DIR.

    An interrupted run (Ctrl-C, kill, crash, full disk) is continued by running the same command again.
    """
    from .api import merge
    from .io.atomic_dir import partial_dir_for

    _setup_logging(verbose, quiet)
    if not config.is_file():
        raise click.BadParameter(f"config file {config} does not exist", param_hint="CONFIG")
    if lora_rank is not None:
        from .lora_merge import merge_to_lora

        if device == "cuda":
            raise click.BadParameter("--lora-rank runs on the CPU", param_hint="--device")
        rep = merge_to_lora(config, out_dir, rank=lora_rank, seed=seed, max_memory=max_memory, backend=backend,
                            overwrite=overwrite, quiet=quiet, allow_pickle=allow_pickle,
                            allow_nonfinite=allow_nonfinite)
        click.echo(f"wrote {rep.out_dir}: rank-{rep.rank} LoRA adapter for {len(rep.modules)} modules, "
                   f"{rep.bytes_written / 1e6:.1f} MB, {rep.seconds:.2f} s")
        return
    try:
        report = merge(config, out_dir, device=device, backend=backend, max_memory=max_memory,
                       max_gpu_memory=max_gpu_memory, out_shard_size=out_shard_size, seed=seed, quiet=quiet,
                       overwrite=overwrite, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite,
                       check_space=not no_space_check, restart=restart)
    except KeyboardInterrupt:
        partial = partial_dir_for(out_dir)
        kept = f" (partial merge kept in {partial}; run the same command again to resume)" if partial.is_dir() else ""
        click.echo(f"error: interrupted{kept}", err=True)
        sys.exit(130)
    resumed = f" ({report.resumed_tensors} resumed)" if report.resumed_tensors else ""
    click.echo(f"wrote {report.out_dir}: {report.tensors} tensors{resumed} in {report.shards} shard(s), "
               f"{report.bytes_written / 1e9:.3f} GB, {report.seconds:.2f} s "
               f"({report.gb_per_s:.2f} GB/s read, backend {report.backend})")


@main.command()
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the generated checkpoints live (default ~/.cache/pymerge/demo).")
@click.option("--preset", type=click.Choice(["tiny", "demo", "1b"]), default="demo", show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write the merged model (default: <cache-dir>/merged, replaced each run).")
@click.option("--max-memory", default=None, help="Host working-memory budget.")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--verbose", "-v", count=True)
@_friendly_errors
def demo(cache_dir, preset, out_dir, max_memory, quiet, verbose):
    """Generate a Llama-shaped base + 3 experts, TIES-merge them, verify, and report the speed."""
    from .demo import run_demo

    _setup_logging(verbose, quiet)
    run_demo(cache_dir=cache_dir, preset=preset, out_dir=out_dir, max_memory=max_memory, quiet=quiet,
             echo=click.echo)


@main.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--allow-pickle", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--verbose", "-v", count=True)
@_friendly_errors
def inspect(path, allow_pickle, as_json, verbose):
    """List the tensors of a checkpoint (file or directory) after validating its headers."""
    from .io.checkpoint import Checkpoint

    ck = Checkpoint.open(path, allow_pickle=allow_pickle)
    try:
        rows = [ck.info(n) for n in ck.names()]
        if as_json:
            click.echo(json.dumps({"path": str(ck.path), "files": [str(f) for f in ck.files()],
                                   "tensors": [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape)} for i in rows]},
                                  indent=2))
            return
        total = sum(i.nbytes for i in rows)
        params = sum(i.numel for i in rows)
        width = max((len(i.name) for i in rows), default=4)
        for i in rows:
            click.echo(f"{i.name:<{width}}  {i.dtype:<5}  {list(i.shape)}")
        click.echo(f"{len(rows)} tensors, {params:,} parameters, {total / 1e9:.3f} GB in {len(ck.files())} file(s)")
    finally:
        ck.close()


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--verbose", "-v", count=True)
def verify(out_dir, as_json, verbose):
    """Check a merged OUT_DIR against its manifest: files, sizes, sha256, shard headers, index."""
    from .api import verify as verify_output

    try:
        report = verify_output(out_dir)
    except (PymergeError, OSError) as e:
        if verbose:
            raise
        msg = str(e) if isinstance(e, PymergeError) else f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
        if as_json:
            click.echo(json.dumps({"ok": False, "out_dir": str(out_dir), "error": msg}))
        else:
            click.echo(f"error: {msg}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps({"ok": True, "out_dir": report.out_dir, "files": report.files,
                               "tensors": report.tensors, "bytes": report.bytes}))
    else:
        click.echo(f"ok: {report.files} files, {report.tensors} tensors")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def env(as_json):
    """Versions, backends available (and why not), CUDA kernels compiled or not."""
    from .environment import environment_report

    info = environment_report()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for k, v in value.items():
                click.echo(f"  {k}: {v}")
        else:
            click.echo(f"{key}: {value}")


# Commands that live in their own modules are attached here, one line each (they import _friendly_errors and
# _setup_logging from cli_common, never from this module, so `python -m pymerge.cli` has no import cycle).
from .cli_masks import masks; main.add_command(masks)  # noqa: E402,E702
from .cli_extract_lora import extract_lora; main.add_command(extract_lora)  # noqa: E402,E702
from .cli_bench import bench; main.add_command(bench)  # noqa: E402,E702

if __name__ == "__main__":  # pragma: no cover
    main()
