"""Checkpoint I/O: validated zero-copy safetensors reading, sharded offset writing, atomic output dirs."""

from pymerge.io.atomic_dir import AtomicOutputDir
from pymerge.io.checkpoint import Checkpoint
from pymerge.io.output_extras import (
    TOKENIZER_FILES,
    copy_tokenizer_files,
    write_config_json,
    write_model_card,
)
from pymerge.io.safetensors_format import ST_DTYPES, ST_ITEMSIZE, TORCH_TO_ST, TensorInfo
from pymerge.io.safetensors_reader import SafetensorsFile
from pymerge.io.safetensors_writer import OutTensor, ShardedWriter, ShardLayout, plan_shards

__all__ = [
    "AtomicOutputDir",
    "Checkpoint",
    "OutTensor",
    "SafetensorsFile",
    "ShardLayout",
    "ShardedWriter",
    "ST_DTYPES",
    "ST_ITEMSIZE",
    "TOKENIZER_FILES",
    "TORCH_TO_ST",
    "TensorInfo",
    "copy_tokenizer_files",
    "plan_shards",
    "write_config_json",
    "write_model_card",
]
