"""Recipes' shared machinery: configuration, methods, the experiment loop and its sources."""

from .arguments import ExperimentArguments
from .config import ConfigError, parse_config
from .methods import METHODS, Method, parse_methods
from .recipe import Recipe
from .recipe_base import RecipeBase
from .runner import one_process_models, publish, run_experiment
from .sources import check_model, check_output_dir, check_paths, is_local_path, load_split


__all__ = [
    "ConfigError",
    "ExperimentArguments",
    "METHODS",
    "Method",
    "Recipe",
    "RecipeBase",
    "check_model",
    "check_output_dir",
    "check_paths",
    "is_local_path",
    "load_split",
    "one_process_models",
    "parse_config",
    "parse_methods",
    "publish",
    "run_experiment",
]
