"""Pipeline stages: one module per stage, each with its runner and the files it writes."""
