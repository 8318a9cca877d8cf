"""The bottom layer: helpers every config-owning package shares (:mod:`core.config_utils`); core imports
no other package of the project."""
