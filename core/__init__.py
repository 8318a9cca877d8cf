"""The bottom layer: what every model-side package shares and nothing else owns.

Parameter/FLOP accounting (:mod:`core.accounting`), optimizer-group tags (:mod:`core.param_groups`),
config-dataclass helpers (:mod:`core.config_utils`) and the one process-group collective the
layers above need (:mod:`core.distributed`). core imports no other package of the project."""
