"""What leaves jqlora as something peft, transformers or vLLM load: peft LoRA adapters written and read in peft's
own format (`format`, `export`, `load`; the embedding / LM-head and MoE-expert adapters in `heads`, `experts`),
adapters merged into a full Hugging Face checkpoint (`merge`), and what PiSSA / LoftQ runs save so that their
adapters are usable outside jqlora (`init_state`). `load_model` is `jqlora.load_model`: a checkpoint, with a peft
adapter on it when one is given."""

from jqlora.adapters import init_state
from jqlora.adapters.errors import AdapterError, ExportError
from jqlora.adapters.export import adapter_config_dict, adapter_tensors, save_adapter
from jqlora.adapters.format import CONFIG_NAME, PREFIX, SAVE_DTYPES, WEIGHTS_NAME, WEIGHTS_NAME_BIN
from jqlora.adapters.load import load_adapter, load_model, load_model_with_adapter, read_adapter_config
from jqlora.adapters.merge import base_of_adapter, is_adapter_dir, merge_to_hf, merged_tensor

__all__ = [
    "CONFIG_NAME", "PREFIX", "SAVE_DTYPES", "WEIGHTS_NAME", "WEIGHTS_NAME_BIN", "AdapterError", "ExportError",
    "adapter_config_dict", "adapter_tensors", "base_of_adapter", "init_state", "is_adapter_dir", "load_adapter",
    "load_model", "load_model_with_adapter", "merge_to_hf", "merged_tensor", "read_adapter_config", "save_adapter",
]
