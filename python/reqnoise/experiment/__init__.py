"""The experiment runner: spec, plan, step cache, runner and report."""
