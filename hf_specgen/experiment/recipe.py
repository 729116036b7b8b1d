"""What a recipe plugs into the experiment loop, and its script's entry point (`Recipe.main`).

`recipes/galactica_med.py` and `recipes/clip_imagenet.py` each subclass `Recipe`; the loop
(`run_experiment`) does the rest the same way for both: methods, WiSE-FT alphas, records, report,
publishing. `ExperimentArguments` are the loop's own options, shared by every recipe.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from .arguments import ExperimentArguments
from .config import ConfigError, parse_config
from .grid import GRID_FIELDS
from .recipe_base import RecipeBase
from .runner import run_experiment


__all__ = ["ExperimentArguments", "Recipe", "RecipeBase"]


class Recipe(RecipeBase):
    """A fine-tuning task (`RecipeBase`: model, data, trainer, evaluation, fingerprints) that runs as a
    script: `if __name__ == "__main__": MyRecipe.main()`."""

    @classmethod
    def main(cls, argv: Sequence[str] | None = None) -> None:
        """The script's entry point: parses `--config YAML` and the command line, then runs the
        experiment (`run_experiment`); a configuration that cannot run exits with one line naming the
        problem.

        Args:
            argv: the command line's arguments (default: `sys.argv[1:]`).
        """
        try:
            types = (cls.arguments, ExperimentArguments, cls.training_arguments)
            options, experiment, training, grids = parse_config(types, argv, grid_fields=GRID_FIELDS)
            experiment.strength_grids = grids
            run_experiment(cls(options, training.seed), experiment, training)
        except ConfigError as error:
            sys.exit(f"{cls.name}.py: error: {error}")
        except KeyboardInterrupt:  # one line, as specgen's; what is done stays, and a re-run continues from it
            print(
                f"{cls.name}.py: interrupted; run the same command again to continue where it stopped", file=sys.stderr
            )
            sys.exit(130)
        finally:  # torch's documented shutdown: no process group left to the interpreter's exit
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
