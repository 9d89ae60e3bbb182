"""Searching a pipeline's values: spaces, the stage cache, Tune trials, tuned final runs."""
