"""Checkpoints in and out: Hugging Face checkpoints read one tensor at a time (`reader`: safetensors or .bin, sharded
or not, bitsandbytes 4-bit), jqlora's own quantized format (`conversion`, `python -m jqlora.convert`), loading either
into a model, on one device or straight into a mesh's shards (`load`, `sharded`), and writing output directories
safely (`io`: atomic directories, sharded safetensors, the tokenizer files that travel along)."""

from jqlora.checkpoints.conversion import FORMAT_VERSION, JQLORA_META, convert, hf_source, is_jqlora_dir, load_jqlora
from jqlora.checkpoints.errors import ConvertError
from jqlora.checkpoints.io import (SIDE_FILES, WEIGHTS, WEIGHTS_INDEX, OutputError, ShardWriter, atomic_directory,
                                   check_free_space, copy_side_files, is_disk_full, save_safetensors)
from jqlora.checkpoints.load import load_checkpoint
from jqlora.checkpoints.reader import Checkpoint, check_checkpoint, read_config
from jqlora.checkpoints.sharded import from_hf_tensors_sharded, place_lora

__all__ = [
    "FORMAT_VERSION", "JQLORA_META", "SIDE_FILES", "WEIGHTS", "WEIGHTS_INDEX", "Checkpoint", "ConvertError",
    "OutputError", "ShardWriter", "atomic_directory", "check_checkpoint", "check_free_space", "convert",
    "copy_side_files", "from_hf_tensors_sharded", "hf_source", "is_disk_full", "is_jqlora_dir", "load_checkpoint",
    "load_jqlora", "place_lora", "read_config", "save_safetensors",
]
