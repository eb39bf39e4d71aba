"""The console scripts, one module per command: train, eval, sample, bench. The library they share is
cgml_lightning.runs; nothing in the library imports these modules."""
