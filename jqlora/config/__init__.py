"""The run configuration: dataclasses are the schema, a YAML file picks values, `key.sub=value` overrides win.

    cfg = load_config("configs/llama3-8b.yaml", ["train.learning_rate=1e-4", "lora.targets=[q_proj,v_proj]"])

Precedence, lowest first: the dataclass defaults (neutral: no model, no data, no eval set, no sample prompt), the
YAML file, the command-line overrides in order. The demo is `configs/demo.yaml`, which `load_run_config` picks when
neither a file nor `model.path` is given; its `assets/demo/...` paths are the repository's, from any directory.
Parsing, merging and type conversion are done by omegaconf (structured configs); every user mistake comes out as one
`ConfigError` line naming where the value came from (the file or "command line"), the key, and the value, e.g.

    configs/x.yaml: unknown key 'train.learnig_rate' (did you mean 'train.learning_rate'?)
    command line: train.batch_size='four' is not an integer

The result is a tree of frozen dataclasses (`Config`); `config_to_dict` / `save_config` write it back as YAML that
`load_config` reads again to the same value.
"""

from jqlora.config.schema import *  # noqa: F401,F403
from jqlora.config.load import *  # noqa: F401,F403
