"""Studies of the Fisher measures: grids of training runs and their runner."""
