"""Methods: one file per method, each registering its model with :func:`mtbench.registry.register_method`.

Only models live here: a method knows nothing of the CLI, the result store or the reports. Importing this package
registers every method (the registry does so lazily), in the order below.
"""

from methods import single_task, mtl_full, decoder_only, lora, mtlora, tadformer, hyperformer, polyhistor, vmt_adapter, ditask, tdss  # noqa: F401  (registration side effects)
from methods import adapter, bitfit, compacter, vpt  # noqa: F401  (issue 8: the PEFT baselines of Table 1)
