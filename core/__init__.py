"""The bottom layer: what every model-side package shares and nothing else owns.

Parameter/FLOP accounting (:mod:`core.accounting`), optimizer-group tags (:mod:`core.param_groups`),
the one loader that turns a mapping into a config dataclass (:mod:`core.config_utils`), lazy package
exports that keep config modules torch-free (:mod:`core.lazy`) and the one process-group collective
the layers above need (:mod:`core.distributed`). core imports no other package of the project."""
