"""``pymerge extract-lora BASE FINETUNED OUT --rank R``: a PEFT LoRA adapter from a fine-tune (truncated SVD)."""

from __future__ import annotations

from pathlib import Path

import click

from .cli_common import _friendly_errors, _setup_logging


@click.command("extract-lora")
@click.argument("base", type=click.Path(exists=True, path_type=Path))
@click.argument("finetuned", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--rank", "-r", type=click.IntRange(min=1), required=True, help="LoRA rank r (lora_alpha = r).")
@click.option("--modules", default=None,
              help="Comma-separated module names to extract (PEFT target_modules matching, e.g. q_proj,v_proj); "
                   "default: every linear weight of the transformer blocks.")
@click.option("--include-embeddings", is_flag=True, help="Also extract the embedding matrices (lora_embedding_A/B).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="dtype of the saved LoRA factors.")
@click.option("--oversample", type=click.IntRange(min=0), default=10, show_default=True,
              help="Extra sketch columns of the randomized SVD.")
@click.option("--power-iters", type=click.IntRange(min=0), default=2, show_default=True,
              help="Power iterations of the randomized SVD (each costs two more reads of a weight).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD's sketch.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--allow-pickle", is_flag=True, help="Read pytorch_model.bin inputs (torch.load weights_only=True).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--verbose", "-v", count=True, help="Log more; show tracebacks.")
@_friendly_errors
def extract_lora(base, finetuned, out, rank, modules, include_embeddings, dtype, oversample, power_iters, seed,
                 overwrite, allow_pickle, quiet, verbose):
    """Write to OUT a rank-R PEFT LoRA adapter whose ΔW is the truncated SVD of FINETUNED − BASE."""
    from .lora_extract import extract_lora as run, parse_modules

    _setup_logging(verbose, quiet)
    report = run(base, finetuned, out, rank=rank, modules=parse_modules(modules),
                 include_embeddings=include_embeddings, dtype=dtype, oversample=oversample,
                 power_iters=power_iters, seed=seed, overwrite=overwrite, allow_pickle=allow_pickle,
                 progress=not quiet)
    click.echo(f"wrote {report.out_dir}: rank-{report.rank} LoRA of {len(report.modules)} modules, "
               f"{report.bytes_written / 1e6:.3f} MB, {report.seconds:.2f} s")
