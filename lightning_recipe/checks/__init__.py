"""One module per check (a package when one module is too long): Lightning hooks in, the math of
``lightning_recipe.functional`` applied, findings out. No check imports another."""
