"""``pymerge bench``: the whole-merge benchmark as a command (the work is in pymerge/bench.py)."""

from __future__ import annotations

from pathlib import Path

import click

from .bench import DEFAULT_METHODS
from .cli_common import _friendly_errors, _setup_logging


def _csv(value: str, known: tuple, what: str) -> list:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in known]
    if unknown or not items:
        raise click.BadParameter(f"unknown {what} {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
    return items


@click.command()
@click.option("--preset", type=click.Choice(["tiny", "demo", "1b"]), default="1b", show_default=True,
              help="Size of the generated Llama-shaped base + 3 experts.")
@click.option("--layers", type=click.IntRange(min=1), default=None,
              help="Override the preset's layer count (e.g. 4 vs 16 to see memory stay flat).")
@click.option("--methods", default=",".join(DEFAULT_METHODS),
              show_default=True, help="Comma-separated merge methods.")
@click.option("--tools", default="cpu,torch,mergekit", show_default=True,
              help="Comma-separated: cpu (native kernels), torch (pure torch), mergekit; on a CUDA GPU also cuda, "
                   "triton, torch-cuda (the GPU executor with each kernel set).")
@click.option("--config", "config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Bench this mergekit-style config instead of a generated family.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option("--max-memory", default=None, help="pymerge working-memory budget (default: its own).")
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True, help="Keep the best of N runs.")
@click.option("--rss", is_flag=True, help="Run pymerge as a subprocess and report its peak anonymous RSS.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where generated families live (default ~/.cache/pymerge/bench/<preset>).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where configs, logs and (deleted after timing) outputs go.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write every measurement to this JSON file.")
@click.option("--verbose", "-v", count=True)
@_friendly_errors
def bench(preset, layers, methods, tools, config, dtype, max_memory, repeat, rss, cache_dir, work_dir, json_path,
          verbose):
    """Time merges against the read floor, per backend and against mergekit, on this machine."""
    from .bench import KNOWN_METHODS, TOOLS, BenchOptions, run_bench

    _setup_logging(verbose, True)
    opts = BenchOptions(methods=_csv(methods, KNOWN_METHODS, "method") if config is None else [],
                        tools=_csv(tools, TOOLS, "tool"), preset=preset, layers=layers, dtype=dtype, config=config,
                        cache_dir=cache_dir, work_dir=work_dir, max_memory=max_memory, repeat=repeat, rss=rss,
                        json_path=json_path)
    runs = run_bench(opts, echo=lambda s: click.echo(s))
    if any(r.failed for r in runs):
        raise SystemExit(1)
