"""Multi-stage recipes: several merges in one YAML file, run as one streaming merge."""

from .documents import Recipe, RecipeDocument, is_recipe_text, load_recipe
from .plan import RecipePlan, plan_recipe
from .run import run_recipe

__all__ = ["Recipe", "RecipeDocument", "RecipePlan", "is_recipe_text", "load_recipe", "plan_recipe", "run_recipe"]
